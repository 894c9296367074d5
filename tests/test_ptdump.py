"""Layout dump, ptdump text, anomalies and the reverse map.

The expected text is derived by hand from the printf formats of Linux's
arch/x86/mm/dump_pagetables.c (``0x%016lx-0x%016lx   ``, ``%9lu%c ``, the flag
columns, the level name). This machine (Linux 6.18, CONFIG_PTDUMP_DEBUGFS not
set) has no /sys/kernel/debug/page_tables/ even with debugfs mounted, and a
kernel's own tables cannot be read from user space, so no real dump is compared.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from kctx_debug.arch.bits import CR0, CR4, EFER
from kctx_debug.errors import PageTableError
from kctx_debug.pagetables.batch import translate_many
from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.dump import (
    AnomalyKind,
    MappingRange,
    TableAnomaly,
    dump_layout,
    format_ptdump,
    iter_mappings,
    mappings_to_json,
)
from kctx_debug.pagetables.entry import FIVE_LEVEL, FOUR_LEVEL, PteFlag
from kctx_debug.pagetables.reverse import reverse_map
from kctx_debug.pagetables.walk import CpuPagingState
from kctx_debug.physmem import PhysicalMemory

P, RW, US, A, G, XD = PteFlag.P, PteFlag.RW, PteFlag.US, PteFlag.A, PteFlag.G, PteFlag.XD
PML4E, PDPTE, PDE, PTE = FOUR_LEVEL.levels
AREA = 0x100000

# Flag columns, hand-assembled: USR/4sp, RW/ro, PWT, PCD, PSE, PAT, GLB, NX/x.
HOLE = " " * 30
USER_TEXT = "USR " + "ro " + "    " * 5 + "x  "
USER_DATA = "USR " + "RW " + "    " * 5 + "NX "
USER_2M_PAT = "USR " + "RW " + "    " * 2 + "PSE " + "PAT " + "    " + "NX "
KERNEL_1G = "    " + "RW " + "    " * 2 + "PSE " + "    " * 2 + "NX "
KERNEL_2M_TEXT = "    " + "RW " + "    " * 2 + "PSE " + "    " + "GLB " + "x  "
KERNEL_DATA = "    " + "RW " + "    " * 4 + "GLB " + "NX "


def _builder(mode=FOUR_LEVEL) -> tuple[PhysicalMemory, PageTableBuilder]:
    mem = PhysicalMemory()
    mem.add_zero(AREA, 0x40000)
    return mem, PageTableBuilder(mem, mode, AREA, 0x40000)


def _fixture() -> tuple[PhysicalMemory, PageTableBuilder]:
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x3000, 0x1000, US)
    b.map(0x403000, 0x20000, 0x2000, 0x1000, US | RW | XD)
    b.map(0x600000, 0x200000, 0x200000, 0x200000, US | RW | XD, pat=True)
    b.map(0x40000000, 0x40000000, 0x40000000, 0x40000000, RW | XD)
    b.map(0xFFFFFFFF80000000, 0x1000000, 0x400000, 0x200000, RW | G)
    b.map(0xFFFFFFFF81000000, 0x0, 0x2000, 0x1000, RW | G | XD)
    return mem, b


def _line(start, end, size, flags, level):
    return f"0x{start:016x}-0x{end:016x}   {size:>10} {flags}{level}"


FIXTURE_TEXT = [
    "---[ User Space ]---",
    _line(0x0, 0x400000, "4M", HOLE, "pmd"),
    _line(0x400000, 0x403000, "12K", USER_TEXT, "pte"),
    _line(0x403000, 0x405000, "8K", USER_DATA, "pte"),
    _line(0x405000, 0x600000, "2028K", HOLE, "pte"),
    _line(0x600000, 0x800000, "2M", USER_2M_PAT, "pmd"),
    _line(0x800000, 0x40000000, "1016M", HOLE, "pmd"),
    _line(0x40000000, 0x80000000, "1G", KERNEL_1G, "pud"),
    _line(0x80000000, 0x8000000000, "510G", HOLE, "pud"),
    # 2**64 - 2**47 - 2**39 = 17179737600 GiB: the hole line runs across the non-canonical gap.
    _line(0x8000000000, 0xFFFF800000000000, "17179737600G", HOLE, "pgd"),
    "---[ Kernel Space ]---",
    _line(0xFFFF800000000000, 0xFFFFFF8000000000, "130560G", HOLE, "pgd"),  # 255 * 512G
    _line(0xFFFFFF8000000000, 0xFFFFFFFF80000000, "510G", HOLE, "pud"),
    _line(0xFFFFFFFF80000000, 0xFFFFFFFF80400000, "4M", KERNEL_2M_TEXT, "pmd"),
    _line(0xFFFFFFFF80400000, 0xFFFFFFFF81000000, "12M", HOLE, "pmd"),
    _line(0xFFFFFFFF81000000, 0xFFFFFFFF81002000, "8K", KERNEL_DATA, "pte"),
    _line(0xFFFFFFFF81002000, 0xFFFFFFFF81200000, "2040K", HOLE, "pte"),
    _line(0xFFFFFFFF81200000, 0xFFFFFFFFC0000000, "1006M", HOLE, "pmd"),
    _line(0xFFFFFFFFC0000000, 0x0, "1G", HOLE, "pud"),  # the end, 2**64, prints as 0 like C
]


def test_ptdump_text_matches_hand_derived_lines():
    mem, b = _fixture()
    dump = dump_layout(mem, b.root, FOUR_LEVEL)
    assert dump.anomalies == ()
    assert format_ptdump(dump.ranges, mode=FOUR_LEVEL).splitlines() == FIXTURE_TEXT
    # Linux's own marker (Kernel Space at 1 << 63) gives the same text.
    assert format_ptdump(dump.ranges).splitlines() == FIXTURE_TEXT


def test_ranges_fields():
    mem, b = _fixture()
    ranges = list(iter_mappings(mem, b.root, FOUR_LEVEL, include_holes=False))
    assert ranges == [
        MappingRange(0x400000, 0x403000, PTE, P | US, P | US, 0x10000),
        MappingRange(0x403000, 0x405000, PTE, P | US | RW | XD, P | US | RW | XD, 0x20000),
        MappingRange(0x600000, 0x800000, PDE, P | US | RW | XD | PteFlag.PS | 0x1000,
                     P | US | RW | XD | PteFlag.PS | 0x1000, 0x200000),
        MappingRange(0x40000000, 0x80000000, PDPTE, P | RW | XD | PteFlag.PS,
                     P | RW | XD | PteFlag.PS, 0x40000000),
        MappingRange(0xFFFFFFFF80000000, 0xFFFFFFFF80400000, PDE, P | RW | G | PteFlag.PS,
                     P | RW | G | PteFlag.PS, 0x1000000),
        MappingRange(0xFFFFFFFF81000000, 0xFFFFFFFF81002000, PTE, P | RW | G | XD,
                     P | RW | G | XD, 0x0),
    ]  # fmt: skip


def test_json_round_trip():
    mem, b = _fixture()
    ranges = list(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0x402000, 0x700000)))
    assert json.loads(json.dumps(mappings_to_json(ranges))) == [
        {"start": 0x402000, "end": 0x403000, "size": 0x1000, "present": True, "phys": 0x12000,
         "phys_contiguous": True, "level": "PTE", "ptdump_level": "pte", "flags": ["P", "US"],
         "entry_flags": 0x5, "pkey": 0},
        {"start": 0x403000, "end": 0x405000, "size": 0x2000, "present": True, "phys": 0x20000,
         "phys_contiguous": True, "level": "PTE", "ptdump_level": "pte",
         "flags": ["P", "RW", "US", "XD"], "entry_flags": 0x8000000000000007, "pkey": 0},
        {"start": 0x405000, "end": 0x600000, "size": 0x1FB000, "present": False, "phys": None,
         "phys_contiguous": True, "level": "PTE", "ptdump_level": "pte", "flags": [],
         "entry_flags": 0, "pkey": 0},
        {"start": 0x600000, "end": 0x700000, "size": 0x100000, "present": True,
         "phys": 0x200000, "phys_contiguous": True, "level": "PDE", "ptdump_level": "pmd",
         "flags": ["P", "RW", "US", "PS", "XD", "PAT"], "entry_flags": 0x8000000000001087,
         "pkey": 0},
    ]  # fmt: skip


def test_run_across_two_page_tables_is_one_line():
    mem, b = _builder()
    b.map(0x1FF000, 0x9000, 0x2000, 0x1000, US | RW | XD)  # PT of PD[0] index 511, PD[1] index 0
    text = format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0, 0x400000)))
    assert text.splitlines() == [
        "---[ User Space ]---",
        _line(0x0, 0x1FF000, "2044K", HOLE, "pte"),
        _line(0x1FF000, 0x201000, "8K", USER_DATA, "pte"),
        _line(0x201000, 0x400000, "2044K", HOLE, "pte"),
    ]


def test_physically_discontiguous_runs():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x1000, 0x1000, US)
    b.map(0x401000, 0x30000, 0x1000, 0x1000, US)
    merged = list(iter_mappings(mem, b.root, FOUR_LEVEL, include_holes=False))
    assert merged == [MappingRange(0x400000, 0x402000, PTE, P | US, P | US, 0x10000, False)]
    split = list(
        iter_mappings(mem, b.root, FOUR_LEVEL, include_holes=False, split_discontiguous=True)
    )
    assert split == [
        MappingRange(0x400000, 0x401000, PTE, P | US, P | US, 0x10000, True),
        MappingRange(0x401000, 0x402000, PTE, P | US, P | US, 0x30000, True),
    ]


def test_accessed_bit_splits_lines_like_linux():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x2000, 0x1000, US, where="a")
    b.map(0x402000, 0x12000, 0x1000, 0x1000, US | A, where="b")
    text = format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0x400000, 0x403000)))
    assert text.splitlines() == [
        "---[ User Space ]---",
        _line(0x400000, 0x402000, "8K", USER_TEXT, "pte"),
        _line(0x402000, 0x403000, "4K", USER_TEXT, "pte"),
    ]


def test_effective_permissions_versus_leaf_bits():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x1000, 0x1000, US | RW)
    mem.write_u64(AREA, mem.read_u64(AREA) & ~(US | RW) | XD)  # PML4[0]: supervisor, ro, NX
    (r,) = iter_mappings(mem, b.root, FOUR_LEVEL, include_holes=False)
    assert (r.flags, r.entry_flags) == (P | XD, P | US | RW)
    window = (0x400000, 0x401000)
    leaf = format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=window))
    eff = format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=window), effective=True)
    assert leaf.splitlines()[1] == _line(0x400000, 0x401000, "4K", "USR RW " + "    " * 5 + "x  ",
                                         "pte")  # fmt: skip
    assert eff.splitlines()[1] == _line(0x400000, 0x401000, "4K", "    ro " + "    " * 5 + "NX ",
                                        "pte")  # fmt: skip


def test_markers_split_at_the_next_entry_boundary():
    mem, b = _fixture()
    ranges = iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0, 0x405000))
    text = format_ptdump(ranges, {0: "User Space", 0x100000: "Low", 0x402800: "Mid"})
    assert text.splitlines() == [
        "---[ User Space ]---",
        _line(0x0, 0x200000, "2M", HOLE, "pmd"),  # PD entries: the next one starts at 2M
        "---[ Low ]---",
        _line(0x200000, 0x400000, "2M", HOLE, "pmd"),
        _line(0x400000, 0x403000, "12K", USER_TEXT, "pte"),
        "---[ Mid ]---",
        _line(0x403000, 0x405000, "8K", USER_DATA, "pte"),
    ]


def test_five_level_dump():
    mem, b = _builder(FIVE_LEVEL)
    b.map(0x400000, 0x10000, 0x1000, 0x1000, US | RW | XD)
    b.map(0xFF11000000000000, 0x0, 0x200000, 0x200000, RW | G | XD)
    kernel_2m = "    " + "RW " + "    " * 2 + "PSE " + "    " + "GLB " + "NX "
    text = format_ptdump(iter_mappings(mem, b.root, FIVE_LEVEL), mode=FIVE_LEVEL)
    assert text.splitlines() == [
        "---[ User Space ]---",
        _line(0x0, 0x400000, "4M", HOLE, "pmd"),
        _line(0x400000, 0x401000, "4K", USER_DATA, "pte"),
        _line(0x401000, 0x600000, "2044K", HOLE, "pte"),
        _line(0x600000, 0x40000000, "1018M", HOLE, "pmd"),
        _line(0x40000000, 0x8000000000, "511G", HOLE, "pud"),
        _line(0x8000000000, 0x1000000000000, "261632G", HOLE, "p4d"),  # 2**48 - 2**39
        _line(0x1000000000000, 0xFF00000000000000, "16711424T", HOLE, "pgd"),
        "---[ Kernel Space ]---",
        _line(0xFF00000000000000, 0xFF11000000000000, "4352T", HOLE, "pgd"),  # 0x11 * 256T
        _line(0xFF11000000000000, 0xFF11000000200000, "2M", kernel_2m, "pmd"),
        _line(0xFF11000000200000, 0xFF11000040000000, "1022M", HOLE, "pmd"),
        _line(0xFF11000040000000, 0xFF11008000000000, "511G", HOLE, "pud"),
        _line(0xFF11008000000000, 0xFF12000000000000, "261632G", HOLE, "p4d"),
        _line(0xFF12000000000000, 0x0, "60928T", HOLE, "pgd"),  # 0xee << 48 = 238 * 256T
    ]


def test_va_range_filter_clips():
    mem, b = _fixture()
    ranges = list(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0x401000, 0x404000)))
    assert [(r.start, r.end, r.phys) for r in ranges] == [
        (0x401000, 0x403000, 0x11000),
        (0x403000, 0x404000, 0x20000),
    ]
    upper = list(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0xFFFFFFFF81001000, 1 << 64)))
    assert [(r.start, r.end, r.level.name, r.present) for r in upper] == [
        (0xFFFFFFFF81001000, 0xFFFFFFFF81002000, "PTE", True),
        (0xFFFFFFFF81002000, 0xFFFFFFFF81200000, "PTE", False),
        (0xFFFFFFFF81200000, 0xFFFFFFFFC0000000, "PDE", False),
        (0xFFFFFFFFC0000000, 1 << 64, "PDPTE", False),
    ]
    with pytest.raises(PageTableError, match="empty or not within 64 bits"):
        list(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=(0x5000, 0x5000)))


def test_recursive_slot_terminates_and_is_reported():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x1000, 0x1000, RW)
    mem.write_u64(AREA + 0x1ED * 8, AREA | P | RW)  # Windows' self-map slot
    dump = dump_layout(mem, b.root, FOUR_LEVEL)
    assert dump.anomalies == (
        TableAnomaly(AnomalyKind.RECURSIVE, 0xFFFFF68000000000, PML4E, AREA | 3, AREA),
    )
    assert [(r.start, r.end) for r in dump.ranges if r.present] == [(0x400000, 0x401000)]
    # The self-mapped slot is drawn as unmapped: the kernel half is one hole.
    assert format_ptdump(dump.ranges).splitlines()[-2:] == [
        "---[ Kernel Space ]---",
        _line(0xFFFF800000000000, 0x0, "128T", HOLE, "pgd"),
    ]
    assert str(dump.anomalies[0]) == (
        "recursive: PML4E 0x0000000000100003 in table 0x100000 at va 0xfffff68000000000 "
        "points back to a table on its own walk"
    )


def test_shared_table_is_walked_and_reported_within_budget():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x1000, 0x1000, RW)
    mem.write_u64(AREA + 8, mem.read_u64(AREA))  # PML4[1] shares PML4[0]'s PDPT
    dump = dump_layout(mem, b.root, FOUR_LEVEL)
    assert dump.anomalies == (
        TableAnomaly(AnomalyKind.SHARED, 0x8000000000, PML4E, 0x101007, AREA, True),
    )
    assert [(r.start, r.phys) for r in dump.ranges if r.present] == [
        (0x400000, 0x10000),
        (0x8000400000, 0x10000),
    ]
    assert reverse_map(mem, b.root, FOUR_LEVEL, 0x10008) == [0x400008, 0x8000400008]
    spent = dump_layout(mem, b.root, FOUR_LEVEL, shared_budget=0)
    assert spent.anomalies == (
        TableAnomaly(AnomalyKind.SHARED, 0x8000000000, PML4E, 0x101007, AREA, False),
    )
    assert [r.start for r in spent.ranges if r.present] == [0x400000]


def test_pathological_sharing_is_bounded():
    mem, b = _builder()
    b.map(0x0, 0x0, 0x1000, 0x1000, RW)
    for table in (AREA, AREA + 0x1000, AREA + 0x2000):  # every slot -> the same next table
        entry = mem.read_u64(table)
        mem.write(table, entry.to_bytes(8, "little") * 512)
    # Budget 100: the PD's other 511 slots re-walk the PT (cost 1 each) until the budget
    # is spent; the PD (cost 102) and the PDPT (cost 103) are then never re-walked.
    dump = dump_layout(mem, b.root, FOUR_LEVEL, shared_budget=100)
    present = [r for r in dump.ranges if r.present]
    assert [r.start for r in present] == [i << 21 for i in range(101)]
    assert {r.size for r in present} == {0x1000}
    assert len(dump.anomalies) == 511 + 511 + 511  # PD, PDPT and PML4 slots after the first
    assert sum(a.descended for a in dump.anomalies) == 100
    assert {a.kind for a in dump.anomalies} == {AnomalyKind.SHARED}
    # Default budget 4096: 511 PT re-walks, then 6 PD re-walks at 513 visits each.
    ranges = list(iter_mappings(mem, b.root, FOUR_LEVEL, include_holes=False))
    assert sum(r.size for r in ranges) // 0x1000 == 512 * 7


def test_missing_frames_are_reported_not_raised():
    mem, b = _fixture()
    mem.write_u64(0x102000 + 3 * 8, 0x7000000 | P | RW | US)  # PD[3] -> a frame nobody captured
    dump = dump_layout(mem, b.root, FOUR_LEVEL, va_range=(0x400000, 0x40000000))
    assert dump.anomalies == (
        TableAnomaly(AnomalyKind.MISSING_FRAME, 0x600000, PDE, 0x7000007, 0x102000),
    )
    assert [(r.start, r.end, r.level.name, r.present) for r in dump.ranges] == [
        (0x400000, 0x403000, "PTE", True),
        (0x403000, 0x405000, "PTE", True),
        (0x405000, 0x600000, "PTE", False),
        (0x600000, 0x40000000, "PDE", False),
    ]
    gone = dump_layout(mem, 0x9000000, FOUR_LEVEL)
    assert gone.anomalies == (TableAnomaly(AnomalyKind.MISSING_FRAME, 0, PML4E, 0x9000000, None),)
    assert [(r.start, r.end) for r in gone.ranges] == [
        (0, 0x800000000000),
        (0xFFFF800000000000, 1 << 64),
    ]


def test_reserved_bits_are_reported_and_not_used():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x2000, 0x1000, RW)
    pte = 0x103000
    mem.write_u64(pte + 8, mem.read_u64(pte + 8) | 1 << 45)  # above MAXPHYADDR 40
    mem.write_u64(AREA + 2 * 8, 0x104000 | P | PteFlag.PS)  # PS is reserved in a PML4E
    dump = dump_layout(mem, b.root, FOUR_LEVEL, maxphyaddr=40)
    assert dump.anomalies == (
        TableAnomaly(AnomalyKind.RESERVED_BITS, 0x401000, PTE, 0x200000011003, pte),
        TableAnomaly(AnomalyKind.RESERVED_BITS, 0x10000000000, PML4E, 0x104081, AREA),
    )
    assert [(r.start, r.end) for r in dump.ranges if r.present] == [(0x400000, 0x401000)]
    # With MAXPHYADDR 52 bit 45 is an address bit: the page maps 0x200000011000.
    wide = dump_layout(mem, b.root, FOUR_LEVEL, split_discontiguous=True)
    assert [r.phys for r in wide.ranges if r.present] == [0x10000, 0x200000011000]


def test_reverse_map_through_every_page_size():
    mem, b = _builder()
    b.map(0x400000, 0x10000, 0x1000, 0x1000, US)
    b.map(0x600000, 0x0, 0x200000, 0x200000, US)
    b.map(0x40000000, 0x0, 0x40000000, 0x40000000, RW)
    b.map(0xFFFFFFFF80000000, 0x0, 0x200000, 0x200000, RW | G)
    assert reverse_map(mem, b.root, FOUR_LEVEL, 0x10123) == [
        0x400123,
        0x610123,
        0x40010123,
        0xFFFFFFFF80010123,
    ]
    assert reverse_map(mem, b.root, FOUR_LEVEL, 0x7FFF0000) == []
    with pytest.raises(PageTableError):
        reverse_map(mem, b.root, FOUR_LEVEL, 1 << 52)


def test_mapped_line_stops_at_the_non_canonical_hole():
    mem, b = _builder()
    b.map(0x7FFFFFFFF000, 0x10000, 0x1000, 0x1000, US | RW | XD)
    assert format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL)).splitlines() == [
        "---[ User Space ]---",
        _line(0x0, 0x7F8000000000, "130560G", HOLE, "pgd"),
        _line(0x7F8000000000, 0x7FFFC0000000, "511G", HOLE, "pud"),
        _line(0x7FFFC0000000, 0x7FFFFFE00000, "1022M", HOLE, "pmd"),
        _line(0x7FFFFFE00000, 0x7FFFFFFFF000, "2044K", HOLE, "pte"),
        _line(0x7FFFFFFFF000, 0x800000000000, "4K", USER_DATA, "pte"),
        "---[ Kernel Space ]---",
        _line(0xFFFF800000000000, 0x0, "128T", HOLE, "pgd"),
    ]


@pytest.mark.parametrize("mode", [FOUR_LEVEL, FIVE_LEVEL], ids=["4-level", "5-level"])
def test_dump_agrees_with_the_batch_walker_on_random_tables(mode):
    """Independent oracle: the other walker (batch.translate_many) on every range edge."""

    rng = random.Random(7)
    mem = PhysicalMemory()
    mem.add_zero(AREA, 0x400000)
    b = PageTableBuilder(mem, mode, AREA, 0x400000)
    top = 1 << (mode.va_bits - 1)
    for n in range(300):
        page = rng.choice((0x1000, 0x1000, 0x200000, 0x40000000))
        count = rng.randint(1, 40 if page == 0x1000 else 3)
        va = rng.randrange(0, top, page) if n % 2 else (1 << 64) - rng.randrange(page, top, page)
        flags = rng.choice((0, RW, US, US | RW, RW | XD, US | RW | XD, G | RW, A | US))
        try:
            b.map(va, rng.randrange(0, 1 << 40, page), count * page, page, flags,
                  pkey=rng.randrange(16), pat=rng.random() < 0.2)  # fmt: skip
        except PageTableError:
            continue  # overlaps an earlier mapping or runs into the hole
    ranges = list(iter_mappings(mem, b.root, mode, split_discontiguous=True))
    assert ranges[0].start == 0 and ranges[-1].end == 1 << 64
    vas, expect = [], []
    for r in ranges:
        for va in {r.start, r.end - 1, r.start + (r.size // 2 & ~0xFFF)}:
            vas.append(va)
            expect.append(r.phys + va - r.start if r.present else None)
    cpu = CpuPagingState.from_registers(
        cr0=CR0.PG | CR0.PE, cr3=b.root, cr4=CR4.PAE | (CR4.LA57 if mode is FIVE_LEVEL else 0),
        efer=EFER.LME | EFER.LMA | EFER.NXE,
    )  # fmt: skip
    got = translate_many(mem, np.array(vas, dtype=np.uint64), cpu)
    assert [int(p) if ok else None for p, ok in zip(got.phys, got.ok, strict=True)] == expect
    present = [i for i, e in enumerate(expect) if e is not None]
    assert len(present) > 300
    flags = [next(r for r in ranges if r.start <= vas[i] < r.end).flags for i in present]
    assert got.writable[present].tolist() == [bool(f & RW) for f in flags]
    assert got.user[present].tolist() == [bool(f & US) for f in flags]
    assert got.executable[present].tolist() == [not f & XD for f in flags]


def test_markers_for_a_filtered_dump_and_no_markers():
    mem, b = _fixture()
    window = (0xFFFFFFFF81000000, 0xFFFFFFFF81002000)
    assert format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=window)).splitlines() == [
        "---[ Kernel Space ]---",
        _line(0xFFFFFFFF81000000, 0xFFFFFFFF81002000, "8K", KERNEL_DATA, "pte"),
    ]
    window = (0x400000, 0x403000)
    assert format_ptdump(iter_mappings(mem, b.root, FOUR_LEVEL, va_range=window), {}) == (
        _line(0x400000, 0x403000, "12K", USER_TEXT, "pte") + "\n"
    )
    assert format_ptdump([]) == ""
