"""Layout dump: the address space as coalesced ranges, in Linux ptdump's format.

The walk reads each page-table page as one numpy array of 512 entries and does
present/leaf detection, effective permissions and run coalescing with array
operations; Python only loops over runs and over the tables it descends into.
It skips non-present entries at the highest level where they occur and jumps the
non-canonical hole. Runs coalesce the way ``arch/x86/mm/dump_pagetables.c``
does: contiguous VAs at the same level whose entries carry the same non-address
bits (Linux's pgprot) and the same effective R/W, U/S and XD, regardless of
physical contiguity (``MappingRange.phys_contiguous`` says whether it holds).

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

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from ..arch.address import noncanonical_hole
from ..errors import PageTableError, UnbackedMemoryError
from ..physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .entry import (
    ADDRESS_MASK,
    INDEX_MASK,
    PAT_4K,
    PAT_LARGE,
    Level,
    PagingMode,
    PteFlag,
    describe_entry,
    entry_pkey,
)

__all__ = [
    "DEFAULT_SHARED_BUDGET",
    "AnomalyKind",
    "LayoutDump",
    "MappingRange",
    "TableAnomaly",
    "TableSegment",
    "default_markers",
    "dump_layout",
    "format_ptdump",
    "iter_mappings",
    "iter_segments",
    "mappings_to_json",
]

_U64 = (1 << 64) - 1
_ENTRIES = INDEX_MASK + 1  # per table
_P, _RW, _US, _PS, _XD = (
    np.uint64(f) for f in (PteFlag.P, PteFlag.RW, PteFlag.US, PteFlag.PS, PteFlag.XD)
)
# Linux's PTE_FLAGS_MASK: everything but address bits 51:12 is "prot".
_FLAGS_MASK = np.uint64(_U64 & ~ADDRESS_MASK)
_PAT_LARGE = np.uint64(PAT_LARGE)
# Attributes a MappingRange reports; RW/US/XD are replaced by their effective values.
_ATTRS = int(
    PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.PWT | PteFlag.PCD | PteFlag.PS | PteFlag.G
    | PteFlag.XD
) | PAT_LARGE  # fmt: skip
_EFFECTIVE = int(PteFlag.RW | PteFlag.US | PteFlag.XD)
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


@dataclass(frozen=True)
class MappingRange:
    """``[start, end)`` at one level with uniform attributes; a hole when not present.

    ``flags``: the effective attributes (``PteFlag`` bits P RW US PWT PCD PS G XD, and
    PAT at bit 7 for 4 KiB pages or bit 12 for large ones); R/W and U/S are ANDed and XD
    ORed over the walk. ``entry_flags``: the leaf entries' own non-address bits (what
    Linux prints), including A/D, software bits and the protection key.
    """

    start: int
    end: int
    level: Level
    flags: int
    entry_flags: int
    phys: int | None  # physical address of the first page
    phys_contiguous: bool = True

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def present(self) -> bool:
        return bool(self.flags & PteFlag.P)

    @property
    def large(self) -> bool:
        return self.present and self.level.large_pages

    @property
    def pkey(self) -> int:
        return entry_pkey(self.entry_flags) if self.present else 0


@dataclass(frozen=True)
class LayoutDump:
    """What :func:`dump_layout` found: the ranges in VA order and the anomalies met."""

    ranges: tuple[MappingRange, ...]
    anomalies: tuple[TableAnomaly, ...]


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


# Reserved bits of present entries (SDM vol. 3A Tables 4-15 to 4-20, "Reserved (must be 0)").
def _reserved(e: np.ndarray, level: Level, last: bool, maxphyaddr: int) -> np.ndarray:
    rsv = e & np.uint64(((1 << MAX_PHYS_BITS) - 1) & ~((1 << maxphyaddr) - 1)) != 0
    if not last and not level.large_pages:
        rsv |= e & _PS != 0  # PS must be 0 in PML5E/PML4E
    elif level.large_pages:  # a large page's address bits below its alignment, above PAT
        low = np.uint64((level.page_size - 1) & ~(PAT_LARGE | (PAT_LARGE - 1)))
        rsv |= (e & _PS != 0) & (e & low != 0)
    return rsv


class _Walk:
    """One traversal: the visited tables, the anomaly sink and the sharing budget.

    A table met again from another slot costs the number of table visits its first
    walk made; it is walked again when that fits in the budget. Inside such a
    re-walk each slot repeats the decision of the first walk, so the cost is exact.
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
    """The raw traversal under :func:`iter_mappings`: table segments in VA order.

    ``None`` is yielded between the lower and upper canonical halves. Segments may
    start before ``va_range`` and end after it (they are whole entries).
    """
    walk = _Walk(mem, mode, maxphyaddr, va_range, anomalies, shared_budget)
    return walk.segments(root)


@dataclass
class _Run:
    """A range still growing: its key (prot, eff, depth) and where its pages are."""

    start: int
    prot: int
    eff: int
    depth: int
    phys: int | None  # first page (None: a hole)
    after: int | None  # physical address just after the last page
    contiguous: bool


