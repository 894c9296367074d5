"""Sparse, page-granular physical memory built from a snapshot's ranges.

Each range is backed by one host buffer: a private copy-on-write ``mmap`` of a
side file, shared by the ranges of that file (emulated writes never reach the
file), an anonymous mapping for zero-filled ranges (the kernel hands out pages
lazily), or a ``bytearray`` for small inline data. Nothing is copied at load
time, and the same buffers can be handed to Unicorn with ``mem_map_ptr``.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from .errors import MemoryAccessError, SnapshotError, UnbackedMemoryError

__all__ = [
    "MAX_PHYS_BITS",
    "PAGE_SIZE",
    "BackingKind",
    "HostRange",
    "PhysicalMemory",
    "RangeKind",
    "Region",
]

PAGE_SIZE = 4096
# SDM vol. 3A 4.1.4: MAXPHYADDR is at most 52 bits.
MAX_PHYS_BITS = 52
_PAGE_MASK = PAGE_SIZE - 1


class RangeKind(Enum):
    """Where a range's bytes come from; also the snapshot format's ``memory[].kind``."""

    INLINE = "inline"
    FILE = "file"
    ZERO = "zero"


BackingKind = RangeKind  # the name a Region's ``kind`` was introduced under


@dataclass(eq=False)
class Region:
    """One contiguous physical range and the host buffer behind it."""

    base: int
    size: int
    kind: RangeKind
    buffer: mmap.mmap | bytearray
    offset: int = 0  # where the range starts inside ``buffer``
    path: Path | None = None
    file_offset: int = 0
    dirty: bool = False

    @property
    def end(self) -> int:
        return self.base + self.size

    def view(self) -> memoryview:
        return memoryview(self.buffer)[self.offset : self.offset + self.size]


@dataclass(frozen=True)
class HostRange:
    """A backed physical range as host memory, ready for ``Uc.mem_map_ptr``.

    ``keepalive`` must stay referenced for as long as ``address`` is in use.
    """

    base: int
    size: int
    address: int
    keepalive: object


class PhysicalMemory:
    """A sparse physical address space; see the module docstring."""

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._files: dict[Path, _FileMapping] = {}  # resolved path -> its whole-file mapping

    # -- building -------------------------------------------------------------

    def add_file(self, base: int, path: str | os.PathLike[str], offset: int, size: int) -> Region:
        """Back ``[base, base+size)`` by ``path`` from ``offset``, mapped lazily.

        A file is mapped once, whole, at its first use, and its regions point into
        that mapping: a capture's thousands of frame runs cost one mapping, not one
        each (Linux allows 65530 per process by default, vm.max_map_count). A range
        whose bytes overlap another region's in the same file gets a mapping of its
        own, so a write through one physical address never shows through the other.
        """
        path = Path(path)
        self._check_range(base, size)
        try:
            shared = self._file_mapping(path, offset, size)
            _check_slice(path, len(shared.buffer), offset, size)
            self._slot(base, size)  # before claiming the bytes, which cannot be undone
            if shared.claim(offset, size):
                buffer, start = shared.buffer, offset
            else:
                buffer, start = _map_slice(path, offset, size)
        except OSError as e:
            raise SnapshotError(str(path), f"cannot map side file: {e.strerror}") from None
        region = Region(base, size, RangeKind.FILE, buffer, start, path, offset)
        self._insert(region)
        return region

    def _file_mapping(self, path: Path, offset: int, size: int) -> _FileMapping:
        """The whole-file mapping of ``path``, made on first use (cached by resolved path)."""
        key = path.resolve()
        shared = self._files.get(key)
        if shared is None:
            with open(path, "rb") as f:
                length = os.fstat(f.fileno()).st_size
                _check_slice(path, length, offset, size)  # also refuses an empty file
                buffer = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY)
            shared = self._files[key] = _FileMapping(buffer)
        return shared

    def add_bytes(self, base: int, data: bytes) -> Region:
        """Back ``[base, base+len(data))`` by a private copy of ``data``."""
        self._check_range(base, len(data))
        region = Region(base, len(data), RangeKind.INLINE, bytearray(data))
        self._insert(region)
        return region

    def add_zero(self, base: int, size: int) -> Region:
        """Back ``[base, base+size)`` by zero-filled memory that costs nothing until written."""
        self._check_range(base, size)
        region = Region(base, size, RangeKind.ZERO, mmap.mmap(-1, size))
        self._insert(region)
        return region

    def _check_range(self, base: int, size: int) -> None:
        if base & _PAGE_MASK or size & _PAGE_MASK:
            raise MemoryAccessError(
                base, f"range {base:#x}+{size:#x} is not aligned to {PAGE_SIZE:#x} bytes"
            )
        if size <= 0:
            raise MemoryAccessError(base, f"range at {base:#x} has size {size}, not positive")
        if base < 0 or base + size > 1 << MAX_PHYS_BITS:
            raise MemoryAccessError(
                base,
                f"range {base:#x}+{size:#x} exceeds {MAX_PHYS_BITS} bits",
            )

    def _slot(self, base: int, size: int) -> int:
        """Where a region ``[base, base+size)`` goes in the sorted list; refuses overlaps."""
        i = bisect.bisect_right(self._starts, base)
        before = self._regions[i - 1] if i else None
        after = self._regions[i] if i < len(self._regions) else None
        for other in (before, after):
            if other is not None and other.base < base + size and base < other.end:
                at = max(other.base, base)
                raise MemoryAccessError(
                    at,
                    f"range {base:#x}+{size:#x} overlaps "
                    f"{other.base:#x}+{other.size:#x} at {at:#x}",
                )
        return i

    def _insert(self, region: Region) -> None:
        i = self._slot(region.base, region.size)
        self._regions.insert(i, region)
        self._starts.insert(i, region.base)

    # -- queries ----------------------------------------------------------------

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def region_at(self, address: int) -> Region | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._regions[i].end:
            return self._regions[i]
        return None

    def is_backed(self, address: int, size: int = 1) -> bool:
        """True when every byte of ``[address, address+size)`` is backed."""
        end = address + size
        while address < end:
            region = self.region_at(address)
            if region is None:
                return False
            address = region.end
        return True

    def frame_backed(self, pfn: int) -> bool:
        return self.region_at(pfn * PAGE_SIZE) is not None

    def contiguous_ranges(self) -> Iterator[tuple[int, int]]:
        """Maximal backed runs ``(base, size)``, merging adjacent regions."""
        run_base = run_end = None
        for r in self._regions:
            if run_end == r.base:
                run_end = r.end
                continue
            if run_base is not None:
                yield run_base, run_end - run_base
            run_base, run_end = r.base, r.end
        if run_base is not None:
            yield run_base, run_end - run_base

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    # -- access -----------------------------------------------------------------

    def _chunks(self, address: int, size: int) -> Iterator[tuple[Region, int, int]]:
        """Yield (region, offset in region, length) pieces covering the span."""
        if address < 0 or size < 0:
            raise MemoryAccessError(address, f"invalid span {address:#x}+{size:#x}")
        end = address + size
        while address < end:
            region = self.region_at(address)
            if region is None:
                raise UnbackedMemoryError(address, end - address)
            n = min(end, region.end) - address
            yield region, address - region.base, n
            address += n

    def read(self, address: int, size: int) -> bytes:
        """Read ``size`` bytes; raises UnbackedMemoryError naming the first unbacked byte."""
        parts = []
        for region, off, n in self._chunks(address, size):
            start = region.offset + off
            parts.append(region.buffer[start : start + n])
        return b"".join(parts)

    def write(self, address: int, data: bytes) -> None:
        """Write ``data``; checks the whole span is backed before changing anything."""
        chunks = list(self._chunks(address, len(data)))
        pos = 0
        for region, off, n in chunks:
            start = region.offset + off
            region.buffer[start : start + n] = data[pos : pos + n]
            region.dirty = True
            pos += n

    def read_u8(self, address: int) -> int:
        return self.read(address, 1)[0]

    def read_u16(self, address: int) -> int:
        return struct.unpack("<H", self.read(address, 2))[0]

    def read_u32(self, address: int) -> int:
        return struct.unpack("<I", self.read(address, 4))[0]

    def read_u64(self, address: int) -> int:
        return struct.unpack("<Q", self.read(address, 8))[0]

    def write_u8(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<B", value))

    def write_u16(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<H", value))

    def write_u32(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<I", value))

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<Q", value))

    def frame(self, pfn: int, dtype: str = "<u8") -> np.ndarray:
        """A writable numpy view of the 4 KiB frame ``pfn`` (512 little-endian u64 by default)."""
        address = pfn * PAGE_SIZE
        region = self.region_at(address)
        if region is None:
            raise UnbackedMemoryError(address, PAGE_SIZE)
        return np.frombuffer(
            region.buffer,
            dtype=dtype,
            count=PAGE_SIZE // np.dtype(dtype).itemsize,
            offset=region.offset + address - region.base,
        )

    def host_ranges(self) -> list[HostRange]:
        """Each region as a host pointer for ``mem_map_ptr``, without copying.

        Regions sharing one file mapping share its ``keepalive`` (one export each).
        """
        out = []
        exported: dict[int, ctypes.Array] = {}  # id(buffer) -> its ctypes view
        for r in self._regions:
            arr = exported.get(id(r.buffer))
            if arr is None:
                arr = (ctypes.c_char * len(r.buffer)).from_buffer(r.buffer)
                exported[id(r.buffer)] = arr
            out.append(HostRange(r.base, r.size, ctypes.addressof(arr) + r.offset, arr))
            r.dirty = True  # the emulator may now write behind our back
        return out

    def close(self) -> None:
        """Release the mappings; later accesses fail."""
        buffers = {id(r.buffer): r.buffer for r in self._regions}
        buffers.update((id(m.buffer), m.buffer) for m in self._files.values())
        for buffer in buffers.values():
            if isinstance(buffer, mmap.mmap):
                try:
                    buffer.close()
                except BufferError:
                    pass  # still exported (numpy view, Unicorn); freed when those go
        self._regions.clear()
        self._starts.clear()
        self._files.clear()


@dataclass(eq=False)
class _FileMapping:
    """A side file mapped whole (private copy-on-write) and the byte spans regions claimed."""

    buffer: mmap.mmap
    starts: list[int] = field(default_factory=list)  # claimed spans, sorted, disjoint
    ends: list[int] = field(default_factory=list)

    def claim(self, offset: int, size: int) -> bool:
        """Reserve ``[offset, offset+size)`` for a region; False if another one holds any of it."""
        i = bisect.bisect_right(self.starts, offset)
        if (i and self.ends[i - 1] > offset) or (
            i < len(self.starts) and self.starts[i] < offset + size
        ):
            return False
        self.starts.insert(i, offset)
        self.ends.insert(i, offset + size)
        return True


def _check_slice(path: Path, length: int, offset: int, size: int) -> None:
    if offset < 0 or offset + size > length:
        raise SnapshotError(
            str(path),
            f"file is {length} bytes, shorter than the slice {offset:#x}+{size:#x} it should hold",
        )


def _map_slice(path: Path, offset: int, size: int) -> tuple[mmap.mmap, int]:
    """A private mapping of just ``offset``..``offset+size`` and where the slice starts in it."""
    # mmap offsets must be multiples of the allocation granularity; QEMU's PT_LOAD
    # offsets are not even page-aligned.
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), size + offset - start, access=mmap.ACCESS_COPY, offset=start)
    return buffer, offset - start
