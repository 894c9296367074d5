"""Batch mode: -ex/-x in order, stdin as commands, exit status, one-line errors."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.errors import CommandError, KctxError
from kctx_debug.repl.commands import default_registry
from kctx_debug.repl.main import add_repl_arguments, repl_main
from kctx_debug.repl.registry import CommandRegistry


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("snapshot", nargs="?")
    parser.add_argument("--allow-outside-paths", action="store_true")
    add_repl_arguments(parser)
    return parser.parse_args(list(argv))


class _Stdin(io.StringIO):
    def __init__(self, text: str = "", tty: bool = False) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _run(*argv: str, stdin: str = "", tty: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = repl_main(_args(*argv), stdin=_Stdin(stdin, tty), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


DEMO = str(demo_snapshot_path())


def test_ex_and_x_run_in_the_order_given(tmp_path):
    script = tmp_path / "cmds.kctx"
    script.write_text("# a comment\np 2\n\np 3\n")
    code, out, err = _run(DEMO, "--batch", "-ex", "p 1", "-x", str(script), "-ex", "p 4", tty=True)
    assert (code, err) == (0, "")
    assert out.splitlines() == ["0x1  1", "0x2  2", "0x3  3", "0x4  4"]


def test_a_failed_command_makes_the_exit_status_1_and_the_rest_still_run():
    code, out, err = _run(
        DEMO, "--batch", "-ex", "p nosuch", "-ex", "bogus", "-ex", "p 5", tty=True
    )
    assert code == 1
    assert out == "0x5  5\n"
    assert err.splitlines() == [
        "error: unknown symbol 'nosuch'",
        "error: unknown command 'bogus' (try 'help')",
    ]


def test_stdin_that_is_not_a_terminal_is_read_as_commands():
    code, out, err = _run(DEMO, "--echo", stdin="p 7\ninfo symbol $rip\nquit\np 8\n")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "(kctx) p 7",
        "0x7  7",
        "(kctx) info symbol $rip",
        "user_start  (user_start at 0x400000)",
        "(kctx) quit",
    ]


def test_batch_without_commands_reads_stdin_and_reports_failure():
    code, out, err = _run(DEMO, "--batch", stdin="p 1/0\n")
    assert (code, out, err) == (1, "", "error: division by zero in '/'\n")


def test_no_snapshot_opens_the_demo_and_says_so():
    code, out, err = _run("--batch", "-ex", "p $rip", tty=True)
    assert code == 0 and out == "0x400000  4194304 <user_start>\n"
    assert err == f"(no snapshot given: opening the bundled demo {DEMO})\n"


def test_unreadable_script_and_snapshot_are_errors(tmp_path):
    with pytest.raises(CommandError, match="cannot read"):
        _run(DEMO, "--batch", "-x", str(tmp_path / "missing"), tty=True)
    with pytest.raises(KctxError):
        _run(str(tmp_path / "missing.json"), "--batch", tty=True)


def test_internal_errors_are_one_line_without_traceback(monkeypatch):
    def broken(session, args):
        raise ZeroDivisionError("boom")

    def patched():
        return CommandRegistry(
            replace(c, run=broken) if c.name == "info cpu" else c for c in default_registry()
        )

    monkeypatch.setattr("kctx_debug.repl.main.default_registry", patched)
    code, out, err = _run(DEMO, "--batch", "-ex", "info cpu", "-ex", "p 1", tty=True)
    assert code == 1
    assert err == "error: internal error: ZeroDivisionError: boom\n"
    assert out == "0x1  1\n"


def test_module_entry_point_runs_batch_mode_without_colour(tmp_path):
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kctx_debug.repl", DEMO, "--batch", "-ex", "info idt 3",
         "-ex", "x/2i $rip"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout
    assert proc.stdout.splitlines()[0].startswith("0x03 #BP         int-gate sel=0x0010")
    assert "=> 0x400000 <user_start>:  48 c7 c0 01 00 00 00  mov rax, 1" in proc.stdout
