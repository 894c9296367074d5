"""Materialize a snapshot's declarative page-table mappings into physical memory.

The builder allocates table frames from one physical area, in order (the root
first), zeroing each, so the same spec always yields the same bytes.

Intermediate entries are ``P|RW|US``: permissive, so that the leaf entry alone
decides access. The effective rights of a page are the AND of R/W and U/S along
the walk and the OR of XD (SDM vol. 3A 4.6.1), so permissive upper levels pass
the leaf's permissions through unchanged; Linux builds its tables the same way.

>>> mem = PhysicalMemory(); _ = mem.add_zero(0, 0x100000)
>>> b = PageTableBuilder(mem, paging_mode(la57=False), 0x10000, 0x10000)
>>> b.map(0xffffffff80000000, 0x200000, 0x200000, 0x200000, PteFlag.RW | PteFlag.G)
>>> hex(b.root), len(b.frames_used)
('0x10000', 3)

Errors raise :class:`~kctx_debug.errors.PageTableError` whose message starts with
the mapping's ``where`` (``build.page_tables.mappings[3]: va 0x1234 is not
aligned to its 2M page size``). A failed :meth:`PageTableBuilder.map` may leave
the tables it already wrote; a failed build is meant to be discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..buildspec import PageTableSpec
from ..errors import PageTableError, UnbackedMemoryError
from ..physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .entry import (
    ADDRESS_MASK,
    INDEX_MASK,
    PAT_4K,
    PAT_LARGE,
    PKEY_MASK,
    PKEY_SHIFT,
    PagingMode,
    PteFlag,
    paging_mode,
)

__all__ = ["TABLE_ENTRY_FLAGS", "BuiltTables", "PageTableBuilder", "build_page_tables"]

_ENTRIES = INDEX_MASK + 1  # per table
# Every non-leaf entry the builder writes (see the module docstring).
TABLE_ENTRY_FLAGS = PteFlag.P | PteFlag.RW | PteFlag.US
# Leaf bits a caller may ask for; P is implied, PS/PAT/pkey/address are placed by the
# builder (SDM vol. 3A Tables 4-17, 4-19, 4-20).
_CALLER_FLAGS = (
    PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.PWT | PteFlag.PCD | PteFlag.A | PteFlag.D
    | PteFlag.G | PteFlag.AVL9 | PteFlag.AVL10 | PteFlag.AVL11 | PteFlag.AVL52 | PteFlag.AVL53
    | PteFlag.AVL54 | PteFlag.AVL55 | PteFlag.AVL56 | PteFlag.AVL57 | PteFlag.AVL58 | PteFlag.XD
)  # fmt: skip
# The page sizes IA-32e paging can map (SDM vol. 3A 4.5), as errors name them.
_PAGE_SIZES = {1 << 12: "4K", 1 << 21: "2M", 1 << 30: "1G"}


@dataclass(frozen=True)
class BuiltTables:
    """What :func:`build_page_tables` wrote: the root table and every frame it used."""

    root: int
    frames_used: tuple[int, ...]  # physical addresses, in allocation order
    mode: PagingMode


def _fail(where: str, message: str) -> PageTableError:
    return PageTableError(f"{where}: {message}" if where else message)


class PageTableBuilder:
    """Writes 4-/5-level page tables into ``mem``, allocating from one table area.

    :param table_base: physical address of the area; its first frame becomes the root.
    :raises PageTableError: the area is misaligned, empty, or its first frame is unbacked.
    """

    def __init__(
        self,
        mem: PhysicalMemory,
        mode: PagingMode,
        table_base: int,
        table_size: int,
        *,
        where: str = "page_tables",
    ) -> None:
        if table_base < 0 or table_base % PAGE_SIZE or table_size <= 0 or table_size % PAGE_SIZE:
            raise _fail(
                where,
                f"table area {table_base:#x}+{table_size:#x} is not a non-empty, "
                f"4 KiB-aligned range",
            )
        self.mem = mem
        self.mode = mode
        self.table_base = table_base
        self.table_size = table_size
        self._next = table_base
        self._mapped: list[tuple[int, int, str]] = []  # (va, end, where): names earlier mappings
        self.root = self._alloc(where)

    @property
    def frames_used(self) -> tuple[int, ...]:
        """Physical addresses of the table frames allocated so far, in order."""
        return tuple(range(self.table_base, self._next, PAGE_SIZE))

    def _alloc(self, where: str) -> int:
        if self._next >= self.table_base + self.table_size:
            raise _fail(
                where,
                f"table area {self.table_base:#x}+{self.table_size:#x} is exhausted "
                f"({(self._next - self.table_base) // PAGE_SIZE} frames used)",
            )
        address = self._next
        try:
            self.mem.write(address, bytes(PAGE_SIZE))  # also marks the region modified
        except UnbackedMemoryError:
            raise _fail(
                where, f"table frame {address:#x} is not backed by physical memory"
            ) from None
        self._next += PAGE_SIZE
        return address

    # -- mapping ------------------------------------------------------------------

    def map(
        self,
        va: int,
        pa: int,
        size: int,
        page_size: int,
        flags: int,
        pkey: int = 0,
        pat: bool = False,
        where: str = "",
    ) -> None:
        """Map ``[va, va+size)`` to ``[pa, pa+size)`` with ``page_size`` pages.

        :param flags: leaf ``PteFlag`` bits (P is implied; PS, PAT and the pkey are placed here).
        :raises PageTableError: naming ``where``; see the module docstring.
        """
        depth = self._check(va, pa, size, page_size, flags, pkey, where)
        level = self.mode.levels[depth]
        large = depth != len(self.mode.levels) - 1
        leaf = int(flags) | PteFlag.P | (pkey << PKEY_SHIFT)
        if large:
            leaf |= PteFlag.PS | (PAT_LARGE if pat else 0)
        elif pat:
            leaf |= PAT_4K
        end = va + size
        while va < end:
            table = self._table_for(va, depth, where)
            first = self.mode.index(va, depth)
            count = min(_ENTRIES - first, (end - va) // page_size)
            slots = self.mem.frame(table // PAGE_SIZE)[first : first + count]
            used = np.flatnonzero(slots)
            if used.size:
                at = va + int(used[0]) * page_size
                raise self._conflict(int(slots[used[0]]), at, level.page_size, large, where)
            slots[:] = np.arange(count, dtype=np.uint64) * np.uint64(page_size) + np.uint64(
                pa | leaf
            )
            va += count * page_size
            pa += count * page_size
        self._mapped.append((end - size, end, where))

    def _check(
        self, va: int, pa: int, size: int, page_size: int, flags: int, pkey: int, where: str
    ) -> int:
        """Validate one request; returns the depth of the level its leaves live at."""
        if page_size not in _PAGE_SIZES:
            raise _fail(where, f"page size {page_size:#x} is not 4K, 2M or 1G")
        name = _PAGE_SIZES[page_size]
        depth = next(
            (i for i, lv in enumerate(self.mode.levels) if lv.page_size == page_size), None
        )
        last = len(self.mode.levels) - 1
        if depth is None or (depth != last and not self.mode.levels[depth].large_pages):
            raise _fail(where, f"{self.mode.name} paging cannot map {name} pages")
        if size <= 0 or size % page_size:
            raise _fail(where, f"size {size:#x} is not a positive multiple of its {name} page size")
        if va < 0 or va % page_size:
            raise _fail(where, f"va {va:#x} is not aligned to its {name} page size")
        if pa < 0 or pa % page_size:
            raise _fail(where, f"pa {pa:#x} is not aligned to its {name} page size")
        last_va = va + size - 1
        if not self.mode.is_canonical(va) or va >> 64:
            raise _fail(where, f"va {va:#x} is not canonical for {self.mode.name} paging")
        if last_va >> 64 or not self.mode.is_canonical(last_va) or (va ^ last_va) >> 63:
            raise _fail(
                where,
                f"range {va:#x}-{last_va + 1:#x} runs into the non-canonical hole "
                f"of {self.mode.name} paging",
            )
        if pa + size > 1 << MAX_PHYS_BITS:
            raise _fail(
                where, f"pa range {pa:#x}+{size:#x} exceeds {MAX_PHYS_BITS} physical address bits"
            )
        if flags & ~_CALLER_FLAGS:
            raise _fail(
                where,
                f"flags {flags:#x} set bits the builder places itself or that are not "
                f"leaf flags ({flags & ~_CALLER_FLAGS:#x}: PS/PAT, address or pkey bits)",
            )
        if not 0 <= pkey <= PKEY_MASK >> PKEY_SHIFT:
            raise _fail(where, f"pkey {pkey} is not between 0 and {PKEY_MASK >> PKEY_SHIFT}")
        return depth

    def _table_for(self, va: int, depth: int, where: str) -> int:
        """Physical address of the table holding ``va``'s entry at ``depth``, creating tables."""
        table = self.root
        for d in range(depth):
            level = self.mode.levels[d]
            frame = self.mem.frame(table // PAGE_SIZE)
            i = self.mode.index(va, d)
            entry = int(frame[i])
            if entry == 0:
                child = self._alloc(where)
                frame[i] = child | TABLE_ENTRY_FLAGS
                table = child
            elif not entry & PteFlag.P or (level.large_pages and entry & PteFlag.PS):
                base = va & ~(level.page_size - 1)
                raise _fail(
                    where,
                    f"va {va:#x} lies inside the {_PAGE_SIZES[level.page_size]} page "
                    f"at {base:#x} that is already mapped{self._owner(base, level.page_size)}",
                )
            else:
                table = entry & ADDRESS_MASK
        return table

    def _conflict(
        self, entry: int, va: int, page_size: int, large: bool, where: str
    ) -> PageTableError:
        name = _PAGE_SIZES[page_size]
        if large and entry & PteFlag.P and not entry & PteFlag.PS:
            return _fail(
                where,
                f"{name} page at va {va:#x} would replace the page table already mapping "
                f"{va:#x}-{va + page_size:#x}{self._owner(va, page_size)}",
            )
        return _fail(where, f"va {va:#x} is already mapped{self._owner(va, page_size)}")

    def _owner(self, va: int, size: int) -> str:
        for start, end, name in self._mapped:
            if start < va + size and va < end and name:
                return f" by {name}"
        return ""


def build_page_tables(mem: PhysicalMemory, spec: PageTableSpec) -> BuiltTables:
    """Write ``spec``'s tables into ``mem``; the root is ``spec.table_base``.

    :raises PageTableError: naming the offending mapping (its ``where``) or the table area.
    """
    if spec.levels not in (4, 5):
        raise _fail("build.page_tables.levels", f"expected 4 or 5, got {spec.levels}")
    mode = paging_mode(spec.levels == 5)
    builder = PageTableBuilder(
        mem, mode, spec.table_base, spec.table_size, where="build.page_tables"
    )
    for i, m in enumerate(spec.mappings):
        where = m.where or f"build.page_tables.mappings[{i}]"
        builder.map(m.va, m.pa, m.size, m.page_size, m.flags, m.pkey, m.pat, where)
    return BuiltTables(builder.root, builder.frames_used, mode)