class _Coalescer:
    """Turns segments into maximal ranges."""

    def __init__(self, mode: PagingMode, start: int, end: int, split_discontiguous: bool) -> None:
        self.mode, self.start, self.end = mode, start, end
        self.split = split_discontiguous
        self.run: _Run | None = None
        self.covered = start  # end of the last segment added

    def add(self, seg: TableSegment) -> Iterator[MappingRange]:
        lo, hi, size = seg.lo, seg.hi, seg.level.page_size
        prot, eff, leaf, phys = (a[lo:hi] for a in (seg.prot, seg.eff, seg.leaf, seg.phys))
        contig = (phys[1:] == phys[:-1] + np.uint64(size)) | ~leaf[1:]
        change = (prot[1:] != prot[:-1]) | (eff[1:] != eff[:-1])
        if self.split:
            change |= ~contig
        starts = np.concatenate(([0], np.flatnonzero(change) + 1))
        ends = np.append(starts[1:], hi - lo)
        breaks = np.concatenate(([0], np.cumsum(~contig)))
        runs = zip(
            starts.tolist(),
            prot[starts].tolist(),
            eff[starts].tolist(),
            np.where(leaf[starts], phys[starts].astype(np.int64), -1).tolist(),  # -1: a hole
            (phys[ends - 1] + np.uint64(size)).tolist(),
            (breaks[ends - 1] == breaks[starts]).tolist(),  # contiguous within the run
            strict=True,
        )
        for s, p, f, first, after, contiguous in runs:
            va = max(seg.va(lo + s), self.start)
            first, after = (None, None) if first < 0 else (first, after)
            run = self.run
            if run is not None and (run.prot, run.eff, run.depth) == (p, f, seg.depth):
                joins = first is None or first == run.after
                if joins or not self.split:  # the same key continues in a new table
                    run.after = after
                    run.contiguous = run.contiguous and joins and contiguous
                    continue
            done = self.flush(va)
            if done is not None:
                yield done
            self.run = _Run(va, p, f, seg.depth, first, after, contiguous)
        self.covered = min(seg.va(hi), self.end)

    def flush(self, end: int) -> MappingRange | None:
        run, self.run = self.run, None
        if run is None or end <= run.start:
            return None
        flags = (run.prot & _ATTRS & ~_EFFECTIVE) | run.eff if run.prot & PteFlag.P else 0
        level = self.mode.levels[run.depth]
        return MappingRange(run.start, end, level, flags, run.prot, run.phys, run.contiguous)


def iter_mappings(
    mem: PhysicalMemory,
    root: int,
    mode: PagingMode,
    maxphyaddr: int = MAX_PHYS_BITS,
    va_range: tuple[int, int] | None = None,
    *,
    include_holes: bool = True,
    split_discontiguous: bool = False,
    anomalies: list[TableAnomaly] | None = None,
    shared_budget: int = DEFAULT_SHARED_BUDGET,
) -> Iterator[MappingRange]:
    """Coalesced ranges in VA order, holes included (ptdump prints them too).

    :param root: physical address of the top table (a CR3 value works: low bits are ignored).
    :param va_range: ``(start, end)``, end exclusive; ranges are clipped to it.
    :param split_discontiguous: also split where pages stop being physically
        contiguous, so that ``phys + (va - start)`` translates every VA of a range.
    :param anomalies: a list that receives every :class:`TableAnomaly` met.
    :raises PageTableError: ``va_range`` or ``maxphyaddr`` is invalid.
    """
    walk = _Walk(mem, mode, maxphyaddr, va_range, anomalies, shared_budget)
    acc = _Coalescer(mode, walk.start, walk.end, split_discontiguous)
    for seg in walk.segments(root):
        done = [acc.flush(acc.covered)] if seg is None else acc.add(seg)
        for r in done:
            if r is not None and (include_holes or r.present):
                yield r
    r = acc.flush(acc.covered)
    if r is not None and (include_holes or r.present):
        yield r


def dump_layout(
    mem: PhysicalMemory,
    root: int,
    mode: PagingMode,
    maxphyaddr: int = MAX_PHYS_BITS,
    va_range: tuple[int, int] | None = None,
    **options: object,
) -> LayoutDump:
    """:func:`iter_mappings` collected, with the anomalies it met."""
    anomalies: list[TableAnomaly] = []
    ranges = tuple(
        iter_mappings(mem, root, mode, maxphyaddr, va_range, anomalies=anomalies, **options)
    )
    return LayoutDump(ranges, tuple(anomalies))


# -- text and JSON ---------------------------------------------------------------------

# ptdump's attribute columns, (set, clear) text in order: U/S, R/W, PWT, PCD, PSE
# (upper levels), PAT, G, XD (arch/x86/mm/dump_pagetables.c, printk_prot).
_COLUMNS = (
    ("USR ", "    "),
    ("RW ", "ro "),
    ("PWT ", "    "),
    ("PCD ", "    "),
    ("PSE ", "    "),
    ("PAT ", "    "),
    ("GLB ", "    "),
    ("NX ", "x  "),
)
_NOT_PRESENT = " " * 30
_UNITS = "BKMGTPE"


