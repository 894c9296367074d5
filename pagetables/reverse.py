"""Reverse map: every virtual address that maps a given physical address.

Uses the layout dump's traversal (:func:`~kctx_debug.pagetables.traverse.iter_segments`),
so each table is searched as one array: an entry matches when the page it maps,
of whatever size, contains the physical address.
"""

from __future__ import annotations

import numpy as np

from ..errors import PageTableError
from ..physmem import MAX_PHYS_BITS, PhysicalMemory
from .entry import PagingMode
from .traverse import DEFAULT_SHARED_BUDGET, TableAnomaly, iter_segments

__all__ = ["reverse_map"]


def reverse_map(
    mem: PhysicalMemory,
    root: int,
    mode: PagingMode,
    phys: int,
    maxphyaddr: int = MAX_PHYS_BITS,
    *,
    anomalies: list[TableAnomaly] | None = None,
    shared_budget: int = DEFAULT_SHARED_BUDGET,
) -> list[int]:
    """Every VA whose translation is ``phys``, in ascending order.

    A byte mapped through a 2 MiB page at VA ``v`` (page base ``b``) yields
    ``v + (phys - b)``. Unfollowed entries (see the dump's anomalies) are skipped.

    :raises PageTableError: ``phys`` is outside the physical address space.
    """
    if not 0 <= phys < 1 << maxphyaddr:
        raise PageTableError(f"physical address {phys:#x} is beyond MAXPHYADDR ({maxphyaddr})")
    found: list[int] = []
    target = np.uint64(phys)
    for seg in iter_segments(
        mem, root, mode, maxphyaddr, anomalies=anomalies, shared_budget=shared_budget
    ):
        if seg is None:
            continue
        lo, hi = seg.lo, seg.hi
        base = seg.phys[lo:hi]
        low = np.uint64(max(0, phys - seg.level.page_size + 1))
        hits = np.flatnonzero(seg.leaf[lo:hi] & (base >= low) & (base <= target))
        found.extend(seg.va(lo + i) + phys - int(base[i]) for i in hits.tolist())
    return found
