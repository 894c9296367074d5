"""Copy the present pages of a stopped process: pagemap says which, /proc/PID/mem gives them.

Only pages that ``/proc/PID/pagemap`` reports present are read, so the capture
faults nothing in (no swap-in, no new zero pages): the process's memory state
is left as it was. Each chunk's pagemap is read again after its contents; if a
page moved meanwhile (compaction, khugepaged, KSM), the chunk is read again.

Frames: with CAP_SYS_ADMIN pagemap gives the real PFN and a page is stored at
it. Without it PFNs read as zero; pages then get synthetic frames counted up
from :data:`SYNTHETIC_BASE_FRAME` (4 GiB), and the stored pagemap entries keep
their PFN field zero, as the kernel gave them.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass

import numpy as np

from ..errors import KctxError
from ..pagetables.pagemap import PFN_MASK, PagemapBit, read_pagemap
from ..physmem import PAGE_SIZE
from .errors import CaptureError, ProcessExitedError
from .pagestore import PageStore
from .procmaps import Vma, is_alive

__all__ = [
    "SYNTHETIC_BASE_FRAME",
    "CapturedVma",
    "MemoryReader",
    "PfnMode",
    "pfns_visible",
]

SYNTHETIC_BASE_FRAME = (4 << 30) // PAGE_SIZE
_CHUNK_PAGES = 4096  # 16 MiB of address space per pagemap read and re-check
_RETRIES = 4
_STABLE_BITS = np.uint64(PagemapBit.PRESENT | PFN_MASK)
_KEEP_BITS = np.uint64(PagemapBit.PRESENT | PagemapBit.SWAPPED)
_MEM_ERRORS = {errno.EIO, errno.EFAULT, errno.ENOMEM}


class PfnMode(enum.Enum):
    REAL = "real"  # pages sit at the frames pagemap reported
    SYNTHETIC = "synthetic"  # PFNs hidden (or ignored on request): frames made up from 4 GiB


@dataclass(frozen=True)
class CapturedVma:
    """What was captured of one VMA; ``skipped`` says why nothing was, when so."""

    vma: Vma
    vas: np.ndarray  # uint64, page VAs whose contents were captured
    frames: np.ndarray  # uint64, the frame each of them sits at in the snapshot
    entry_vas: np.ndarray  # uint64, pages whose pagemap entry is kept (present or swapped)
    entries: np.ndarray  # uint64, those entries
    unreadable: int = 0  # present pages /proc/PID/mem refused
    skipped: str | None = None

    @classmethod
    def skip(cls, vma: Vma, reason: str) -> CapturedVma:
        empty = np.zeros(0, dtype=np.uint64)
        return cls(vma, empty, empty, empty, empty, skipped=reason)


@dataclass(frozen=True)
class _Chunk:
    """The part of a :class:`CapturedVma` one chunk of it yields."""

    vas: np.ndarray
    frames: np.ndarray
    entry_vas: np.ndarray
    entries: np.ndarray
    unreadable: int


def pfns_visible() -> bool:
    """Whether this process sees PFNs in pagemap files (CAP_SYS_ADMIN), probed on itself."""
    probe = bytearray(PAGE_SIZE)
    probe[0] = 1  # written: its page is present
    va = np.frombuffer(probe, dtype=np.uint8).ctypes.data
    entry = int(read_pagemap(os.getpid(), va, va + 1)[0])
    return bool(entry & PFN_MASK)


class MemoryReader:
    """Reads VMAs of stopped process ``pid`` into ``store``; see the module docstring."""

    def __init__(self, pid: int, store: PageStore, mode: PfnMode) -> None:
        self.pid = pid
        self.store = store
        self.mode = mode
        self._next_synthetic = SYNTHETIC_BASE_FRAME
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as e:
            raise self._gone_or(f"cannot open /proc/{pid}/mem: {e.strerror}") from None

    def close(self) -> None:
        os.close(self._mem)

    def read_vma(self, vma: Vma) -> CapturedVma:
        reason = vma.skip_reason
        if reason is not None:
            return CapturedVma.skip(vma, reason)
        parts = [
            self._read_chunk(lo, min(lo + _CHUNK_PAGES * PAGE_SIZE, vma.end))
            for lo in range(vma.start, vma.end, _CHUNK_PAGES * PAGE_SIZE)
        ]
        return CapturedVma(
            vma,
            vas=np.concatenate([p.vas for p in parts]),
            frames=np.concatenate([p.frames for p in parts]),
            entry_vas=np.concatenate([p.entry_vas for p in parts]),
            entries=np.concatenate([p.entries for p in parts]),
            unreadable=sum(p.unreadable for p in parts),
        )

    def _read_chunk(self, lo: int, hi: int) -> _Chunk:
        for _ in range(_RETRIES):
            mark, synthetic = self.store.mark(), self._next_synthetic
            entries = self._pagemap(lo, hi)
            vas, frames, unreadable = self._copy_present(lo, entries)
            if not len(vas) or np.array_equal(
                entries & _STABLE_BITS, self._pagemap(lo, hi) & _STABLE_BITS
            ):
                break
            self.store.rollback(mark)
            self._next_synthetic = synthetic
        else:
            raise CaptureError(
                f"pages at {lo:#x}-{hi:#x} kept moving while being copied "
                "(memory compaction or THP collapse); try again"
            )
        keep = np.flatnonzero(entries & _KEEP_BITS)
        kept = entries[keep]
        if self.mode is PfnMode.SYNTHETIC:
            present = (kept & np.uint64(PagemapBit.PRESENT)) != 0
            kept = np.where(present, kept & ~np.uint64(PFN_MASK), kept)
        entry_vas = np.uint64(lo) + keep.astype(np.uint64) * np.uint64(PAGE_SIZE)
        return _Chunk(vas, frames, entry_vas, kept, unreadable)

    def _pagemap(self, lo: int, hi: int) -> np.ndarray:
        try:
            return read_pagemap(self.pid, lo, hi)
        except KctxError as e:
            raise self._gone_or(f"cannot read /proc/{self.pid}/pagemap: {e}") from None

    def _copy_present(self, lo: int, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Copy every present page of the chunk; returns (VAs, frames, unreadable count)."""
        present = np.flatnonzero(entries & np.uint64(PagemapBit.PRESENT))
        vas: list[int] = []
        frames: list[int] = []
        unreadable = 0
        if not len(present):
            return _u64(vas), _u64(frames), 0
        breaks = np.flatnonzero(np.diff(present) != 1) + 1
        for run in np.split(present, breaks):
            first, count = int(run[0]), len(run)
            data, ok = self._read_run(lo + first * PAGE_SIZE, count)
            pfns = (entries[first : first + count] & np.uint64(PFN_MASK)).tolist()
            run_vas, run_frames, blobs = [], [], []
            for i in range(count):
                if not ok[i] or (self.mode is PfnMode.REAL and pfns[i] == 0):
                    unreadable += 1
                    continue
                if self.mode is PfnMode.REAL:
                    frame = pfns[i]
                else:
                    frame = self._next_synthetic
                    self._next_synthetic += 1
                run_vas.append(lo + (first + i) * PAGE_SIZE)
                run_frames.append(frame)
                blobs.append(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            if run_frames:
                self.store.add(run_frames, data if len(blobs) == count else b"".join(blobs))
            vas += run_vas
            frames += run_frames
        return _u64(vas), _u64(frames), unreadable

    def _read_run(self, va: int, count: int) -> tuple[memoryview, list[bool]]:
        """``count`` pages from ``va``: the bytes (zeros where unreadable) and which were read."""
        size = count * PAGE_SIZE
        try:
            data = os.pread(self._mem, size, va)
        except OSError as e:
            if e.errno not in _MEM_ERRORS:
                raise self._gone_or(f"cannot read /proc/{self.pid}/mem: {e.strerror}") from None
            data = b""
        if len(data) == size:
            return memoryview(data), [True] * count
        # A short read stops at the first page the kernel refused: go page by page.
        buf = bytearray(size)
        ok = []
        for i in range(count):
            try:
                page = os.pread(self._mem, PAGE_SIZE, va + i * PAGE_SIZE)
            except OSError as e:
                if e.errno not in _MEM_ERRORS:
                    raise self._gone_or(f"cannot read /proc/{self.pid}/mem: {e.strerror}") from None
                page = b""
            if not page and not is_alive(self.pid):
                raise ProcessExitedError(self.pid, "reading its memory")
            ok.append(len(page) == PAGE_SIZE)
            buf[i * PAGE_SIZE : i * PAGE_SIZE + len(page)] = page
        return memoryview(buf), ok

    def _gone_or(self, message: str) -> CaptureError:
        if not is_alive(self.pid):
            return ProcessExitedError(self.pid, "reading its memory")
        return CaptureError(message)


def _u64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)
