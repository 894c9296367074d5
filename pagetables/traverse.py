"""The vectorized page-table traversal under the layout dump and the reverse map.

Each page-table page is read as one numpy array of 512 entries; present/leaf
detection, reserved bits and effective permissions are array operations, and
Python only loops over the entries it descends into. Non-present entries are
skipped at the highest level where they occur and the non-canonical hole is
jumped. The traversal yields :class:`TableSegment` runs of entries in VA order.

Anomalies never stop the walk; they are collected as :class:`TableAnomaly` and
the span the entry covers is reported as unmapped:

- ``recursive``: the entry points to a table already on the current path
  (Windows' self-map, a PML4 slot pointing to the PML4 itself);
- ``shared``: the table was already walked from another slot; it is walked again
  (kernel tables are legitimately shared) until ``shared_budget`` table visits are
  spent, after which it is reported with ``descended=False`` and skipped;
- ``missing-frame``: the table frame is not in the snapshot;
- ``reserved-bits``: a present entry sets bits that must be 0, so the CPU would
  fault (#PF with RSVD) instead of using it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from ..errors import PageTableError, UnbackedMemoryError
from ..physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .entry import ADDRESS_MASK, INDEX_MASK, PAT_LARGE, Level, PagingMode, PteFlag, reserved_mask

__all__ = [
    "DEFAULT_SHARED_BUDGET",
    "AnomalyKind",
    "TableAnomaly",
    "TableSegment",
    "TableTraversal",
    "iter_segments",
]

_U64 = (1 << 64) - 1
_ENTRIES = INDEX_MASK + 1  # per table
_P, _RW, _US, _PS, _XD = (
    np.uint64(f) for f in (PteFlag.P, PteFlag.RW, PteFlag.US, PteFlag.PS, PteFlag.XD)
)
# Linux's PTE_FLAGS_MASK: everything but address bits 51:12 is "prot".
_FLAGS_MASK = np.uint64(_U64 & ~ADDRESS_MASK)
_PAT_LARGE = np.uint64(PAT_LARGE)
DEFAULT_SHARED_BUDGET = 4096


class AnomalyKind(Enum):
    """Why an entry was not simply followed; see the module docstring."""

    RECURSIVE = "recursive"
    SHARED = "shared"
    MISSING_FRAME = "missing-frame"
    RESERVED_BITS = "reserved-bits"


@dataclass(frozen=True)
class TableAnomaly:
    """An entry the walk did not (or not only once) follow; see the module docstring."""

    kind: AnomalyKind
    va: int  # first VA the entry covers
    level: Level  # the level of the entry
    entry: int  # its raw value (for a missing root: the root address)
    table: int | None  # physical address of the table holding it (None: the root itself)
    descended: bool = False

    def __str__(self) -> str:
        where = f"in table {self.table:#x}" if self.table is not None else "as the root"
        what = {
            AnomalyKind.RECURSIVE: "points back to a table on its own walk",
            AnomalyKind.SHARED: "points to a table already walked"
            + ("" if self.descended else " (sharing budget spent: skipped)"),
            AnomalyKind.MISSING_FRAME: "points to a frame the snapshot does not hold",
            AnomalyKind.RESERVED_BITS: "sets reserved bits",
        }[self.kind]
        return (
            f"{self.kind.value}: {self.level.name} {self.entry:#018x} {where} "
            f"at va {self.va:#x} {what}"
        )

    def to_json(self) -> dict:
        return {
            "kind": self.kind.value,
            "va": self.va,
            "level": self.level.name,
            "entry": self.entry,
            "table": self.table,
            "descended": self.descended,
        }


@dataclass(eq=False)
class TableSegment:
    """Entries ``[lo, hi)`` of one table, none of them a table to descend into.

    The arrays cover the whole table and are shared by its segments: ``leaf`` marks
    entries that map a page, ``prot`` their non-address bits (0 for anomalies),
    ``eff`` the effective RW/US/XD of leaves, ``phys`` the base of each leaf's page.
    """

    table: int
    depth: int
    level: Level
    base: int  # VA of entry 0
    lo: int
    hi: int
    leaf: np.ndarray
    prot: np.ndarray
    eff: np.ndarray
    phys: np.ndarray

    def va(self, index: int) -> int:
        return self.base + (index << self.level.shift)


def _reserved(e: np.ndarray, level: Level, last: bool, maxphyaddr: int) -> np.ndarray:
    """Which entries set a bit :func:`reserved_mask` reserves (the rule depends on PS).

    XD is never reserved here: a layout dump has no EFER.NXE to go by.
    """
    with_ps, without_ps = (
        np.uint64(reserved_mask(level, last=last, ps=ps, maxphyaddr=maxphyaddr, nxe=True))
        for ps in (True, False)
    )
    return e & np.where(e & _PS != 0, with_ps, without_ps) != 0


class TableTraversal:
    """One traversal: the visited tables, the anomaly sink and the sharing budget.

    ``start``/``end`` hold the checked ``va_range`` (default: all 2**64 addresses);
    :meth:`segments` runs the walk from a root table. A table met again from another
    slot costs the number of table visits its first walk made; it is walked again
    when that fits in the budget. Inside such a re-walk each slot repeats the
    decision of the first walk, so the cost is exact.
    """

    def __init__(
        self,
        mem: PhysicalMemory,
        mode: PagingMode,
        maxphyaddr: int,
        va_range: tuple[int, int] | None,
        anomalies: list[TableAnomaly] | None,
        shared_budget: int,
    ) -> None:
        if not 12 < maxphyaddr <= MAX_PHYS_BITS:
            raise PageTableError(f"MAXPHYADDR {maxphyaddr} is not between 13 and {MAX_PHYS_BITS}")
        start, end = va_range if va_range is not None else (0, 1 << 64)
        if not 0 <= start < end <= 1 << 64:
            raise PageTableError(f"VA range {start:#x}-{end:#x} is empty or not within 64 bits")
        self.mem, self.mode, self.start, self.end = mem, mode, start, end
        self.addr_mask = ADDRESS_MASK & ((1 << maxphyaddr) - 1)
        self.maxphyaddr = maxphyaddr
        self.anomalies = anomalies if anomalies is not None else []
        self.budget = shared_budget
        self.visits = 0
        self.sizes: dict[int, int] = {}  # table -> visits its first walk made
        self.followed: dict[tuple[int, int], bool] = {}  # (table, index) -> descended?

    def segments(self, root: int) -> Iterator[TableSegment | None]:
        """Segments in VA order; ``None`` marks the non-canonical hole."""
        top = self.mode.levels[0]
        root &= self.addr_mask
        try:
            entries = self.mem.frame(root // PAGE_SIZE)
        except UnbackedMemoryError:
            self.anomalies.append(TableAnomaly(AnomalyKind.MISSING_FRAME, 0, top, root, None))
            entries = np.zeros(_ENTRIES, dtype=np.uint64)  # report the whole space unmapped
        eff = np.uint64(PteFlag.RW | PteFlag.US)
        half = _ENTRIES // 2  # the top level's upper half is the kernel's, sign-extended
        yield from self._table(root, entries, 0, 0, 0, half, eff, (root,), False)
        yield None
        upper = (1 << 64) - (1 << self.mode.va_bits)  # base + half << shift = upper half
        yield from self._table(root, entries, 0, upper, half, _ENTRIES, eff, (root,), False)

    def _table(
        self, table, e, depth, base, lo, hi, eff_in, path, in_shared
    ) -> Iterator[TableSegment]:
        level = self.mode.levels[depth]
        shift = level.shift
        if self.start > base:
            lo = max(lo, (self.start - base) >> shift)
        hi = min(hi, max(0, -((base - self.end) >> shift)))  # ceil((end - base) / size)
        if lo >= hi:
            return
        first_visit = self.visits
        self.visits += 1
        last = depth == len(self.mode.levels) - 1
        usable = e & _P != 0
        rsv = usable & _reserved(e, level, last, self.maxphyaddr)
        usable &= ~rsv
        if last:
            leaf = usable
        elif level.large_pages:
            leaf = usable & (e & _PS != 0)
        else:
            leaf = np.zeros(_ENTRIES, dtype=bool)
        eff = np.where(leaf, (eff_in & e & (_RW | _US)) | ((eff_in | e) & _XD), np.uint64(0))
        prot = e & _FLAGS_MASK
        if level.large_pages:
            prot |= np.where(leaf, e & _PAT_LARGE, np.uint64(0))
        prot[rsv] = 0  # what the CPU would not use is shown unmapped
        leaf_mask = np.uint64(self.addr_mask & ~(level.page_size - 1))
        phys = np.where(leaf, e & leaf_mask, np.uint64(0))
        segment = TableSegment(table, depth, level, base, lo, hi, leaf, prot, eff, phys)

        start = lo
        for i in (np.flatnonzero((rsv | usable & ~leaf)[lo:hi]) + lo).tolist():
            if rsv[i]:
                if not in_shared:
                    self._report(AnomalyKind.RESERVED_BITS, base, i, level, e, table)
                continue
            child = self._child(table, e, i, base, level, path, in_shared)
            if child is None:
                prot[i] = 0  # not followed: shown unmapped (segments from ``start`` are unsent)
                continue
            if start < i:
                yield replace(segment, lo=start, hi=i)
            child_eff = (eff_in & e[i] & (_RW | _US)) | ((eff_in | e[i]) & _XD)
            yield from self._table(
                child[0], child[1], depth + 1, base + (i << shift), 0, _ENTRIES, child_eff,
                (*path, child[0]), child[2],
            )  # fmt: skip
            start = i + 1
        if start < hi:
            yield replace(segment, lo=start)
        self.sizes.setdefault(table, self.visits - first_visit)

    def _child(self, table, e, i, base, level, path, in_shared):
        """(frame, entries, in_shared) to descend into, or None after reporting why not."""
        child = int(e[i]) & self.addr_mask
        if child in path:
            if not in_shared:
                self._report(AnomalyKind.RECURSIVE, base, i, level, e, table)
            return None
        key = (table, i)
        if in_shared and key in self.followed:
            return (child, self.mem.frame(child // PAGE_SIZE), True) if self.followed[key] else None
        try:
            entries = self.mem.frame(child // PAGE_SIZE)
        except UnbackedMemoryError:
            self._report(AnomalyKind.MISSING_FRAME, base, i, level, e, table)
            self.followed[key] = False
            return None
        shared = child in self.sizes  # walked to the end before (so not on this path)
        if shared:
            cost = self.sizes[child]
            self.followed[key] = cost <= self.budget
            self._report(AnomalyKind.SHARED, base, i, level, e, table, self.followed[key])
            if cost > self.budget:
                return None
            self.budget -= cost
        self.followed[key] = True
        return child, entries, shared or in_shared

    def _report(self, kind, base, i, level, e, table, descended=False) -> None:
        va = base + (i << level.shift)
        self.anomalies.append(TableAnomaly(kind, va, level, int(e[i]), table, descended))


def iter_segments(
    mem: PhysicalMemory,
    root: int,
    mode: PagingMode,
    maxphyaddr: int = MAX_PHYS_BITS,
    va_range: tuple[int, int] | None = None,
    *,
    anomalies: list[TableAnomaly] | None = None,
    shared_budget: int = DEFAULT_SHARED_BUDGET,
) -> Iterator[TableSegment | None]:
    """Table segments in VA order: the raw traversal under the dump's ``iter_mappings``.

    ``None`` is yielded between the lower and upper canonical halves. Segments may
    start before ``va_range`` and end after it (they are whole entries).
    """
    walk = TableTraversal(mem, mode, maxphyaddr, va_range, anomalies, shared_budget)
    return walk.segments(root)
