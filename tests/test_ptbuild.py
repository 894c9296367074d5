"""Page-table builder: raw entries checked against bits computed by hand from the SDM.

Entry layouts: SDM vol. 3A Tables 4-15 (PML4E), 4-16/4-17 (PDPTE), 4-18/4-19 (PDE),
4-20 (PTE): P bit 0, R/W 1, U/S 2, PS 7 (PAT in a PTE), G 8, PAT 12 in a large
leaf, protection key 62:59, XD 63.
"""

from __future__ import annotations

import pytest

from kctx_debug.buildspec import MappingSpec, PageTableSpec
from kctx_debug.errors import PageTableError
from kctx_debug.pagetables.build import PageTableBuilder, build_page_tables
from kctx_debug.pagetables.entry import FIVE_LEVEL, FOUR_LEVEL, Level, PagingMode, PteFlag
from kctx_debug.physmem import PhysicalMemory

AREA = 0x100000
RW, US, G, XD = PteFlag.RW, PteFlag.US, PteFlag.G, PteFlag.XD


def _mem() -> PhysicalMemory:
    mem = PhysicalMemory()
    mem.add_zero(AREA, 0x20000)  # 32 table frames; mapped PAs need not be backed
    return mem


def _spec(*mappings: MappingSpec, levels: int = 4, size: int = 0x20000) -> PageTableSpec:
    named = tuple(
        MappingSpec(m.va, m.pa, m.size, m.page_size, m.flags, m.pkey, m.pat,
                    f"build.page_tables.mappings[{i}]")
        for i, m in enumerate(mappings)
    )  # fmt: skip
    return PageTableSpec(levels, AREA, size, named)


def _m(va, pa, size, page_size=0x1000, flags=0, pkey=0, pat=False) -> MappingSpec:
    return MappingSpec(va, pa, size, page_size, flags, pkey, pat)


def test_4k_leaf_with_pat_pkey_and_xd():
    mem = _mem()
    built = build_page_tables(mem, _spec(_m(0x400000, 0x1234000, 0x1000, flags=RW | US | XD,
                                            pkey=5, pat=True)))  # fmt: skip
    assert built.root == AREA
    assert built.frames_used == (0x100000, 0x101000, 0x102000, 0x103000)
    # Intermediate entries: frame | P|RW|US = 0x7, nothing else.
    assert mem.read_u64(0x100000 + 0 * 8) == 0x101007  # PML4[0]
    assert mem.read_u64(0x101000 + 0 * 8) == 0x102007  # PDPT[0]
    assert mem.read_u64(0x102000 + 2 * 8) == 0x103007  # PD[2]: 0x400000 >> 21 = 2
    pte = mem.read_u64(0x103000)
    # 0x1234000 | P 0x1 | RW 0x2 | US 0x4 | PAT(bit 7) 0x80 | pkey 5 << 59 | XD 1 << 63
    assert pte == 0xA800000001234087
    assert (pte >> 59) & 0xF == 5
    assert mem.read_u64(0x103008) == 0  # one page only


def test_2m_kernel_pages_put_pat_at_bit_12():
    mem = _mem()
    build_page_tables(mem, _spec(_m(0xFFFFFFFF80000000, 0x40000000, 0x400000, 0x200000,
                                    flags=RW | G, pat=True)))  # fmt: skip
    # 0xffffffff80000000: PML4 index 511, PDPT index 510, PD index 0.
    assert mem.read_u64(0x100000 + 511 * 8) == 0x101007
    assert mem.read_u64(0x101000 + 510 * 8) == 0x102007
    # 0x40000000 | P | RW | PS 0x80 | G 0x100 | PAT 0x1000
    assert mem.read_u64(0x102000) == 0x40001183
    assert mem.read_u64(0x102008) == 0x40201183
    assert mem.read_u64(0x102010) == 0


def test_1g_page_sets_ps_in_the_pdpte():
    mem = _mem()
    build_page_tables(mem, _spec(_m(0x40000000, 0x80000000, 0x40000000, 0x40000000, flags=XD)))
    assert mem.read_u64(0x100000) == 0x101007
    assert mem.read_u64(0x101000 + 1 * 8) == 0x8000000080000081  # XD | pa | PS | P


