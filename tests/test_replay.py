"""Record and replay (traps/replay.py), the CLI verbs, and the pytest plugin.

Independent truth: the fixture kernels' behaviour is known from their sources
(tests/test_trap_fixtures.py computes it by hand); here a changed program must make
replay name the first event and field that differ, with the values both runs had,
and the plugin is run as a separate pytest process (also under pytest-xdist).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kctx_debug import __version__
from kctx_debug.errors import CommandError, TraceError
from kctx_debug.snapshot_io import load_snapshot
from kctx_debug.traps.events import TrapKind
from kctx_debug.traps.replay import (
    add_record_arguments,
    add_replay_arguments,
    describe_replay,
    record,
    replay,
    snapshot_for_trace,
)
from kctx_debug.traps.trace import read_trace

ROOT = Path(__file__).resolve().parent.parent
TRAPS = ROOT / "fixtures" / "traps"
INT3_SYMBOLS = {"user_int3": 0x400007, "done": 0x400010, "bp_handler": 0xFFFFFFFF81000000}
TIMER_DONE = 0x40000E
HAVE_BINUTILS = bool(shutil.which("as") and shutil.which("ld"))


def copy_fixture(name: str, folder: Path, *, trace: bool = True) -> Path:
    """The fixture's snapshot (and trace) in ``folder``; the snapshot's path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TRAPS / f"{name}.json", folder)
    if trace:
        shutil.copy(TRAPS / f"{name}.ktrace.jsonl", folder)
    return folder / f"{name}.json"


@pytest.fixture(autouse=True)
def _traps_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TRAPS))  # the generator's modules: layout, make_traps


def test_symbols_used_here_match_the_elf() -> None:
    from layout import elf_symbols

    found = elf_symbols(TRAPS / "bin" / "int3.elf")
    assert {k: found[k] for k in INT3_SYMBOLS} == INT3_SYMBOLS
    assert elf_symbols(TRAPS / "bin" / "timer.elf")["done"] == TIMER_DONE


def test_record_writes_header_and_events(tmp_path: Path) -> None:
    snapshot = copy_fixture("int3", tmp_path, trace=False)
    trace_path = tmp_path / "run.ktrace.jsonl"
    result = record(snapshot, trace_path, until=INT3_SYMBOLS["done"])
    assert (result.events, result.final.name, result.final.icount) == (4, "until", 28)
    trace = read_trace(trace_path)
    assert trace.header.snapshot == "int3.json"
    assert trace.header.snapshot_hash == load_snapshot(snapshot).content_hash()
    assert trace.header.tool_version == __version__
    assert trace.header.options.until == INT3_SYMBOLS["done"]
    assert [e.seq for e in trace.events] == [0, 1, 2, 3]
    assert [e.kind for e in trace.events] == [TrapKind.EXCEPTION] * 3 + [TrapKind.STOP]
    # The same run as the committed trace.
    assert trace.events == read_trace(TRAPS / "int3.ktrace.jsonl").events
    assert replay(snapshot, trace_path).ok


def test_breakpoints_are_events_and_the_run_goes_on(tmp_path: Path) -> None:
    snapshot = copy_fixture("int3", tmp_path, trace=False)
    trace_path = tmp_path / "b.ktrace.jsonl"
    record(snapshot, trace_path, breaks=[INT3_SYMBOLS["user_int3"]], until=INT3_SYMBOLS["done"])
    events = read_trace(trace_path).events
    # Each loop: our breakpoint at the int3 (before it runs), then the guest's #BP.
    assert [(e.kind, e.icount) for e in events] == [
        (TrapKind.BREAKPOINT, 1),
        (TrapKind.EXCEPTION, 2),
        (TrapKind.BREAKPOINT, 10),
        (TrapKind.EXCEPTION, 11),
        (TrapKind.BREAKPOINT, 19),
        (TrapKind.EXCEPTION, 20),
        (TrapKind.STOP, 28),
    ]
    assert replay(snapshot, trace_path).ok


def test_max_events_and_budget_end_the_run(tmp_path: Path) -> None:
    snapshot = copy_fixture("int3", tmp_path, trace=False)
    capped = record(snapshot, tmp_path / "m.ktrace.jsonl", max_events=2)
    assert (capped.events, capped.final.name) == (3, "user-stop")
    assert capped.final.icount == 11  # stopped right after the second #BP's delivery
    budget = record(snapshot, tmp_path / "n.ktrace.jsonl", budget=15)
    assert (budget.events, budget.final.name, budget.final.icount) == (3, "budget", 15)
    assert replay(snapshot, tmp_path / "m.ktrace.jsonl").ok
    assert replay(snapshot, tmp_path / "n.ktrace.jsonl").ok


