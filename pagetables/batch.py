"""Translate many linear addresses at once with numpy; same answers as :func:`translate`.

The walk runs level by level over all addresses together: the table frames the
addresses need at one level are found with ``np.unique``, each frame is read once
as a 512-entry ``uint64`` array, and the entries are gathered by fancy indexing.
Frames are cached only for the duration of one call, since memory may change.

>>> result = translate_many(mem, np.array([0xFFFFFFFF81000000, 0x1000], dtype=np.uint64), cpu)
>>> result.ok.tolist(), hex(int(result.phys[0])), result.page_size.tolist()
([True, False], '0x1000000', [2097152, 0])

Access checks (CR0.WP, SMEP, SMAP, protection keys) are per address: use
:func:`~kctx_debug.pagetables.walk.translate` with an ``Access`` for those.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from kctx_debug.errors import PageTableError, UnbackedMemoryError
from kctx_debug.physmem import PAGE_SIZE, PhysicalMemory

from .entry import ADDRESS_MASK, INDEX_MASK, PKEY_MASK, PKEY_SHIFT, PteFlag, reserved_mask
from .walk import CpuPagingState

__all__ = ["BatchResult", "BatchStatus", "translate_many"]

_ENTRIES_PER_TABLE = PAGE_SIZE // 8
_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_U = np.uint64


class BatchStatus(IntEnum):
    """Why a lane has no translation (matches ``WalkResult.status`` / ``fault.kind``)."""

    OK = 0
    NOT_PRESENT = 1
    RESERVED = 2
    NON_CANONICAL = 3
    NOT_CAPTURED = 4  # a table frame is missing from the snapshot


@dataclass(frozen=True, eq=False)
class BatchResult:
    """Per-address arrays, all of the input's length.

    Where ``ok`` is False, ``phys`` and ``page_size`` are 0, the permission
    arrays False and ``pkey`` -1. ``depth`` is the index (into the paging mode's
    levels) of the last entry read, -1 when none was.
    """

    va: np.ndarray  # uint64
    phys: np.ndarray  # uint64
    ok: np.ndarray  # bool
    page_size: np.ndarray  # uint64
    writable: np.ndarray  # bool: R/W ANDed over all levels
    user: np.ndarray  # bool: U/S ANDed over all levels
    executable: np.ndarray  # bool: no XD at any level, or EFER.NXE=0
    pkey: np.ndarray  # int8: leaf key when CR4.PKE/PKS applies, else -1
    status: np.ndarray  # uint8 BatchStatus values
    depth: np.ndarray  # int8

    def __len__(self) -> int:
        return len(self.va)


def _as_u64(vas: object) -> np.ndarray:
    """``vas`` as a 1-D uint64 array; Python sequences may hold ints up to 2**64-1."""
    if isinstance(vas, np.ndarray) and vas.dtype.kind in "ui":
        if vas.ndim != 1:
            raise PageTableError(f"expected a 1-D array of addresses, got shape {vas.shape}")
        if vas.dtype.kind == "i" and (vas < 0).any():
            raise PageTableError("negative linear address in the batch")
        return vas.astype(np.uint64, copy=False)
    try:
        items = [operator.index(v) for v in vas]  # type: ignore[attr-defined]
        return np.array(items, dtype=np.uint64)
    except (OverflowError, TypeError):
        raise PageTableError("addresses must be a 1-D sequence of integers in 0..2**64-1") from None


def _gather_frames(
    mem: PhysicalMemory, pfns: np.ndarray, cache: dict[int, np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    """The frames ``pfns`` stacked as (k, 512) uint64, and which of them are backed."""
    rows = []
    backed = np.ones(len(pfns), dtype=bool)
    for i, pfn in enumerate(pfns.tolist()):
        if pfn not in cache:
            try:
                cache[pfn] = mem.frame(pfn)
            except UnbackedMemoryError:
                cache[pfn] = None
        frame = cache[pfn]
        if frame is None:
            backed[i] = False
            frame = np.zeros(_ENTRIES_PER_TABLE, dtype=np.uint64)
        rows.append(frame)
    return np.stack(rows).astype(np.uint64, copy=False), backed


def translate_many(mem: PhysicalMemory, vas: object, cpu: CpuPagingState) -> BatchResult:
    """Walk the page tables for every address in ``vas`` at once.

    :param mem: physical memory holding the tables; only read.
    :param vas: a 1-D array (or sequence) of 64-bit linear addresses.
    :param cpu: the paging registers, as for ``translate``.
    :return: a :class:`BatchResult`; ``phys``, ``ok``, ``page_size``, the
        permissions and the no-translation reason equal per-address ``translate``.
    :raises PageTableError: bad addresses, or ``cpu`` not in IA-32e paging mode.
    """
    va = _as_u64(vas)
    if not cpu.paging:
        raise PageTableError(
            "CPU is not using 4-level or 5-level paging (needs CR0.PG, CR4.PAE, EFER.LME)"
        )
    n = len(va)
    mode = cpu.mode
    phys = np.zeros(n, dtype=np.uint64)
    page_size = np.zeros(n, dtype=np.uint64)
    writable = np.zeros(n, dtype=bool)
    user = np.zeros(n, dtype=bool)
    executable = np.zeros(n, dtype=bool)
    pkey = np.full(n, -1, dtype=np.int8)
    status = np.full(n, BatchStatus.OK, dtype=np.uint8)
    depth_out = np.full(n, -1, dtype=np.int8)

    # SDM vol. 1 3.3.7.1: bits 63:va_bits-1 all equal.
    top = va >> _U(mode.va_bits - 1)
    canonical = (top == 0) | (top == _U((1 << (65 - mode.va_bits)) - 1))
    status[~canonical] = BatchStatus.NON_CANONICAL

    phys_mask = _U(cpu.phys_mask)
    maxphy, nxe = cpu.maxphyaddr, cpu.nxe
    p, rw_bit, us_bit = _U(PteFlag.P), _U(PteFlag.RW), _U(PteFlag.US)
    ps, xd_bit = _U(PteFlag.PS), _U(PteFlag.XD)
    cache: dict[int, np.ndarray | None] = {}

    lanes = np.flatnonzero(canonical)
    table = np.full(len(lanes), cpu.root, dtype=np.uint64)
    rw = np.ones(len(lanes), dtype=bool)
    us = np.ones(len(lanes), dtype=bool)
    xd = np.zeros(len(lanes), dtype=bool)
    last = len(mode.levels) - 1
    for depth, level in enumerate(mode.levels):
        if not len(lanes):
            break
        index = (va[lanes] >> _U(level.shift)) & _U(INDEX_MASK)
        pfns, row = np.unique(table >> _U(_PAGE_SHIFT), return_inverse=True)
        frames, backed = _gather_frames(mem, pfns, cache)
        entries = frames[row.ravel(), index]
        have = backed[row.ravel()]
        status[lanes[~have]] = BatchStatus.NOT_CAPTURED
        depth_out[lanes[have]] = depth  # a lane missing its table keeps the previous depth

        is_ps = (entries & ps) != 0
        with_ps, without_ps = (
            _U(reserved_mask(level, last=depth == last, ps=b, maxphyaddr=maxphy, nxe=nxe))
            for b in (True, False)
        )
        reserved = np.where(is_ps, with_ps, without_ps)
        present = (entries & p) != 0
        bad = (entries & reserved) != 0
        status[lanes[have & ~present]] = BatchStatus.NOT_PRESENT
        status[lanes[have & present & bad]] = BatchStatus.RESERVED

        good = have & present & ~bad
        rw &= (entries & rw_bit) != 0
        us &= (entries & us_bit) != 0
        xd |= (entries & xd_bit) != 0
        leaf = good & (is_ps if level.large_pages else np.bool_(depth == last))
        if leaf.any():
            out = lanes[leaf]
            size = level.page_size
            phys[out] = (entries[leaf] & phys_mask & _U(~(size - 1) & ADDRESS_MASK)) | (
                va[out] & _U(size - 1)
            )
            page_size[out] = size
            writable[out] = rw[leaf]
            user[out] = us[leaf]
            executable[out] = ~xd[leaf]  # with EFER.NXE=0 an XD bit was reserved already
            keyed = np.where(us[leaf], cpu.pke, cpu.pks)
            keys = ((entries[leaf] & _U(PKEY_MASK)) >> _U(PKEY_SHIFT)).astype(np.int8)
            pkey[out] = np.where(keyed, keys, -1)
        walk_on = good & ~leaf
        lanes, table = lanes[walk_on], entries[walk_on] & phys_mask
        rw, us, xd = rw[walk_on], us[walk_on], xd[walk_on]

    return BatchResult(
        va=va,
        phys=phys,
        ok=status == BatchStatus.OK,
        page_size=page_size,
        writable=writable,
        user=user,
        executable=executable,
        pkey=pkey,
        status=status,
        depth=depth_out,
    )
