"""Linux ``/proc/PID/pagemap``: decode entries, read a live process, cross-check tables.

The file holds one little-endian u64 per virtual page of the process, at offset
``va // 4096 * 8`` (Linux ``Documentation/admin-guide/mm/pagemap.rst``). The PFN
field reads as 0 unless the reader has CAP_SYS_ADMIN. A process's VMAs
(``/proc/PID/maps``) come from :func:`kctx_debug.capture.procmaps.read_maps`.

>>> e = PagemapEntry.from_raw(0x8100000000001234)
>>> e.present, e.exclusive, e.pfn
(True, True, 4660)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, IntFlag

import numpy as np

from ..errors import KctxError, PageTableError
from ..physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .dump import iter_mappings
from .entry import PagingMode

__all__ = [
    "PFN_MASK",
    "CrossCheckReport",
    "PageVerdict",
    "PagemapBit",
    "PagemapEntry",
    "Verdict",
    "cross_check",
    "read_pagemap",
]

_ENTRY_BYTES = 8


class PagemapBit(IntFlag):
    """Flag bits of a pagemap entry (pagemap.rst, "Bits 55-63")."""

    SOFT_DIRTY = 1 << 55
    EXCLUSIVE = 1 << 56  # page exclusively mapped
    UFFD_WP = 1 << 57  # write-protected by userfaultfd
    GUARD = 1 << 58  # guard region (since Linux 6.15)
    FILE_SHARED = 1 << 61  # file page or shared anonymous page
    SWAPPED = 1 << 62
    PRESENT = 1 << 63


# Bits 54:0: the PFN when present; when swapped, bits 4:0 are the swap type and
# bits 54:5 the swap offset.
PFN_MASK = (1 << 55) - 1
_SWAP_TYPE_BITS = 5


@dataclass(frozen=True)
class PagemapEntry:
    """One decoded pagemap entry; ``raw`` is the u64 it came from."""

    raw: int
    present: bool
    swapped: bool
    file_shared: bool
    exclusive: bool
    uffd_wp: bool
    guard: bool
    soft_dirty: bool
    pfn: int | None  # when present (0 when the reader may not see PFNs)
    swap_type: int | None  # when swapped
    swap_offset: int | None

    @classmethod
    def from_raw(cls, raw: int) -> PagemapEntry:
        if not 0 <= raw < 1 << 64:
            raise KctxError(f"pagemap entry {raw:#x} is not a 64-bit value")
        present, swapped = bool(raw & PagemapBit.PRESENT), bool(raw & PagemapBit.SWAPPED)
        low = raw & PFN_MASK
        return cls(
            raw=raw,
            present=present,
            swapped=swapped,
            file_shared=bool(raw & PagemapBit.FILE_SHARED),
            exclusive=bool(raw & PagemapBit.EXCLUSIVE),
            uffd_wp=bool(raw & PagemapBit.UFFD_WP),
            guard=bool(raw & PagemapBit.GUARD),
            soft_dirty=bool(raw & PagemapBit.SOFT_DIRTY),
            pfn=low if present else None,
            swap_type=low & ((1 << _SWAP_TYPE_BITS) - 1) if swapped else None,
            swap_offset=low >> _SWAP_TYPE_BITS if swapped else None,
        )

    def __str__(self) -> str:
        flags = "|".join(f.name for f in PagemapBit if self.raw & f) or "-"
        if self.present:
            return f"pfn {self.pfn:#x} {flags}"
        if self.swapped:
            return f"swap type {self.swap_type} offset {self.swap_offset:#x} {flags}"
        return f"not present {flags}"


def _proc_error(pid: int, name: str, e: OSError) -> KctxError:
    if e.errno in (errno.ENOENT, errno.ESRCH):
        return KctxError(f"no such process: {pid}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return KctxError(f"cannot read /proc/{pid}/{name}: permission denied (needs ptrace access)")
    return KctxError(f"cannot read /proc/{pid}/{name}: {e.strerror}")


def read_pagemap(pid: int, va_start: int, va_end: int) -> np.ndarray:
    """Raw pagemap entries (uint64) for the pages covering ``[va_start, va_end)``.

    Entry ``i`` describes the page at ``va_start // 4096 * 4096 + i * 4096``.

    :raises KctxError: no such process, no permission, or a range past the user address space.
    """
    if not 0 <= va_start < va_end:
        raise KctxError(f"VA range {va_start:#x}-{va_end:#x} is empty or negative")
    first, last = va_start // PAGE_SIZE, -(-va_end // PAGE_SIZE)
    size = (last - first) * _ENTRY_BYTES
    try:
        fd = os.open(f"/proc/{int(pid)}/pagemap", os.O_RDONLY)
    except OSError as e:
        raise _proc_error(pid, "pagemap", e) from None
    try:
        data = bytearray()
        while len(data) < size:
            chunk = os.pread(fd, size - len(data), first * _ENTRY_BYTES + len(data))
            if not chunk:
                raise KctxError(
                    f"/proc/{pid}/pagemap ends at va "
                    f"{(first + len(data) // _ENTRY_BYTES) * PAGE_SIZE:#x}, "
                    f"inside {va_start:#x}-{va_end:#x} (beyond the user address space)"
                )
            data += chunk
    except OSError as e:
        raise _proc_error(pid, "pagemap", e) from None
    finally:
        os.close(fd)
    return np.frombuffer(bytes(data), dtype="<u8").astype(np.uint64)


# -- cross-check ---------------------------------------------------------------------


class Verdict(Enum):
    """How one page's translation in the tables compares with its pagemap entry."""

    AGREE = "agree"
    PFN_DIFFERS = "pfn-differs"
    ONLY_IN_PAGEMAP = "only-in-pagemap"
    ONLY_IN_TABLES = "only-in-tables"
    NOT_PRESENT_BOTH = "not-present-both"
    PFN_HIDDEN = "pfn-hidden"  # pagemap says present with PFN 0: read without CAP_SYS_ADMIN


