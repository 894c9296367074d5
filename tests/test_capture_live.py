"""Live capture of real processes, checked against the kernel's own view.

A small C program (compiled here) fills memory with known patterns: anonymous
pages, a private file mapping, read-only zero pages, a 64 MiB region that THP
may back with huge pages, and a shared counter it keeps incrementing. The test
captures it, then reads ``/proc/PID/pagemap`` and ``/proc/PID/mem`` itself and
compares every page's frame and contents with the snapshot.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kctx_debug.capture import (
    ProcessExitedError,
    PtracePermissionError,
    capture_main,
    capture_process,
)
from kctx_debug.capture.capture import describe_capture
from kctx_debug.capture.ptrace import StoppedProcess
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.pagetables.pagemap import Verdict, cross_check
from kctx_debug.physmem import PAGE_SIZE
from kctx_debug.snapshot import RangeKind
from kctx_debug.snapshot_io import load_snapshot, save_snapshot


def _can_trace() -> bool:
    """Whether this session may ptrace a child at all (a sandbox may forbid it)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return False
    proc = subprocess.Popen(["sleep", "5"])
    try:
        with StoppedProcess(proc.pid):
            return True
    except PtracePermissionError:
        return False
    finally:
        proc.kill()
        proc.wait()


pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not _can_trace(),
    reason="needs Linux x86-64, gcc, and permission to ptrace a child",
)

PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1
ANON_PAGES, ZERO_PAGES, HUGE_MIB, FILE_PAGES = 16, 8, 64, 5
SKIPPED = ("[vvar]", "[vvar_vclock]", "[vsyscall]")

CHILD_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#define PAGE 4096UL
#define TWO_MB (2UL << 20)

