"""/proc/PID/pagemap decoding, and a live process as the oracle for dump/reverse/cross-check.

A child process maps 48 private anonymous pages: it writes a pattern to pages
0-31, only reads pages 32-39 (the kernel maps its shared zero page there) and
leaves pages 40-47 untouched. Its pagemap (real PFNs: we run as root) is then
rebuilt as page tables over a sparse PhysicalMemory holding the child's bytes at
those PFNs, and every tool must give the PFNs back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kctx_debug.capture.procmaps import read_maps
from kctx_debug.errors import KctxError, PageTableError
from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.dump import iter_mappings
from kctx_debug.pagetables.entry import FIVE_LEVEL, FOUR_LEVEL, PteFlag
from kctx_debug.pagetables.pagemap import (
    PagemapEntry,
    Verdict,
    cross_check,
    read_pagemap,
)
from kctx_debug.pagetables.reverse import reverse_map
from kctx_debug.physmem import PhysicalMemory

PAGES, WRITTEN, READ = 48, 32, 8

CHILD = textwrap.dedent(
    f"""
    import ctypes, mmap, sys
    m = mmap.mmap(-1, {PAGES} * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range({WRITTEN}):
        m[i * 4096:(i + 1) * 4096] = (0x5A000000 + i).to_bytes(8, "little") * 512
    for i in range({WRITTEN}, {WRITTEN + READ}):
        m[i * 4096]
    print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
    sys.stdin.readline()
    """
)


def _pattern(i: int) -> bytes:
    return (0x5A000000 + i).to_bytes(8, "little") * 512


# -- decoding hand-made entries (bits from Documentation/admin-guide/mm/pagemap.rst) --------


def test_present_entry():
    e = PagemapEntry.from_raw(0x8000000000001234)
    assert (e.present, e.swapped, e.pfn, e.swap_type, e.swap_offset) == (
        True, False, 0x1234, None, None,
    )  # fmt: skip
    assert not (e.file_shared or e.exclusive or e.uffd_wp or e.guard or e.soft_dirty)
    assert str(e) == "pfn 0x1234 PRESENT"


def test_flag_bits_one_by_one():
    for bit, name in ((55, "soft_dirty"), (56, "exclusive"), (57, "uffd_wp"), (58, "guard"),
                      (61, "file_shared")):  # fmt: skip
        e = PagemapEntry.from_raw(1 << 63 | 1 << bit | 7)
        assert getattr(e, name) is True
        others = {"soft_dirty", "exclusive", "uffd_wp", "guard", "file_shared"} - {name}
        assert not any(getattr(e, o) for o in others)
        assert e.pfn == 7
    every = PagemapEntry.from_raw(0xA780000000000000)  # bits 63, 61, 58, 57, 56, 55
    assert (every.present, every.file_shared, every.guard, every.uffd_wp, every.exclusive,
            every.soft_dirty, every.pfn) == (True, True, True, True, True, True, 0)  # fmt: skip


def test_swapped_entry():
    raw = 1 << 62 | 0x1ABC << 5 | 3
    e = PagemapEntry.from_raw(raw)
    assert (e.present, e.swapped, e.pfn, e.swap_type, e.swap_offset) == (
        False, True, None, 3, 0x1ABC,
    )  # fmt: skip
    assert e.raw == raw
    assert str(e) == "swap type 3 offset 0x1abc SWAPPED"
    assert str(PagemapEntry.from_raw(0)) == "not present -"
    for bad in (-1, 1 << 64):
        with pytest.raises(KctxError):
            PagemapEntry.from_raw(bad)


def test_read_pagemap_errors():
    with open("/proc/sys/kernel/pid_max") as f:
        missing = int(f.read()) + 1  # above pid_max: never a process
    with pytest.raises(KctxError) as info:
        read_pagemap(missing, 0x400000, 0x401000)
    assert str(info.value) == f"no such process: {missing}"
    with pytest.raises(KctxError) as info:
        read_maps(missing)
    assert str(info.value) == f"no such process: PID {missing}"
    with pytest.raises(KctxError, match="empty or negative"):
        read_pagemap(os.getpid(), 0x2000, 0x1000)
    with pytest.raises(KctxError, match="beyond the user address space"):
        read_pagemap(os.getpid(), (1 << 47) - 0x1000, (1 << 47) + 0x1000)


def test_cross_check_rejects_unaligned_vas():
    mem = PhysicalMemory()
    mem.add_zero(0x100000, 0x1000)
    with pytest.raises(PageTableError, match="not a page-aligned"):
        cross_check(mem, 0x100000, FOUR_LEVEL, {0x1234: 1 << 63})


# -- the live process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def child():
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        base = int(proc.stdout.readline(), 16)
        vma = next(v for v in read_maps(proc.pid) if v.start <= base < v.end)
        assert vma.end - base >= PAGES * 4096 and vma.perms_text.startswith("rw")
        raw = read_pagemap(proc.pid, base, base + PAGES * 4096)
        entries = [PagemapEntry.from_raw(int(r)) for r in raw]
        if entries[0].pfn == 0:
            pytest.skip("pagemap PFNs are hidden (not running with CAP_SYS_ADMIN)")
        with open(f"/proc/{proc.pid}/mem", "rb") as f:
            f.seek(base)
            data = f.read(WRITTEN * 4096)
        yield base, raw, entries, data
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def _rebuild(base, entries, data, skip=(), extra=()):
    """Tables mapping each present page to its real PFN; frames hold the child's bytes."""
    mem = PhysicalMemory()
    for pfn in sorted({e.pfn for e in entries if e.present}):
        i = next(k for k, e in enumerate(entries) if e.pfn == pfn)
        mem.add_bytes(pfn * 4096, data[i * 4096 : (i + 1) * 4096] if i < WRITTEN else bytes(4096))
    top = max(e.pfn for e in entries if e.present) + 1
    area = (top * 4096 + 0x1FFFFF) & ~0x1FFFFF
    mem.add_zero(area, 0x40000)
    mode = FIVE_LEVEL if base >> 47 else FOUR_LEVEL
    b = PageTableBuilder(mem, mode, area, 0x40000)
    for i, e in enumerate(entries):
        if e.present and i not in skip:
            b.map(base + i * 4096, e.pfn * 4096, 0x1000, 0x1000, PteFlag.RW | PteFlag.US)
    for i, pfn in extra:
        b.map(base + i * 4096, pfn * 4096, 0x1000, 0x1000, PteFlag.RW | PteFlag.US)
    return mem, b, mode


def test_child_pagemap_is_what_the_kernel_must_report(child):
    _, _, entries, data = child
    assert [e.present for e in entries] == [True] * (WRITTEN + READ) + [False] * (PAGES - 40)
    written = [e.pfn for e in entries[:WRITTEN]]
    assert len(set(written)) == WRITTEN  # private pages: one frame each
    assert len({e.pfn for e in entries[WRITTEN : WRITTEN + READ]}) == 1  # the zero page
    assert all(data[i * 4096 : (i + 1) * 4096] == _pattern(i) for i in range(WRITTEN))


def test_dump_reproduces_every_pfn_and_the_bytes(child):
    base, _, entries, _ = child
    mem, b, mode = _rebuild(base, entries, child[3])
    span = (base, base + PAGES * 4096)
    ranges = list(iter_mappings(mem, b.root, mode, va_range=span, include_holes=False,
                                split_discontiguous=True))  # fmt: skip
    seen = {}
    for r in ranges:
        for va in range(r.start, r.end, 4096):
            seen[va] = (r.phys + va - r.start) // 4096
    assert seen == {base + i * 4096: e.pfn for i, e in enumerate(entries) if e.present}
    for i in range(WRITTEN):
        assert mem.read((seen[base + i * 4096]) * 4096, 4096) == _pattern(i)


def test_reverse_map_finds_each_frame(child):
    base, _, entries, _ = child
    mem, b, mode = _rebuild(base, entries, child[3])
    for i in (0, 7, WRITTEN - 1):
        assert reverse_map(mem, b.root, mode, entries[i].pfn * 4096 + 0x123) == [
            base + i * 4096 + 0x123
        ]
    zero = entries[WRITTEN].pfn
    assert reverse_map(mem, b.root, mode, zero * 4096) == [
        base + i * 4096 for i in range(WRITTEN, WRITTEN + READ)
    ]


def test_cross_check_agrees_then_sees_every_kind_of_difference(child):
    base, raw, entries, _ = child
    pagemap = {base + i * 4096: int(r) for i, r in enumerate(raw)}
    mem, b, mode = _rebuild(base, entries, child[3])
    report = cross_check(mem, b.root, mode, pagemap)
    assert report.counts[Verdict.AGREE] == WRITTEN + READ
    assert report.counts[Verdict.NOT_PRESENT_BOTH] == PAGES - WRITTEN - READ
    assert report.percent_agree == 100.0
    assert list(report.pages(only_disagreeing=True)) == []

    # Point page 5's PTE at page 6's frame, as a corrupted or stale table would.
    va5 = base + 5 * 4096
    table = b.root
    for depth in range(len(mode.levels) - 1):
        table = mem.read_u64(table + mode.index(va5, depth) * 8) & 0x000FFFFFFFFFF000
    pte = table + mode.index(va5, len(mode.levels) - 1) * 8
    assert mem.read_u64(pte) == entries[5].pfn * 4096 | 0x7
    mem.write_u64(pte, entries[6].pfn * 4096 | 0x7)
    report = cross_check(mem, b.root, mode, pagemap)
    (page,) = report.pages(only_disagreeing=True)
    assert (page.va, page.verdict, page.table_pfn, page.pagemap_pfn) == (
        va5, Verdict.PFN_DIFFERS, entries[6].pfn, entries[5].pfn,
    )  # fmt: skip
    assert report.percent_agree == 100.0 * 39 / 40
    assert report.to_json()["disagreements"] == [
        {"va": va5, "verdict": "pfn-differs", "table_pfn": entries[6].pfn,
         "pagemap_pfn": entries[5].pfn}
    ]  # fmt: skip
    assert f"{va5:#018x} PFN_DIFFERS" in report.describe()

    # Page 0 missing from the tables; page 40 mapped only by the tables.
    mem, b, mode = _rebuild(base, entries, child[3], skip={0}, extra=[(40, entries[1].pfn)])
    report = cross_check(mem, b.root, mode, pagemap)
    verdicts = {p.va: p.verdict for p in report.pages(only_disagreeing=True)}
    assert verdicts == {base: Verdict.ONLY_IN_PAGEMAP, base + 40 * 4096: Verdict.ONLY_IN_TABLES}
    counts = report.to_json()["counts"]
    assert counts == {"agree": 39, "pfn-differs": 0, "only-in-pagemap": 1, "only-in-tables": 1,
                      "not-present-both": 7, "pfn-hidden": 0}  # fmt: skip


def test_hidden_pfns_are_not_counted_as_agreement(child):
    base, _, entries, _ = child
    mem, b, mode = _rebuild(base, entries, child[3])
    report = cross_check(mem, b.root, mode, {base: 1 << 63})  # present, PFN read as 0
    assert [p.verdict for p in report.pages()] == [Verdict.PFN_HIDDEN]
    assert report.percent_agree == 0.0