_VERDICTS = tuple(Verdict)


@dataclass(frozen=True)
class PageVerdict:
    va: int
    verdict: Verdict
    table_pfn: int | None
    pagemap_pfn: int | None


@dataclass(frozen=True, eq=False)
class CrossCheckReport:
    """Per-page verdicts, stored as parallel arrays sorted by VA."""

    vas: np.ndarray  # uint64
    codes: np.ndarray  # index into Verdict
    table_pfns: np.ndarray  # int64, -1 when the tables do not map the page
    pagemap_pfns: np.ndarray  # int64, -1 when pagemap says not present

    def __len__(self) -> int:
        return len(self.vas)

    def pages(self, only_disagreeing: bool = False) -> Iterator[PageVerdict]:
        keep = np.ones(len(self), dtype=bool)
        if only_disagreeing:
            ok = (_VERDICTS.index(Verdict.AGREE), _VERDICTS.index(Verdict.NOT_PRESENT_BOTH))
            keep = ~np.isin(self.codes, ok)
        for i in np.flatnonzero(keep).tolist():
            t, p = int(self.table_pfns[i]), int(self.pagemap_pfns[i])
            yield PageVerdict(
                int(self.vas[i]), _VERDICTS[self.codes[i]], t if t >= 0 else None,
                p if p >= 0 else None,
            )  # fmt: skip

    @property
    def counts(self) -> dict[Verdict, int]:
        per = np.bincount(self.codes, minlength=len(_VERDICTS)).tolist()
        return dict(zip(_VERDICTS, per, strict=True))

    @property
    def percent_agree(self) -> float:
        """AGREE over the pages present in the tables or in pagemap (100 when none are)."""
        counts = self.counts
        considered = len(self) - counts[Verdict.NOT_PRESENT_BOTH]
        return 100.0 if considered == 0 else 100.0 * counts[Verdict.AGREE] / considered

    def describe(self, limit: int = 20) -> str:
        counts = self.counts
        lines = [
            f"pagemap cross-check: {len(self)} pages, {counts[Verdict.AGREE]} agree "
            f"({self.percent_agree:.1f}% of pages present in either)",
            "  " + ", ".join(f"{v.name} {n}" for v, n in counts.items()),
        ]
        for n, page in enumerate(self.pages(only_disagreeing=True)):
            if n == limit:
                lines.append("  …")
                break
            t = f"{page.table_pfn:#x}" if page.table_pfn is not None else "-"
            p = f"{page.pagemap_pfn:#x}" if page.pagemap_pfn is not None else "-"
            lines.append(f"  {page.va:#018x} {page.verdict.name:<16} tables {t} pagemap {p}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "pages": len(self),
            "counts": {v.value: n for v, n in self.counts.items()},
            "percent_agree": self.percent_agree,
            "disagreements": [
                {
                    "va": p.va,
                    "verdict": p.verdict.value,
                    "table_pfn": p.table_pfn,
                    "pagemap_pfn": p.pagemap_pfn,
                }
                for p in self.pages(only_disagreeing=True)
            ],
        }


def cross_check(
    mem: PhysicalMemory,
    root: int,
    mode: PagingMode,
    entries: Mapping[int, int],
    maxphyaddr: int = MAX_PHYS_BITS,
) -> CrossCheckReport:
    """Compare the tables' translation of each page in ``entries`` (VA -> raw pagemap u64).

    :raises PageTableError: a VA is not page-aligned or not canonical-64-bit.
    """
    vas = sorted(entries)
    for va in vas:
        if va % PAGE_SIZE or not 0 <= va < 1 << 64:
            raise PageTableError(f"pagemap VA {va:#x} is not a page-aligned 64-bit address")
    va_arr = np.array(vas, dtype=np.uint64)
    raw = np.array([entries[va] for va in vas], dtype=np.uint64)
    table = np.full(len(vas), -1, dtype=np.int64)
    if vas:
        ranges = list(
            iter_mappings(
                mem, root, mode, maxphyaddr, (vas[0], vas[-1] + PAGE_SIZE),
                include_holes=False, split_discontiguous=True,
            )
        )  # fmt: skip
        if ranges:
            starts = np.array([r.start for r in ranges], dtype=np.uint64)
            ends = np.array([r.end for r in ranges], dtype=np.uint64)
            phys = np.array([r.phys for r in ranges], dtype=np.uint64)
            idx = np.searchsorted(starts, va_arr, side="right") - 1
            safe = np.maximum(idx, 0)
            inside = (idx >= 0) & (va_arr < ends[safe])
            pa = phys[safe] + (va_arr - starts[safe])
            table = np.where(inside, (pa >> np.uint64(12)).astype(np.int64), -1)
    pm_present = raw >> np.uint64(63) != 0
    pm = np.where(pm_present, (raw & np.uint64(PFN_MASK)).astype(np.int64), -1)
    in_table = table >= 0
    code = np.select(
        [
            in_table & pm_present & (pm == 0),
            in_table & pm_present & (pm == table),
            in_table & pm_present,
            pm_present,
            in_table,
        ],
        [_VERDICTS.index(v) for v in (
            Verdict.PFN_HIDDEN, Verdict.AGREE, Verdict.PFN_DIFFERS,
            Verdict.ONLY_IN_PAGEMAP, Verdict.ONLY_IN_TABLES,
        )],
        default=_VERDICTS.index(Verdict.NOT_PRESENT_BOTH),
    )  # fmt: skip
    return CrossCheckReport(va_arr, code.astype(np.int64), table, pm)