def test_injection_waits_for_if_and_replays(tmp_path: Path) -> None:
    # The second interrupt is due at icount 102, inside the first one's handler (an
    # interrupt gate cleared IF): it waits for the handler's iretq (6 instructions).
    snapshot = copy_fixture("timer", tmp_path, trace=False)
    trace_path = tmp_path / "i.ktrace.jsonl"
    record(snapshot, trace_path, inject=[(100, 32), (102, 32)], until=TIMER_DONE)
    events = read_trace(trace_path).events
    assert [(e.kind, e.vector, e.icount, e.cpl) for e in events] == [
        (TrapKind.INTERRUPT, 32, 100, 3),
        (TrapKind.INTERRUPT, 32, 106, 3),
        (TrapKind.STOP, None, 1 + 3 * 1000 + 2 * 6, 3),
    ]
    assert replay(snapshot, trace_path).ok


# -- divergence ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_BINUTILS, reason="needs GNU as/ld")
def test_a_changed_instruction_names_the_first_divergent_event_and_field(tmp_path: Path) -> None:
    """Must show: one instruction altered in a copy of the fixture makes replay fail."""
    from layout import build_elf, snapshot_document
    from make_traps import FIXTURES

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TRAPS / "src" / "traps.ld", src)
    text = (TRAPS / "src" / "int3.S").read_text()
    assert text.count("add     rax, rax") == 1
    (src / "int3.S").write_text(text.replace("add     rax, rax", "add     rax, rbx"))
    elf = build_elf(src / "int3.S", tmp_path / "int3.elf", tmp_path)
    changed = tmp_path / "int3.json"
    changed.write_text(json.dumps(snapshot_document(elf, FIXTURES["int3"])))
    result = replay(changed, TRAPS / "int3.ktrace.jsonl")
    assert not result.ok
    div = result.divergence
    assert div is not None and div.seq == 1
    # After one loop rax = 1 + rbx (3) instead of 1 + 1.
    assert [(d.field, d.recorded, d.replayed) for d in div.differences] == [("regs.rax", 2, 4)]
    lines = describe_replay(result).splitlines()
    assert lines[0] == (
        "int3.ktrace.jsonl: event 1 (#BP at icount 11): field regs.rax: recorded 0x2, replayed 0x4"
    )
    assert lines[1].startswith("int3.ktrace.jsonl: snapshot hash: recorded ")
    assert result.events == 2  # stopped at the first divergence


def _edit_trace(src: Path, dst: Path, edit) -> Path:
    lines = src.read_text().splitlines()
    dst.write_text("\n".join(edit(lines)) + "\n")
    return dst


def test_an_edited_event_is_reported_field_by_field(tmp_path: Path) -> None:
    snapshot = copy_fixture("pagefault", tmp_path, trace=False)

    def edit(lines: list[str]) -> list[str]:
        event = json.loads(lines[2])
        event["cr2"], event["error_code"] = 0x602008, 4
        return [*lines[:2], json.dumps(event), *lines[3:]]

    trace = _edit_trace(TRAPS / "pagefault.ktrace.jsonl", tmp_path / "p.ktrace.jsonl", edit)
    result = replay(snapshot, trace)
    assert result.hash_matches and not result.ok
    assert str(result.divergence) == (
        "event 1 (#PF at icount 71): field error_code: recorded 0x4, replayed 0x6\n"
        "  field cr2: recorded 0x602008, replayed 0x602000"
    )


def test_a_shorter_or_longer_trace_diverges_at_its_end(tmp_path: Path) -> None:
    snapshot = copy_fixture("int3", tmp_path, trace=False)
    src = TRAPS / "int3.ktrace.jsonl"
    short = _edit_trace(src, tmp_path / "s.ktrace.jsonl", lambda lines: lines[:-1])
    result = replay(snapshot, short)
    assert str(result.divergence) == (
        "event 3: the recorded trace ends here, the replay goes on with until at icount 28"
    )

    def longer(lines: list[str]) -> list[str]:
        bp = json.loads(lines[3])
        extra = {**bp, "seq": 3, "icount": 29}
        stop = {**json.loads(lines[4]), "seq": 4}
        return [*lines[:4], json.dumps(extra), json.dumps(stop)]

    result = replay(snapshot, _edit_trace(src, tmp_path / "l.ktrace.jsonl", longer))
    assert str(result.divergence).startswith("event 3 (#BP at icount 29): field icount:")


