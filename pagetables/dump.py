"""Layout dump: the address space as coalesced ranges, in Linux ptdump's format.

Built on :mod:`~kctx_debug.pagetables.traverse`, which reads each page-table page
as one numpy array and reports anomalies (recursive, shared, missing-frame and
reserved-bits entries; see there) without stopping. Coalescing is array work
too: runs coalesce the way ``arch/x86/mm/dump_pagetables.c`` does: contiguous
VAs at the same level whose entries carry the same non-address bits (Linux's
pgprot) and the same effective R/W, U/S and XD, regardless of physical
contiguity (``MappingRange.phys_contiguous`` says whether it holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ..arch.address import noncanonical_hole
from ..physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .entry import PAT_4K, PAT_LARGE, Level, PagingMode, PteFlag, describe_entry, entry_pkey
from .traverse import (  # re-exported: the dump's anomalies and raw segments
    DEFAULT_SHARED_BUDGET,
    AnomalyKind,
    TableAnomaly,
    TableSegment,
    TableTraversal,
    iter_segments,
)

__all__ = [
    "DEFAULT_SHARED_BUDGET",
    "AnomalyKind",
    "LayoutDump",
    "MappingRange",
    "TableAnomaly",
    "TableSegment",
    "TableTraversal",
    "default_markers",
    "dump_layout",
    "format_ptdump",
    "iter_mappings",
    "iter_segments",
    "mappings_to_json",
]

_U64 = (1 << 64) - 1
# Attributes a MappingRange reports; RW/US/XD are replaced by their effective values.
_ATTRS = int(
    PteFlag.P | PteFlag.RW | PteFlag.US | PteFlag.PWT | PteFlag.PCD | PteFlag.PS | PteFlag.G
    | PteFlag.XD
) | PAT_LARGE  # fmt: skip
_EFFECTIVE = int(PteFlag.RW | PteFlag.US | PteFlag.XD)


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
    walk = TableTraversal(mem, mode, maxphyaddr, va_range, anomalies, shared_budget)
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
