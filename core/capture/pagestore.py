"""Captured page contents: spooled in capture order, written out in frame order.

A process's pages arrive in virtual-address order, but the snapshot's side file
holds them sorted by physical frame, so that every run of consecutive frames is
one ``MemoryRange`` slice of it. Pages go to an unlinked spool file first (the
process can be larger than our memory) and are copied in frame order at the end.
A frame is stored once however many virtual pages map it (shared and
copy-on-write pages, the kernel's zero page).

>>> import tempfile
>>> store = PageStore(tempfile.gettempdir())
>>> store.add([7, 5, 7], bytes(3 * PAGE_SIZE))  # frame 7 twice: stored once
2
>>> store.frames().tolist()
[5, 7]
>>> store.close()
"""

from __future__ import annotations

import errno
import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..physmem import PAGE_SIZE
from .errors import CaptureError

__all__ = ["FrameRun", "PageStore"]

_COPY_FALLBACK = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class FrameRun:
    """``count`` consecutive frames from ``first``, stored at ``offset`` in the side file."""

    first: int
    count: int
    offset: int


class PageStore:
    """Frame number -> 4 KiB of contents, deduplicated; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self._spool = tempfile.TemporaryFile(dir=folder, prefix=".kctx-capture-")
        self._slot: dict[int, int] = {}  # frame -> page index in the spool
        self._order: list[int] = []  # frames by spool index

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, frame: int) -> bool:
        return frame in self._slot

    def add(self, frames: Sequence[int], data: bytes | memoryview) -> int:
        """Store page ``i`` of ``data`` as frame ``frames[i]`` unless that frame is stored.

        :return: how many pages were new.
        """
        if len(data) != len(frames) * PAGE_SIZE:
            raise CaptureError(f"{len(data)} bytes for {len(frames)} pages")
        view = memoryview(data)
        keep = []
        for i, frame in enumerate(frames):
            if frame not in self._slot:
                self._slot[frame] = len(self._order)
                self._order.append(frame)
                keep.append(i)
        if not keep:
            return 0
        first_slot = len(self._order) - len(keep)
        if len(keep) == len(frames):
            blob = view
        else:
            blob = b"".join(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in keep)
        _pwrite_all(self._spool.fileno(), blob, first_slot * PAGE_SIZE)
        return len(keep)

    def mark(self) -> int:
        """A point to :meth:`rollback` to."""
        return len(self._order)

    def rollback(self, mark: int) -> None:
        """Forget every page added after ``mark``."""
        for frame in self._order[mark:]:
            del self._slot[frame]
        del self._order[mark:]

    def frames(self) -> np.ndarray:
        """The stored frame numbers, ascending (uint64)."""
        return np.array(sorted(self._order), dtype=np.uint64)

    def read(self, frame: int) -> bytes:
        return os.pread(self._spool.fileno(), PAGE_SIZE, self._slot[frame] * PAGE_SIZE)

    def write_sorted(self, fd: int) -> list[FrameRun]:
        """Write every page to ``fd`` (from offset 0) in frame order; returns the frame runs."""
        frames = self.frames()
        if not len(frames):
            return []
        slots = np.array([self._slot[f] for f in frames.tolist()], dtype=np.int64)
        frame_breaks = np.flatnonzero(np.diff(frames.astype(np.int64)) != 1) + 1
        copy_breaks = np.union1d(frame_breaks, np.flatnonzero(np.diff(slots) != 1) + 1)
        src = self._spool.fileno()
        bounds = [0, *copy_breaks.tolist(), len(frames)]
        for lo, hi in itertools.pairwise(bounds):
            _copy(src, fd, int(slots[lo]) * PAGE_SIZE, lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
        starts = [0, *frame_breaks.tolist()]
        ends = [*frame_breaks.tolist(), len(frames)]
        return [
            FrameRun(int(frames[lo]), hi - lo, lo * PAGE_SIZE)
            for lo, hi in zip(starts, ends, strict=True)
        ]

    def close(self) -> None:
        self._spool.close()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy(src: int, dst: int, src_off: int, dst_off: int, size: int) -> None:
    """Copy ``size`` bytes between files, in the kernel when it can."""
    while size:
        try:
            n = os.copy_file_range(src, dst, size, src_off, dst_off)
        except OSError as e:
            if e.errno not in _COPY_FALLBACK:
                raise
            chunk = os.pread(src, min(size, 1 << 22), src_off)
            _pwrite_all(dst, chunk, dst_off)
            n = len(chunk)
        if n <= 0:
            raise CaptureError("the capture spool file ended early")
        size, src_off, dst_off = size - n, src_off + n, dst_off + n