def test_five_level_build():
    mem = _mem()
    built = build_page_tables(
        mem,
        _spec(_m(0x0001000000000000, 0x5000, 0x1000, flags=RW),
              _m(0xFF11000000000000, 0x200000, 0x200000, 0x200000, flags=RW | G),
              levels=5),
    )  # fmt: skip
    assert built.mode is FIVE_LEVEL
    # va 2**48: PML5 index 1, then index 0 at every level.
    assert mem.read_u64(0x100000 + 1 * 8) == 0x101007
    assert mem.read_u64(0x101000) == 0x102007
    assert mem.read_u64(0x102000) == 0x103007
    assert mem.read_u64(0x103000) == 0x104007
    assert mem.read_u64(0x104000) == 0x5003
    # 0xff11000000000000: PML5 index 0x111 = 273 (Linux's LA57 direct map).
    assert mem.read_u64(0x100000 + 273 * 8) == 0x105007
    assert mem.read_u64(0x105000) == 0x106007
    assert mem.read_u64(0x106000) == 0x107007
    assert mem.read_u64(0x107000) == 0x200183
    with pytest.raises(PageTableError, match="is not canonical for 4-level paging"):
        build_page_tables(_mem(), _spec(_m(0x0001000000000000, 0x5000, 0x1000)))


def test_builds_are_deterministic_and_zero_their_frames():
    spec = _spec(
        _m(0x400000, 0x10000, 0x5000, flags=US),
        _m(0x7FFFFFE00000, 0x600000, 0x200000, 0x200000, flags=US | RW | XD),
        _m(0xFFFFFFFF81000000, 0x1000000, 0x800000, 0x200000, flags=RW | G),
    )
    images = []
    for garbage in (0x00, 0xA5):
        mem = _mem()
        mem.write(AREA, bytes([garbage]) * 0x20000)  # tables must not inherit old bytes
        built = build_page_tables(mem, spec)
        used = len(built.frames_used) * 0x1000
        images.append((built.frames_used, mem.read(AREA, used)))
    assert images[0] == images[1]
    assert images[0][0] == tuple(AREA + i * 0x1000 for i in range(8))


def test_contiguous_run_spanning_two_page_tables():
    mem = _mem()
    build_page_tables(mem, _spec(_m(0x1FF000, 0x9000, 0x2000, flags=RW)))
    assert mem.read_u64(0x102000 + 0 * 8) == 0x103007
    assert mem.read_u64(0x102000 + 1 * 8) == 0x104007
    assert mem.read_u64(0x103000 + 511 * 8) == 0x9003
    assert mem.read_u64(0x104000 + 0 * 8) == 0xA003


M = "build.page_tables.mappings"