def test_snapshot_hash_mismatch_alone_fails(tmp_path: Path) -> None:
    doc = json.loads((TRAPS / "int3.json").read_text())
    doc["source"]["description"] = "same code, another description"
    (tmp_path / "int3.json").write_text(json.dumps(doc))
    result = replay(tmp_path / "int3.json", TRAPS / "int3.ktrace.jsonl")
    assert result.divergence is None and not result.hash_matches and not result.ok
    assert "snapshot hash: recorded " in describe_replay(result)


def test_snapshot_for_trace(tmp_path: Path) -> None:
    assert snapshot_for_trace(TRAPS / "timer.ktrace.jsonl") == TRAPS / "timer.json"
    shutil.copy(TRAPS / "timer.ktrace.jsonl", tmp_path)
    with pytest.raises(CommandError, match=r"its snapshot timer\.json is not next to it"):
        snapshot_for_trace(tmp_path / "timer.ktrace.jsonl")
    (tmp_path / "bad.ktrace.jsonl").write_text('{"format": "kctx-trace", "version": 7}\n')
    with pytest.raises(TraceError, match="version: 7 is not supported"):
        snapshot_for_trace(tmp_path / "bad.ktrace.jsonl")


# -- CLI ------------------------------------------------------------------------------------------


def _cli(add, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def test_record_and_replay_verbs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = copy_fixture("int3", tmp_path, trace=False)
    out = tmp_path / "cli.ktrace.jsonl"
    argv = [str(snapshot), "-o", str(out), "--until", "done", "--break", "user_int3"]
    assert _cli(add_record_arguments, [*argv, "--max-events", "50"]) == 0
    assert capsys.readouterr().out == f"recorded 7 events to {out} (ended: until at icount 28)\n"
    options = read_trace(out).header.options
    assert (options.breaks, options.until, options.max_events) == ((0x400007,), 0x400010, 50)
    assert _cli(add_replay_arguments, [str(snapshot), str(out)]) == 0
    assert capsys.readouterr().out == "cli.ktrace.jsonl: identical: 7 events\n"

    def later(lines: list[str]) -> list[str]:
        event = json.loads(lines[2])
        event["icount"] += 1
        return [*lines[:2], json.dumps(event), *lines[3:]]

    bad = _edit_trace(out, tmp_path / "bad.ktrace.jsonl", later)
    assert _cli(add_replay_arguments, [str(snapshot), str(bad)]) == 1
    assert capsys.readouterr().out.startswith(
        "bad.ktrace.jsonl: event 1 (#BP at icount 3): field icount: recorded 3, replayed 2\n"
    )
    gap = _edit_trace(out, tmp_path / "gap.ktrace.jsonl", lambda ls: [*ls[:2], *ls[3:]])
    with pytest.raises(TraceError, match=r"gap\.ktrace\.jsonl:3: seq: 2, expected 1"):
        _cli(add_replay_arguments, [str(snapshot), str(gap)])


def test_record_verb_injects_by_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = copy_fixture("timer", tmp_path, trace=False)
    out = tmp_path / "t.ktrace.jsonl"
    argv = [str(snapshot), "-o", str(out), "--until", hex(TIMER_DONE)]
    assert _cli(add_record_arguments, [*argv, "--inject", "100:32", "--inject", "0x3e9:0x20"]) == 0
    assert "recorded 3 events" in capsys.readouterr().out
    assert read_trace(out).header.options.inject == ((100, 32), (1001, 32))


def test_record_verb_rejects_a_bad_injection() -> None:
    with pytest.raises(SystemExit):
        _cli(add_record_arguments, ["s.json", "-o", "t", "--inject", "12"])


# -- QEMU ELF cores -------------------------------------------------------------------------------

# vCPU 1 of the synthetic core runs (at TEXT_VA + 0x10, CPL0):
#   mov ecx, 5; 1: inc rax; loop 1b; xor edx, edx; div edx (at +12: 5+3+2+2 bytes)
# -> #DE after 1 + 5 * 2 + 1 instructions
# and the #DE gate's handler (TEXT_VA + 0x40, current stack) is hlt. vCPU 0 starts on hlt.
DUMP_CODE = bytes.fromhex("b905000000 48ffc0 e2fb 31d2 f7f2".replace(" ", ""))


def _dump(tmp_path: Path) -> Path:
    from qemu.elfcore import CpuNote, Load, write_core
    from test_qemu_dump import CR, TEXT_VA, _low_memory, _segments

    text = bytearray(0x2000)
    text[0x10 : 0x10 + len(DUMP_CODE)] = DUMP_CODE
    text[0x30] = text[0x40] = 0xF4  # hlt
    regs = {"rsp": TEXT_VA + 0x1FF0, "rflags": 0x2}
    cpus = [
        CpuNote({**regs, "rip": TEXT_VA + 0x30}, _segments(), CR),
        CpuNote({**regs, "rip": TEXT_VA + 0x10}, _segments(), CR),
    ]
    path = tmp_path / "guest.core"
    write_core(path, cpus, [Load(0x0, _low_memory(xd=True)), Load(0x100000, bytes(text))])
    return path


def test_record_and_replay_a_qemu_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_qemu_dump import DE_HANDLER, TEXT_VA

    from kctx_debug.qemu_dump import read_qemu_dump

    core = _dump(tmp_path)
    # The hash of a dump's snapshot is stable across reads, and differs per vCPU.
    hashes = [read_qemu_dump(core, cpu=c).content_hash() for c in (1, 1, 0)]
    assert hashes[0] == hashes[1] != hashes[2]
    out = tmp_path / "dump.ktrace.jsonl"
    argv = [str(core), "-o", str(out), "--cpu", "1", "--budget", "1000"]
    assert _cli(add_record_arguments, argv) == 0
    assert capsys.readouterr().out == f"recorded 2 events to {out} (ended: halt at icount 13)\n"
    trace = read_trace(out)
    assert (trace.header.snapshot, trace.header.snapshot_hash) == ("guest.core", hashes[0])
    assert trace.header.options.budget == 1000
    de, halt = trace.events
    assert (de.kind, de.vector, de.rip, de.icount, de.handler) == (
        TrapKind.EXCEPTION, 0, TEXT_VA + 0x10 + 12, 12, DE_HANDLER,
    )  # fmt: skip
    assert (halt.kind, halt.name, halt.rip) == (TrapKind.STOP, "halt", DE_HANDLER + 1)
    assert snapshot_for_trace(out) == core
    assert _cli(add_replay_arguments, [str(core), str(out), "--cpu", "1"]) == 0
    assert capsys.readouterr().out == "dump.ktrace.jsonl: identical: 2 events\n"
    # vCPU 0 is another snapshot: the first event differs, and so does the hash.
    assert _cli(add_replay_arguments, [str(core), str(out)]) == 1
    report = capsys.readouterr().out
    # vCPU 0's hlt retires at once and stops the run: a halt at icount 1 instead.
    assert report.startswith(
        "dump.ktrace.jsonl: event 0 (#DE at icount 12): field icount: recorded 12, replayed 1\n"
        "  field kind: recorded exception, replayed stop\n"
    )
    assert f"snapshot hash: recorded {hashes[0]}, replayed {hashes[2]}" in report


# -- the pytest plugin ---------------------------------------------------------------------------


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.slow  # two pytest processes, one with two xdist workers
def test_plugin_replays_the_fixture_folder_under_xdist() -> None:
    pytest.importorskip("xdist")
    run = _pytest("-n", "2", str(TRAPS), cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 passed" in run.stdout


@pytest.mark.slow  # two pytest processes
def test_plugin_items_fail_with_the_divergence(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    copy_fixture("int3", folder)
    copy_fixture("syscall", folder)

    def edit(lines: list[str]) -> list[str]:
        event = json.loads(lines[1])
        event["rip"] += 1
        return [lines[0], json.dumps(event), *lines[2:]]

    _edit_trace(TRAPS / "syscall.ktrace.jsonl", folder / "syscall.ktrace.jsonl", edit)
    shutil.copy(TRAPS / "timer.ktrace.jsonl", folder)  # its snapshot is not there
    run = _pytest("-rf", str(folder), cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout and "2 failed" in run.stdout
    assert (
        "syscall.ktrace.jsonl: event 0 (syscall at icount 2): field rip: recorded 0x400006, "
        "replayed 0x400005"
    ) in run.stdout
    assert "timer.ktrace.jsonl: timer.ktrace.jsonl: its snapshot timer.json is not next to it" in (
        run.stdout
    )
    collected = _pytest("--collect-only", str(folder), cwd=tmp_path).stdout
    assert "traces/int3.ktrace.jsonl::replay" in collected


def test_plugin_is_inert_without_traces(tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    run = _pytest(str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, kctx_debug.traps.plugin as p; "
         "print(sorted(m for m in ('unicorn', 'capstone', 'kctx_debug.emulator') "
         "if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout == "[]\n"


def test_plugin_fixtures(kctx_machine, kctx_replay) -> None:
    dbg = kctx_machine(TRAPS / "int3.json")
    event = dbg.until(INT3_SYMBOLS["done"])
    assert (event.kind, event.name, event.icount) == (TrapKind.STOP, "until", 28)
    assert [e.vector for e in dbg.trap_log] == [3, 3, 3, None]
    machine = kctx_machine(TRAPS / "int3.json", debugger=False)
    assert machine.run(count=10).vector == 3
    assert kctx_replay(TRAPS / "int3.ktrace.jsonl").events == 4
