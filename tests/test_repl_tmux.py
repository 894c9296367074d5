"""The REPL in a real terminal: tmux (Debian's, see scripts/system-deps.sh) runs it, keys
are typed with send-keys and the screen is read with capture-pane.

Ctrl-C during ``continue`` on an endless loop must bring the prompt back within a
second with the machine intact.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import kctx_debug.cli

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

PROMPT = "(kctx) "


def _repl_command() -> list[str]:
    """``kctx-debug`` itself once the CLI opens the REPL, else the REPL's module entry."""
    if "repl_main" in inspect.getsource(kctx_debug.cli):
        script = Path(sys.executable).with_name("kctx-debug")
        return [str(script)] if script.exists() else [sys.executable, "-m", "kctx_debug.cli"]
    return [sys.executable, "-m", "kctx_debug.repl"]


class Tmux:
    """One detached tmux session running a command in a 160x50 window."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.name = f"kctx-{uuid.uuid4().hex[:8]}"
        exports = [f"{k}={v}" for k, v in env.items()]
        self._tmux(
            "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50",
            "env", *exports, *command,
        )  # fmt: skip

    def _tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", *args], check=True, capture_output=True, text=True, timeout=10
        ).stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def type(self, line: str) -> None:
        self.send("-l", line)
        self.send("Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", self.name)

    def wait_for(self, predicate, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the screen:\n{text}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return (
            subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode
            == 0
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def _prompt_after(marker: str):
    """A predicate: ``marker`` is on the screen with a fresh prompt line below it."""

    def seen(screen: str) -> bool:
        if marker not in screen:
            return False
        below = screen.split(marker, 1)[1].splitlines()
        return any(line.rstrip() == PROMPT.rstrip() for line in below)

    return seen


@pytest.fixture
def term(tmp_path):
    env = {
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "NO_COLOR": "1",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    tmux = Tmux(_repl_command(), env)
    yield tmux
    tmux.kill()


def test_typing_completion_ctrl_c_during_continue_and_ctrl_d(term, tmp_path):
    # The toolbar is drawn once the prompt is ready for keys.
    screen = term.wait_for(lambda s: "snapshot (nothing run yet)" in s)
    assert "opening the bundled demo" in screen
    # The bottom toolbar.
    assert "rip 0x400000 <user_start> | CPL3 | 4-level paging" in screen

    term.type("info idt 3")
    term.wait_for(lambda s: "dpl=3 P <bp_handler>" in s)

    # Tab completes a command word on the real terminal.
    term.send("-l", "info reg")
    term.send("Tab")
    term.wait_for(lambda s: "(kctx) info registers" in s)
    term.send("C-u")

    # An endless loop (jmp $) and a continue that only Ctrl-C ends.
    term.type("set {u16} $rip = 0xfeeb")
    term.type("set context off")
    term.wait_for(lambda s: "(kctx) set context off" in s)
    term.type("continue")
    term.wait_for(lambda s: "(kctx) continue" in s)
    time.sleep(0.5)
    after = term.screen().split("(kctx) continue", 1)[1]
    assert PROMPT.strip() not in after  # still running: no new prompt
    term.send("C-c")
    sent = time.monotonic()
    screen = term.wait_for(_prompt_after("stopped: user-stop at 0x400000 <user_start>"), 5)
    assert time.monotonic() - sent < 1.0, screen

    term.type("info registers rip")
    term.wait_for(lambda s: "rip            0x0000000000400000 <user_start>" in s)
    term.type("stepi")
    term.wait_for(lambda s: "stopped: budget at 0x400000 <user_start>" in s)

    term.send("C-d")
    deadline = time.monotonic() + 5
    while term.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not term.alive()
    history = (tmp_path / "state" / "kctx-debug" / "history").read_text()
    assert "+continue\n" in history and "+info registers rip\n" in history