int main(int argc, char **argv) {
    size_t anon_pages = strtoul(argv[3], 0, 0), zero_pages = strtoul(argv[4], 0, 0);
    size_t file_size = strtoul(argv[5], 0, 0), huge = strtoul(argv[6], 0, 0) << 20;
    uint64_t *anon = mmap(0, anon_pages * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < anon_pages * PAGE / 8; i++) anon[i] = 0xA5A5000000000000ULL | i;
    int fd = open(argv[1], O_RDONLY);
    volatile uint8_t *file = mmap(0, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    volatile uint8_t *zeros = mmap(0, zero_pages * PAGE, PROT_READ,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned sum = 0;
    for (size_t off = 0; off < file_size; off += PAGE) sum += file[off];
    for (size_t i = 0; i < zero_pages; i++) sum += zeros[i * PAGE];  /* the zero page */
    uint8_t *raw = mmap(0, huge + TWO_MB, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *h = (uint8_t *)(((uintptr_t)raw + TWO_MB - 1) & ~(TWO_MB - 1));
    madvise(h, huge, MADV_HUGEPAGE);
    for (size_t off = 0; off < huge; off += PAGE)
        *(uint64_t *)(h + off) = 0x5A5A000000000000ULL | off;
    int cfd = open(argv[2], O_RDWR);
    volatile uint64_t *counter = mmap(0, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
    printf("%p %p %p %p %u\n", (void *)anon, (void *)file, (void *)zeros, (void *)h, sum);
    fflush(stdout);
    struct timespec ts = {0, 500000};
    for (;;) { counter[0]++; nanosleep(&ts, 0); }
}
"""


# -- the test's own reading of /proc (independent of kctx_debug) ---------------------------


def own_maps(pid: int) -> list[tuple[int, int, str]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        out.append((lo, hi, fields[5].strip() if len(fields) > 5 else ""))
    return out


def own_pagemap(pid: int) -> dict[int, int]:
    """VA -> raw entry for every present page of every VMA the capture covers."""
    out = {}
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for lo, hi, path in own_maps(pid):
            if path in SKIPPED:
                continue
            f.seek(lo // PAGE_SIZE * 8)
            raw = f.read((hi - lo) // PAGE_SIZE * 8)
            for i, entry in enumerate(struct.unpack(f"<{len(raw) // 8}Q", raw)):
                if entry & PRESENT:
                    out[lo + i * PAGE_SIZE] = entry
    return out


def own_read(pid: int, va: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, va)
    finally:
        os.close(fd)


def rseq_area(fs_base: int) -> tuple[int, int]:
    """The thread's ``struct rseq`` (glibc 2.35+ registers one at the thread pointer plus
    ``__rseq_offset``): the kernel rewrites its CPU number whenever the thread migrates,
    so those bytes may legitimately differ between the capture and a later read."""
    libc = ctypes.CDLL(None)
    try:
        offset = ctypes.c_ssize_t.in_dll(libc, "__rseq_offset").value
        size = ctypes.c_uint.in_dll(libc, "__rseq_size").value
    except ValueError:
        return (0, 0)  # an older glibc: no rseq registration
    return fs_base + offset, fs_base + offset + max(size, 32)


def same_but_rseq(a: bytes, b: bytes, va: int, rseq: tuple[int, int]) -> bool:
    lo, hi = max(rseq[0] - va, 0), min(rseq[1] - va, PAGE_SIZE)
    if lo >= hi:
        return a == b
    return a[:lo] == b[:lo] and a[hi:] == b[hi:]


def state(pid: int) -> tuple[str, str]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return status["State"].strip(), status["TracerPid"].strip()


def report_for(ctx: KernelContext):
    entries = {r.va: r.entry for r in ctx.snapshot.pagemap}
    return cross_check(ctx.mem, ctx.paging.root, ctx.mode, entries)


def pfns_visible() -> bool:
    buf = bytearray(b"x" * PAGE_SIZE)
    va = np.frombuffer(buf, np.uint8).ctypes.data & ~(PAGE_SIZE - 1)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(va // PAGE_SIZE * 8)
        return bool(struct.unpack("<Q", f.read(8))[0] & PFN_MASK)


needs_pfns = pytest.mark.skipif(not pfns_visible(), reason="PFNs need CAP_SYS_ADMIN")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def child_exe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("child")
    (folder / "child.c").write_text(CHILD_C)
    subprocess.run(["gcc", "-O1", "-o", folder / "child", folder / "child.c"], check=True)
    return folder / "child"


@pytest.fixture(scope="module")
def live(child_exe, tmp_path_factory):
    """The C child, captured once; the independent reads are taken after the capture."""
    folder = tmp_path_factory.mktemp("live")
    data = bytes((i * 7 + 3) % 256 for i in range(FILE_PAGES * PAGE_SIZE))
    (folder / "data.bin").write_bytes(data)
    (folder / "counter").write_bytes(bytes(PAGE_SIZE))
    proc = subprocess.Popen(
        [child_exe, folder / "data.bin", folder / "counter", str(ANON_PAGES), str(ZERO_PAGES),
         str(len(data)), str(HUGE_MIB)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        anon, file, zeros, huge, _ = (int(x, 16) for x in proc.stdout.readline().split())
        counter = np.memmap(folder / "counter", dtype=np.uint64, mode="r", shape=(1,))
        while counter[0] < 5:
            time.sleep(0.001)
        out = folder / "out"
        out.mkdir()
        result = capture_process(proc.pid, out / "snap.json")
        after_capture = int(counter[0])
        kernel = own_pagemap(proc.pid)
        ctx = KernelContext.from_snapshot(load_snapshot(out / "snap.json"))
        yield {
            "proc": proc, "result": result, "ctx": ctx, "kernel": kernel, "data": data,
            "anon": anon, "file": file, "zeros": zeros, "huge": huge, "counter": counter,
            "after_capture": after_capture, "out": out,
        }  # fmt: skip
        ctx.close()
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "1000"])
    deadline = time.monotonic() + 5
    while state(proc.pid)[0][0] != "S" or os.readlink(f"/proc/{proc.pid}/exe").find("sleep") < 0:
        if time.monotonic() > deadline:
            raise RuntimeError("sleep did not start")
        time.sleep(0.005)
    yield proc
    proc.kill()
    proc.wait()


# -- the C child ------------------------------------------------------------------------------


@needs_pfns
def test_every_page_has_the_kernels_frame_and_contents(live):
    pid, ctx, kernel = live["proc"].pid, live["ctx"], live["kernel"]
    records = {r.va: r.entry for r in ctx.snapshot.pagemap if r.entry & PRESENT}
    assert records.keys() == kernel.keys()
    assert {va: e & PFN_MASK for va, e in records.items()} == {
        va: e & PFN_MASK for va, e in kernel.items()
    }
    # Contents, except pages the running child changes: its stack and the counter.
    changing = [(lo, hi) for lo, hi, path in own_maps(pid)
                if path == "[stack]" or path.endswith("/counter")]  # fmt: skip
    rseq = rseq_area(ctx.cpu.msrs["fs_base"])
    compared = 0
    for va, entry in kernel.items():
        if any(lo <= va < hi for lo, hi in changing):
            continue
        frame = (entry & PFN_MASK) * PAGE_SIZE
        now = own_read(pid, va, PAGE_SIZE)
        assert same_but_rseq(ctx.mem.read(frame, PAGE_SIZE), now, va, rseq), hex(va)
        compared += 1
    assert compared > HUGE_MIB * 256


def test_known_patterns_through_the_page_tables(live):
    ctx = live["ctx"]
    expected = (np.arange(ANON_PAGES * 512, dtype=np.uint64) | np.uint64(0xA5A5 << 48)).tobytes()
    assert ctx.read_virtual(live["anon"], ANON_PAGES * PAGE_SIZE) == expected
    assert ctx.read_virtual(live["file"], len(live["data"])) == live["data"]
    zero_frames = {ctx.virt_to_phys(live["zeros"] + i * PAGE_SIZE) for i in range(ZERO_PAGES)}
    # The kernel's zero page, mapped 8 times; with PFNs hidden nothing says they are one.
    assert len(zero_frames) == (1 if pfns_visible() else ZERO_PAGES)
    assert all(ctx.mem.read(f, PAGE_SIZE) == bytes(PAGE_SIZE) for f in zero_frames)
    for off in range(0, HUGE_MIB << 20, 97 * PAGE_SIZE):
        word = ctx.read_virtual(live["huge"] + off, 8)
        assert int.from_bytes(word, "little") == 0x5A5A << 48 | off


@needs_pfns
def test_shared_frames_are_stored_once(live):
    result, kernel = live["result"], live["kernel"]
    distinct = {e & PFN_MASK for e in kernel.values()}
    assert result.pages == len(kernel)
    assert result.frames == len(distinct) <= result.pages - (ZERO_PAGES - 1)
    assert live["result"].phys_path.stat().st_size == len(distinct) * PAGE_SIZE


@needs_pfns
def test_memory_ranges_are_merged_frame_runs(live):
    snap, kernel = live["ctx"].snapshot, live["kernel"]
    files = [r for r in snap.memory if r.kind is RangeKind.FILE]
    assert all(r.path == "snap.phys" for r in files)
    assert [r.offset for r in files] == list(np.cumsum([0] + [r.size for r in files[:-1]]))
    assert all(a.end < b.base for a, b in itertools.pairwise(files))  # merged
    covered = {(r.base + i) // PAGE_SIZE for r in files for i in range(0, r.size, PAGE_SIZE)}
    assert covered == {e & PFN_MASK for e in kernel.values()}
    # Huge pages: a 2 MiB-aligned block of 512 consecutive frames lies inside one range.
    huge = live["huge"]
    blocks = 0
    for block in range(huge, huge + (HUGE_MIB << 20), 2 << 20):
        pfns = [kernel[block + i * PAGE_SIZE] & PFN_MASK for i in range(512)]
        if pfns[0] % 512 == 0 and pfns == list(range(pfns[0], pfns[0] + 512)):
            base = pfns[0] * PAGE_SIZE
            assert any(r.base <= base and base + (2 << 20) <= r.end for r in files)
            blocks += 1
    if not blocks:
        pytest.skip("THP did not back the 64 MiB region this time")


def test_pagemap_cross_check_agrees_completely(live):
    report = report_for(live["ctx"])
    present = sum(1 for r in live["ctx"].snapshot.pagemap if r.entry & PRESENT)
    expected = Verdict.AGREE if pfns_visible() else Verdict.PFN_HIDDEN
    assert report.counts[expected] == present == live["result"].pages
    assert report.percent_agree == (100.0 if expected is Verdict.AGREE else 0.0)


def test_child_keeps_running_unchanged(live):
    pid, counter = live["proc"].pid, live["counter"]
    deadline = time.monotonic() + 5
    while counter[0] <= live["after_capture"] + 10:
        assert time.monotonic() < deadline, "the counter stopped after the capture"
        time.sleep(0.001)
    run_state, tracer = state(pid)
    assert run_state[0] in "RS" and tracer == "0"
    assert live["proc"].poll() is None


def test_registers_and_source(live):
    snap, result = live["ctx"].snapshot, live["result"]
    src = snap.source
    assert (src["pid"], src["stop"], src["threads"]) == (live["proc"].pid, "interrupt", 1)
    assert src["pfn"] == result.pfn_mode.value
    assert [v["path"] for v in src["vmas"] if "skipped" in v] == [
        p for _, _, p in own_maps(live["proc"].pid) if p in SKIPPED
    ]
    cpu = snap.cpu
    stack = next((lo, hi) for lo, hi, p in own_maps(live["proc"].pid) if p == "[stack]")
    assert stack[0] <= cpu.regs["rsp"] < stack[1]
    assert cpu.cpl == 3 and cpu.segments["cs"].selector == 0x33
    assert src["syscall"]["nr"] in (35, 230)  # nanosleep, clock_nanosleep
    assert sorted(p.name for p in live["out"].iterdir()) == ["snap.json", "snap.phys"]


# -- sleep 1000 ----------------------------------------------------------------------------------


def test_sleep_round_trips_through_save_and_load(sleeper, tmp_path):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (first, second, third):
        d.mkdir()
    result = capture_process(sleeper.pid, first / "snap.json")
    # /proc/PID/syscall of a blocked task: nr args... sp pc, after the restart.
    fields = Path(f"/proc/{sleeper.pid}/syscall").read_text().split()
    sp, pc = int(fields[-2], 16), int(fields[-1], 16)
    snap = load_snapshot(first / "snap.json")
    assert (snap.cpu.regs["rsp"], snap.cpu.regs["rip"]) == (sp, pc)
    save_snapshot(snap, second / "snap.json")  # side file referenced from the first folder
    moved = load_snapshot(second / "snap.json", allow_outside=True)
    assert moved.memory[0].path == "../a/snap.phys"
    ctx = KernelContext.from_snapshot(moved)
    try:
        report = report_for(ctx)
        assert report.percent_agree == (100.0 if pfns_visible() else 0.0)
        assert report.counts[Verdict.ONLY_IN_PAGEMAP] == report.counts[Verdict.ONLY_IN_TABLES] == 0
        save_snapshot(moved, third / "snap.json", mem=ctx.mem)  # build applied, new side file
    finally:
        ctx.close()
    again = load_snapshot(third / "snap.json")
    assert again.build is None and again.source["build_applied"] is True
    ctx = KernelContext.from_snapshot(again)
    try:
        report = report_for(ctx)
        assert len(report) == len(snap.pagemap) == result.pages
        assert report.percent_agree == (100.0 if pfns_visible() else 0.0)
        rip = snap.cpu.regs["rip"]
        assert ctx.read_virtual(rip - 2, 2) == b"\x0f\x05"  # the syscall instruction
    finally:
        ctx.close()
    assert state(sleeper.pid) == ("S (sleeping)", "0")


def test_document_matches_the_published_schema(sleeper, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    capture_process(sleeper.pid, tmp_path / "snap.json")
    schema = json.loads(
        (resources.files("kctx_debug.schema") / "snapshot-v1.schema.json").read_text()
    )
    jsonschema.validate(json.loads((tmp_path / "snap.json").read_text()), schema)


def test_already_traced(sleeper, tmp_path):
    with StoppedProcess(sleeper.pid):  # we are its tracer now: a second seize is refused
        with pytest.raises(PtracePermissionError) as info:
            capture_process(sleeper.pid, tmp_path / "snap.json")
    assert str(info.value) == (
        f"cannot attach to PID {sleeper.pid}: permission denied (it is already traced by "
        f"PID {os.getpid()} (a debugger or strace); detach that first)"
    )
    assert list(tmp_path.iterdir()) == []


def test_stopped_process_stays_stopped(sleeper, tmp_path):
    os.kill(sleeper.pid, signal.SIGSTOP)
    while state(sleeper.pid)[0][0] != "T":
        time.sleep(0.002)
    result = capture_process(sleeper.pid, tmp_path / "snap.json")
    assert result.snapshot.source["stop"] == "group-stop"
    time.sleep(0.05)
    assert state(sleeper.pid) == ("T (stopped)", "0")
    os.kill(sleeper.pid, signal.SIGCONT)
    while state(sleeper.pid)[0][0] != "S":
        time.sleep(0.002)


def test_exit_mid_capture_writes_nothing(sleeper, tmp_path):
    def kill(stopped):
        os.kill(stopped.pid, signal.SIGKILL)

    with pytest.raises(ProcessExitedError) as info:
        capture_process(sleeper.pid, tmp_path / "snap.json", on_stopped=kill)
    assert str(info.value).startswith(f"PID {sleeper.pid} exited during capture (while ")
    assert str(info.value).endswith("); nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_synthetic_frames(sleeper, tmp_path):
    result = capture_process(sleeper.pid, tmp_path / "snap.json", synthetic=True)
    snap = load_snapshot(tmp_path / "snap.json")
    assert snap.source["pfn"] == "synthetic"
    files = [r for r in snap.memory if r.kind is RangeKind.FILE]
    assert files[0].base == 4 << 30 and sum(r.size for r in files) == result.pages * PAGE_SIZE
    assert len(files) == 1  # frames handed out consecutively: one run
    assert all(r.entry & PFN_MASK == 0 for r in snap.pagemap)  # as an unprivileged reader sees
    assert "PFNs: synthetic" in describe_capture(result)
    ctx = KernelContext.from_snapshot(snap)
    try:
        report = report_for(ctx)
        assert report.counts[Verdict.PFN_HIDDEN] == result.pages
        stack = next((lo, hi) for lo, hi, p in own_maps(sleeper.pid) if p == "[stack]")
        rseq = rseq_area(snap.cpu.msrs["fs_base"])
        for r in snap.pagemap:
            if r.entry & PRESENT and not stack[0] <= r.va < stack[1]:
                now = own_read(sleeper.pid, r.va, PAGE_SIZE)
                assert same_but_rseq(ctx.read_virtual(r.va, PAGE_SIZE), now, r.va, rseq)
    finally:
        ctx.close()


def test_all_threads_are_stopped_and_released(tmp_path):
    code = (
        "import threading, time\n"
        "def spin():\n    while True: time.sleep(0.001)\n"
        "for _ in range(3): threading.Thread(target=spin, daemon=True).start()\n"
        "print('up', flush=True)\ntime.sleep(1000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"up\n"
        result = capture_process(proc.pid, tmp_path / "snap.json")
        assert result.snapshot.source["threads"] == 4
        time.sleep(0.05)
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            task_state, tracer = state(int(tid))
            assert task_state[0] in "RS" and tracer == "0"
    finally:
        proc.kill()
        proc.wait()


def test_cli_prints_summary_and_cross_check(sleeper, tmp_path, capsys):
    assert capture_main([str(sleeper.pid), "-o", str(tmp_path / "snap.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"captured PID {sleeper.pid} (sleep): ")
    assert f"wrote {tmp_path / 'snap.json'} and snap.phys" in out
    if pfns_visible():
        assert "PFNs: real" in out and "agree (100.0% of pages present in either)" in out


def test_cli_synthetic_pfns(sleeper, tmp_path, capsys):
    args = [str(sleeper.pid), "-o", str(tmp_path / "snap.json"), "--synthetic-pfns"]
    assert capture_main(args) == 0
    out = capsys.readouterr().out.splitlines()
    pages = int(out[0].split(": ")[1].split()[0])
    assert out[1].startswith("PFNs: synthetic") and out[1].endswith("from 0x100000000")
    assert out[-1] == (
        f"  (no PFNs to compare: {pages} of {pages} pages are mapped in both, which is all "
        "a synthetic-frame snapshot can show)"
    )