@pytest.mark.parametrize(
    ("mappings", "message"),
    [
        ([_m(0x1234, 0, 0x200000, 0x200000)],
         f"{M}[0]: va 0x1234 is not aligned to its 2M page size"),
        ([_m(0x200000, 0x1000, 0x200000, 0x200000)],
         f"{M}[0]: pa 0x1000 is not aligned to its 2M page size"),
        ([_m(0x1000, 0x1000, 0x1800)],
         f"{M}[0]: size 0x1800 is not a positive multiple of its 4K page size"),
        ([_m(0x1000, 0x1000, 0)],
         f"{M}[0]: size 0x0 is not a positive multiple of its 4K page size"),
        ([_m(0x3000, 0x3000, 0x3000, 0x3000)], f"{M}[0]: page size 0x3000 is not 4K, 2M or 1G"),
        ([_m(0x800000000000, 0, 0x1000)],
         f"{M}[0]: va 0x800000000000 is not canonical for 4-level paging"),
        ([_m(0x7FFFFFFFF000, 0, 0x2000)],
         f"{M}[0]: range 0x7ffffffff000-0x800000001000 runs into the non-canonical hole "
         "of 4-level paging"),
        ([_m(0x1000, (1 << 52) - 0x1000, 0x2000)],
         f"{M}[0]: pa range 0xffffffffff000+0x2000 exceeds 52 physical address bits"),
        ([_m(0x1000, 0, 0x1000, flags=0x80)],
         f"{M}[0]: flags 0x80 set bits the builder places itself or that are not leaf flags "
         "(0x80: PS/PAT, address or pkey bits)"),
        ([_m(0x1000, 0, 0x1000, pkey=16)], f"{M}[0]: pkey 16 is not between 0 and 15"),
        ([_m(0x400000, 0x1000, 0x1000), _m(0x400000, 0x2000, 0x1000)],
         f"{M}[1]: va 0x400000 is already mapped by {M}[0]"),
        ([_m(0x400000, 0x1000, 0x1000), _m(0x400000, 0x200000, 0x200000, 0x200000)],
         f"{M}[1]: 2M page at va 0x400000 would replace the page table already mapping "
         f"0x400000-0x600000 by {M}[0]"),
        ([_m(0x400000, 0x200000, 0x200000, 0x200000), _m(0x401000, 0x1000, 0x1000)],
         f"{M}[1]: va 0x401000 lies inside the 2M page at 0x400000 that is already mapped "
         f"by {M}[0]"),
        ([_m(0x0, 0x0, 0x40000000, 0x40000000), _m(0x200000, 0, 0x200000, 0x200000)],
         f"{M}[1]: va 0x200000 lies inside the 1G page at 0x0 that is already mapped by {M}[0]"),
    ],
)  # fmt: skip
def test_errors_name_the_mapping(mappings, message):
    with pytest.raises(PageTableError) as info:
        build_page_tables(_mem(), _spec(*mappings))
    assert str(info.value) == message


def test_table_area_errors():
    with pytest.raises(PageTableError) as info:
        build_page_tables(_mem(), _spec(_m(0x400000, 0, 0x1000), size=0x3000))
    assert str(info.value) == (f"{M}[0]: table area 0x100000+0x3000 is exhausted (3 frames used)")
    # The area runs past the backed memory: the second frame is not backed.
    with pytest.raises(PageTableError) as info:
        build_page_tables(
            _mem(), PageTableSpec(4, 0x11F000, 0x4000, _spec(_m(0x400000, 0, 0x1000)).mappings)
        )
    assert str(info.value) == f"{M}[0]: table frame 0x120000 is not backed by physical memory"
    with pytest.raises(PageTableError) as info:
        build_page_tables(_mem(), PageTableSpec(4, 0x200000, 0x4000, ()))
    assert str(info.value) == (
        "build.page_tables: table frame 0x200000 is not backed by physical memory"
    )
    with pytest.raises(PageTableError) as info:
        build_page_tables(_mem(), PageTableSpec(3, AREA, 0x4000, ()))
    assert str(info.value) == "build.page_tables.levels: expected 4 or 5, got 3"


def test_builder_api_and_a_mode_without_1g_pages():
    mem = _mem()
    b = PageTableBuilder(mem, FOUR_LEVEL, AREA, 0x8000)
    b.map(0xFFFF888000000000, 0x0, 0x2000, 0x1000, RW | XD, where="direct map")
    assert b.root == AREA
    assert mem.read_u64(0x103000 + 8) == 0x8000000000001003
    with pytest.raises(PageTableError) as info:
        b.map(0xFFFF888000001000, 0x5000, 0x1000, 0x1000, RW, where="again")
    assert str(info.value) == "again: va 0xffff888000001000 is already mapped by direct map"
    levels = FOUR_LEVEL.levels
    no_1g = PagingMode("no-1G", (levels[0], Level("PDPTE", "pud", 30, False), *levels[2:]))
    b = PageTableBuilder(_mem(), no_1g, AREA, 0x8000)
    with pytest.raises(PageTableError) as info:
        b.map(0x40000000, 0, 0x40000000, 0x40000000, RW, where="huge")
    assert str(info.value) == "huge: no-1G paging cannot map 1G pages"
    with pytest.raises(PageTableError) as info:
        PageTableBuilder(_mem(), FOUR_LEVEL, AREA + 0x10, 0x8000)
    assert str(info.value) == (
        "page_tables: table area 0x100010+0x8000 is not a non-empty, 4 KiB-aligned range"
    )