def default_markers(mode: PagingMode | None = None) -> dict[int, str]:
    """User Space at 0; Kernel Space at the upper half (Linux's 1 << 63 without a mode)."""
    kernel = mode.canonical(1 << (mode.va_bits - 1)) if mode is not None else 1 << 63
    return {0: "User Space", kernel: "Kernel Space"}


def _prot_text(prot: int, level: Level) -> str:
    if not prot & PteFlag.P:
        return _NOT_PRESENT
    pte = level.page_size == PAGE_SIZE  # bit 7 is PAT there, and PAT moves to bit 12 above
    shown = (
        prot & PteFlag.US,
        prot & PteFlag.RW,
        prot & PteFlag.PWT,
        prot & PteFlag.PCD,
        not pte and prot & PteFlag.PS,
        prot & PAT_4K if pte else level.large_pages and prot & PAT_LARGE,
        prot & PteFlag.G,
        prot & PteFlag.XD,
    )
    return "".join(on if bit else off for bit, (on, off) in zip(shown, _COLUMNS, strict=True))


def _line(start: int, end: int, prot: int, level: Level) -> str:
    # Unsigned 64-bit arithmetic as in C: a range ending at 2**64 prints as 0.
    delta, unit = (end - start) & _U64, 0
    while not delta & 1023 and unit < len(_UNITS) - 1:
        delta >>= 10
        unit += 1
    return (
        f"0x{start:016x}-0x{end & _U64:016x}   {delta:9d}{_UNITS[unit]} "
        f"{_prot_text(prot, level)}{level.linux_name}"
    )


def _is_hole_gap(end: int, start: int) -> bool:
    """Whether ``[end, start)`` is exactly a non-canonical hole (ptdump draws across it)."""
    for bits in (48, 57):
        first, last = noncanonical_hole(bits)
        if end == first and start == last + 1:
            return True
    return False


def format_ptdump(
    ranges: Iterable[MappingRange],
    markers: Mapping[int, str] | None = None,
    *,
    mode: PagingMode | None = None,
    effective: bool = False,
) -> str:
    """Text in the format of Linux's ``/sys/kernel/debug/page_tables/*``.

    A line ends where the attributes or the level change, or at the first entry
    boundary at or after a marker, after which ``---[ name ]---`` is printed. An
    unmapped line continues across the non-canonical hole, as Linux's does; a
    mapped one ends at the hole (Linux would stretch it to the next entry it notes).

    :param markers: address -> section name; default :func:`default_markers` (``mode``).
    :param effective: print the effective R/W, U/S and XD instead of the leaf's own
        bits (Linux prints the leaf's; they differ only when upper levels restrict).
    """
    marks = sorted((markers if markers is not None else default_markers(mode)).items())
    out: list[str] = []
    run: tuple[int, tuple, int, Level] | None = None  # (start, key, prot, level)
    mark = -1  # index of the last marker printed
    prev_end = None
    for r in ranges:
        if run is not None and r.start != prev_end:
            mapped = run[1][1] & PteFlag.P
            if mapped or not _is_hole_gap(prev_end, r.start):  # end the line where input does
                out.append(_line(run[0], prev_end, run[2], run[3]))
                run = None
        key = (r.entry_flags, r.flags, r.level)
        prot = r.flags if effective else r.entry_flags
        notes = [r.start]  # Linux notes every entry; only these can end a line here
        for address, _ in marks:
            boundary = -(-address // r.level.page_size) * r.level.page_size
            if r.start < boundary < r.end:
                notes.append(boundary)
        for address in sorted(set(notes)):
            crossing = mark + 1 < len(marks) and address >= marks[mark + 1][0]
            if run is None and mark < 0:  # the first line: only the section it is in
                mark = sum(1 for a, _ in marks if a <= address) - 1
                if mark >= 0:
                    out.append(f"---[ {marks[mark][1]} ]---")
            elif run is None:  # the first line after a gap in the input
                while mark + 1 < len(marks) and address >= marks[mark + 1][0]:
                    mark += 1
                    out.append(f"---[ {marks[mark][1]} ]---")
            elif key != run[1] or crossing:
                out.append(_line(run[0], address, run[2], run[3]))
                if crossing:
                    mark += 1
                    out.append(f"---[ {marks[mark][1]} ]---")
            else:
                continue
            run = (address, key, prot, r.level)
        prev_end = r.end
    if run is not None:
        out.append(_line(run[0], prev_end, run[2], run[3]))
    return "".join(line + "\n" for line in out)


def mappings_to_json(ranges: Iterable[MappingRange]) -> list[dict]:
    """One JSON object per range, every number an integer."""
    return [
        {
            "start": r.start,
            "end": r.end,
            "size": r.size,
            "present": r.present,
            "phys": r.phys,
            "phys_contiguous": r.phys_contiguous,
            "level": r.level.name,
            "ptdump_level": r.level.linux_name,
            "flags": describe_entry(r.flags, leaf=True, large=r.large).split("|")
            if r.flags
            else [],
            "entry_flags": r.entry_flags,
            "pkey": r.pkey,
        }
        for r in ranges
    ]
