"""The kctx-debug command line on the bundled demo: ptdump, translate, summary, errors."""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kctx_debug.cli import demo_snapshot_path, main
from kctx_debug.errors import SnapshotError
from kctx_debug.snapshot_io import write_atomic

DEMO = str(demo_snapshot_path())

# The demo's present mappings, as Linux's ptdump prints them (leaf flags; the
# demo declares each of these in fixtures/make_demo.py).
EXPECTED_PRESENT = [
    "0x0000000000400000-0x0000000000401000           4K USR ro                     x  pte",
    "0x00007ffffffff000-0x0000800000000000           4K USR RW                     NX pte",
    "0xffff888000000000-0xffff888000200000           2M     RW         PSE     GLB NX pmd",
    "0xffffc90000000000-0xffffc90000008000          32K     RW                 GLB NX pte",
    "0xfffffe0000001000-0xfffffe0000004000          12K     RW                 GLB NX pte",
    "0xffffffff81000000-0xffffffff81001000           4K     ro                 GLB x  pte",
    "0xffffffff81200000-0xffffffff81201000           4K     RW                 GLB NX pte",
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ptdump_prints_coalesced_ranges(capsys):
    code, out, _ = run(capsys, "ptdump", DEMO)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "---[ User Space ]---"
    assert "---[ Kernel Space ]---" in lines
    present = [
        line for line in lines if line.endswith(("pte", "pmd")) and ("RW" in line or "ro" in line)
    ]
    assert present == EXPECTED_PRESENT
    # Holes fill the gaps: consecutive lines (markers aside) tile the address space.
    ranges = [line.split()[0].split("-") for line in lines if line.startswith("0x")]
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start or (end, start) == ("0x0000800000000000", "0xffff800000000000")


def test_ptdump_json_and_range_filter(capsys):
    code, out, _ = run(
        capsys, "ptdump", DEMO, "--json", "--range", "0xffffc90000000000-0xffffc90000010000"
    )
    assert code == 0
    doc = json.loads(out)
    present = [r for r in doc["ranges"] if r["present"]]
    assert [(r["start"], r["end"], r["phys"]) for r in present] == [
        (0xFFFFC90000000000, 0xFFFFC90000008000, 0x200000)
    ]
    assert doc["anomalies"] == []


def test_translate_explains_a_fault(capsys):
    code, out, _ = run(capsys, "translate", DEMO, "0x400000", "--access", "write,user")
    assert code == 2
    assert "PTE[0]     @ 0x0000000000103000 = 0x0000000000300005  P|US" in out
    assert "#PF error code 0x7 (P|WR|US)" in out


def test_translate_json(capsys):
    code, out, _ = run(capsys, "translate", DEMO, "0xffffffff81000010", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["phys"] == 0x1000010
    assert [s["level"] for s in doc["steps"]] == ["PML4E", "PDPTE", "PDE", "PTE"]


def test_batch_info_commands(capsys):
    code, out, _ = run(
        capsys,
        DEMO,
        "--batch",
        "-ex",
        "info registers rip cr3",
        "-ex",
        "info idt 3",
        "-ex",
        "info tss",
    )
    assert code == 0
    assert "0x0000000000400000 <user_start>" in out
    assert "0x0000000000100000" in out
    assert "bp_handler" in out and "dpl=3" in out
    assert "rsp0  0xffffc90000004000" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ptdump"], "the following arguments are required: snapshot"),
        (["translate", DEMO, "zz"], "argument va: expected an integer, got 'zz'"),
        (["ptdump", DEMO, "--range", "0x2000-0x1000"], "is not above start"),
        (["ptdump", "/nonexistent/snap.json"], "/nonexistent/snap.json: cannot read"),
        (["translate", DEMO, "0x1000", "--access", "jump"], "jump"),
        ([DEMO, "--cpu", "1"], "--cpu and --symbols apply to QEMU ELF cores only"),
    ],
)
def test_errors_are_one_line(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "kctx_debug.cli", *argv], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("kctx-debug: ") and message in line


def test_fifo_snapshot_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    path = str(fifo)
    for args in (["ptdump", path], ["translate", path, "0x1000"], [path, "--batch"]):
        argv = [sys.executable, "-m", "kctx_debug.cli", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1
        assert proc.stderr.strip().endswith("fifo.json: not a regular file")


def test_outputs_never_replace_special_files(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(SnapshotError, match="not a regular file: refusing to replace it"):
        write_atomic(fifo, b"{}")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_elf_that_is_not_a_core(tmp_path):
    elf = Path(__file__).resolve().parent.parent / "fixtures" / "bin" / "kernel.elf"
    proc = subprocess.run(
        [sys.executable, "-m", "kctx_debug.cli", "ptdump", str(elf)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("an ELF file, but not a QEMU dump-guest-memory core")


def test_offline_verbs_do_not_load_the_emulator():
    code = (
        "import sys; from kctx_debug.cli import main; "
        f"main(['ptdump', {DEMO!r}]); main(['translate', {DEMO!r}, '0x400000']); "
        "sys.stderr.write(' '.join(m for m in ('unicorn', 'capstone', 'prompt_toolkit') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr == ""
