"""REPL safety: no silent overwrites, bounded batch runs, one-line errors."""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.repl import cmd_running
from kctx_debug.repl.main import repl_main
from kctx_debug.traps.trace import read_header


def _run(snapshot: Path, *lines: str) -> tuple[int, str, str]:
    args = argparse.Namespace(
        batch=True, repl_commands=[("ex", line) for line in lines], snapshot=str(snapshot)
    )
    out, err = io.StringIO(), io.StringIO()
    code = repl_main(args, stdin=io.StringIO(""), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    src = Path(demo_snapshot_path())
    for f in src.parent.glob(src.stem + ".*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / src.name


def test_save_refuses_the_open_snapshot_even_forced(snap: Path) -> None:
    before = snap.read_bytes()
    code, _, err = _run(snap, f"save {snap} --force", f"record start {snap} --force")
    assert code == 1
    assert err.count("is part of the open snapshot; refusing to overwrite it") == 2
    assert snap.read_bytes() == before


def test_save_refuses_existing_files_without_force(snap: Path) -> None:
    keep = snap.parent / "keep.phys"
    keep.write_bytes(b"precious")
    code, _, err = _run(snap, f"save {snap.parent / 'keep.json'}")
    assert code == 1 and "keep.phys: exists; give --force to overwrite it" in err
    assert keep.read_bytes() == b"precious"
    new = snap.parent / "new.json"
    code, out, err = _run(snap, f"save {new}", f"save {new}")
    assert "new.json: exists; give --force" in err and out.count("saved") == 1
    code, out, err = _run(snap, f"save {new} --force")
    assert code == 0 and "saved" in out


def test_record_refuses_existing_and_non_regular_files(snap: Path) -> None:
    trace = snap.parent / "t.ktrace.jsonl"
    trace.write_text("keep\n")
    code, _, err = _run(snap, f"record start {trace}", "record start /dev/null")
    assert "t.ktrace.jsonl: exists; give --force to overwrite it" in err
    assert "/dev/null: not a regular file; refusing to write to it" in err
    assert trace.read_text() == "keep\n"
    code, _out, _ = _run(snap, f"record start {trace} --force", "record stop")
    assert code == 0 and trace.read_text().startswith('{"format":"kctx-trace"')


def test_finish_and_until_fail_at_once(snap: Path) -> None:
    # The demo starts at user_start with [rsp] == 0: the outermost frame.
    code, _, err = _run(snap, "finish", "until 0xdead")
    assert code == 1
    assert 'error: "finish" not meaningful in the outermost frame.\n' in err
    assert "until: cannot run to 0xdead: no code can run there (not present)" in err


def test_batch_continue_has_a_default_budget(snap: Path, monkeypatch) -> None:
    monkeypatch.setattr(cmd_running, "BATCH_BUDGET", 50)
    code, out, _ = _run(snap, "set context off", "continue")
    assert code == 0
    assert "stopped: budget" in out
    assert "batch mode: stopped after the default budget of 50 instructions" in out


def test_memory_error_names_the_address_once(snap: Path) -> None:
    _, _, err = _run(snap, "x/8gx 0xdead", "x/2i 0xdead")
    assert err.count("error: cannot access memory at 0xdead: not present\n") == 2


def test_shift_out_of_range_is_an_error(snap: Path) -> None:
    _, out, err = _run(snap, "p 1<<100", "p 1<<-1", "p 1<<63")
    assert "shift count 100 is outside 0-63" in err
    assert "shift count -1 is outside 0-63" in err
    assert "0x8000000000000000" in out


def test_batch_sigint_stops_the_script_with_130(snap: Path, monkeypatch) -> None:
    calls = []

    def run_interrupted(session, count, action):  # a run that Ctrl-C stopped
        calls.append(count)
        session.interrupted = True
        return "stopped: user-stop"

    monkeypatch.setattr(cmd_running, "_run_bounded", run_interrupted)
    code, out, err = _run(snap, "continue", "p 1", "p 2")
    assert code == 130 and calls == [None]
    assert "interrupted: the remaining commands were not run" in err
    assert "0x1" not in out


def test_repl_recorded_trace_says_it_cannot_replay(tmp_path):
    """A REPL trace starts from the session's state, not the snapshot's: replay refuses it."""
    trace = tmp_path / "session.ktrace.jsonl"
    run = [sys.executable, "-m", "kctx_debug.cli"]
    subprocess.run(
        [*run, "--batch", "-ex", f"record start {trace}", "-ex", "stepi", "-ex", "record stop"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert read_header(trace).origin == "repl"
    proc = subprocess.run(
        [*run, "replay", str(demo_snapshot_path()), str(trace)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert "recorded interactively in the REPL" in line and "cannot be replayed" in line
