"""PhysicalMemory: sparse ranges, spans across regions, errors that name the address."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from kctx_debug.errors import MemoryAccessError, SnapshotError, UnbackedMemoryError
from kctx_debug.physmem import BackingKind, PhysicalMemory


@pytest.fixture
def mem(tmp_path):
    side = tmp_path / "side.bin"
    side.write_bytes(bytes(range(256)) * 64 + b"\xaa" * 0x1000)  # 0x5000 bytes
    m = PhysicalMemory()
    m.add_bytes(0x1000, b"\x11" * 0x1000)
    m.add_file(0x2000, side, 0x0, 0x2000)  # adjacent to the inline range
    m.add_zero(0x10000, 0x3000)
    yield m
    m.close()


def test_read_spans_adjacent_regions(mem):
    data = mem.read(0x1FFE, 4)
    assert data == b"\x11\x11\x00\x01"
    assert mem.read_u64(0x1FFC) == int.from_bytes(b"\x11" * 4 + bytes(range(4)), "little")


def test_sized_accessors_are_little_endian(mem):
    mem.write_u32(0x10004, 0xDEADBEEF)
    assert mem.read_u8(0x10004) == 0xEF
    assert mem.read_u16(0x10004) == 0xBEEF
    assert mem.read_u32(0x10004) == 0xDEADBEEF
    mem.write_u64(0x10008, 0x0102030405060708)
    assert mem.read(0x10008, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    mem.write_u16(0x10010, 0xABCD)
    mem.write_u8(0x10012, 0xEE)
    assert mem.read(0x10010, 3) == b"\xcd\xab\xee"


def test_unbacked_read_names_first_missing_byte(mem):
    with pytest.raises(UnbackedMemoryError) as err:
        mem.read(0x3FF0, 0x20)  # 0x4000 is past the file slice
    assert err.value.address == 0x4000
    assert "0x4000" in str(err.value)
    assert not mem.is_backed(0x3FF0, 0x20)
    assert mem.is_backed(0x1000, 0x3000)


def test_write_checks_whole_span_before_writing(mem):
    before = mem.read(0x3FF0, 0x10)
    with pytest.raises(UnbackedMemoryError):
        mem.write(0x3FF0, b"\xff" * 0x20)
    assert mem.read(0x3FF0, 0x10) == before


def test_file_backing_is_copy_on_write(tmp_path):
    side = tmp_path / "side.bin"
    side.write_bytes(b"\x01" * 0x3000)
    m = PhysicalMemory()
    m.add_file(0x0, side, 0x1000, 0x1000)
    m.write_u8(0x10, 0x99)
    assert m.read_u8(0x10) == 0x99
    m.close()
    assert side.read_bytes() == b"\x01" * 0x3000


def test_unaligned_file_offset(tmp_path):
    # QEMU's PT_LOAD offsets are not page aligned (0x7c8 in a real dump).
    side = tmp_path / "core"
    side.write_bytes(b"\0" * 0x7C8 + b"\x42" * 0x1000 + b"\x43" * 0x1000)
    m = PhysicalMemory()
    m.add_file(0x5000, side, 0x7C8, 0x2000)
    assert m.read(0x5000, 2) == b"\x42\x42"
    assert m.read_u8(0x6000) == 0x43
    assert m.frame(5)[0] == 0x4242424242424242


def test_side_file_shorter_than_slice(tmp_path):
    side = tmp_path / "short.bin"
    side.write_bytes(b"\0" * 0x1800)
    with pytest.raises(SnapshotError, match="shorter than the slice"):
        PhysicalMemory().add_file(0, side, 0, 0x2000)


def test_missing_side_file(tmp_path):
    with pytest.raises(SnapshotError, match="cannot map side file"):
        PhysicalMemory().add_file(0, tmp_path / "nope.bin", 0, 0x1000)


@pytest.mark.parametrize(
    ("base", "size", "reason"),
    [
        (0x1800, 0x1000, "not aligned"),
        (0x1000, 0x800, "not aligned"),
        (0x1000, 0, "not positive"),
        (1 << 52, 0x1000, "exceeds 52 bits"),
    ],
)
def test_bad_ranges(base, size, reason):
    with pytest.raises(MemoryAccessError, match=reason):
        PhysicalMemory().add_zero(base, size)


def test_overlap_is_rejected(mem):
    with pytest.raises(MemoryAccessError, match="overlaps 0x2000\\+0x2000 at 0x3000"):
        mem.add_zero(0x3000, 0x2000)


def test_frame_is_a_writable_view(mem):
    frame = mem.frame(0x10)
    assert frame.dtype == np.dtype("<u8") and frame.shape == (512,)
    frame[3] = 0x1234
    assert mem.read_u64(0x10018) == 0x1234
    assert mem.frame_backed(0x10) and not mem.frame_backed(0x20)
    with pytest.raises(UnbackedMemoryError):
        mem.frame(0x20)


def test_contiguous_ranges_merge_adjacent_regions(mem):
    assert list(mem.contiguous_ranges()) == [(0x1000, 0x3000), (0x10000, 0x3000)]
    assert mem.total_size == 0x6000
    assert [r.kind for r in mem.regions] == [BackingKind.INLINE, BackingKind.FILE, BackingKind.ZERO]


def test_host_ranges_point_at_the_same_bytes(mem):
    hosts = mem.host_ranges()
    assert [(h.base, h.size) for h in hosts] == [(r.base, r.size) for r in mem.regions]
    file_host = hosts[1]
    assert ctypes.string_at(file_host.address, 4) == bytes(range(4))
    ctypes.memmove(file_host.address + 8, b"\x77", 1)  # as Unicorn would write
    assert mem.read_u8(0x2008) == 0x77


def test_large_zero_range_costs_nothing_until_touched():
    m = PhysicalMemory()
    m.add_zero(0, 1 << 34)  # 16 GiB of address space, lazily allocated
    m.write_u64((1 << 34) - 8, 7)
    assert m.read_u64((1 << 34) - 8) == 7
    assert m.read_u64(1 << 33) == 0
    m.close()


def test_close_releases_file(tmp_path):
    side = tmp_path / "s.bin"
    side.write_bytes(b"\0" * 0x1000)
    m = PhysicalMemory()
    m.add_file(0, side, 0, 0x1000)
    m.close()
    os.unlink(side)
    assert m.regions == ()


def _mappings_of(path) -> int:
    """How many lines of /proc/self/maps map ``path`` (the kernel's own count of our mmaps)."""
    target = " " + str(path.resolve())
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip("\n").endswith(target))


def test_ranges_of_one_file_share_one_mapping(tmp_path):
    # A capture's side file: thousands of one-frame runs, placed in reverse order.
    count = 10_000
    side = tmp_path / "frames.phys"
    pages = np.zeros((count, 512), dtype="<u8")
    pages[:, 0] = np.arange(1, count + 1)  # page i starts with the u64 i + 1
    pages.tofile(side)
    m = PhysicalMemory()
    assert _mappings_of(side) == 0
    for i in range(count):
        m.add_file((count - 1 - i) * 0x2000, side, i * 0x1000, 0x1000)
    assert _mappings_of(side) == 1
    assert len(m.regions) == count
    assert all(m.read_u64((count - 1 - i) * 0x2000) == i + 1 for i in range(count))

    hosts = m.host_ranges()
    assert [(h.base, h.size) for h in hosts] == [(i * 0x2000, 0x1000) for i in range(count)]
    first = hosts[-1].address  # file page 0 is at the highest physical address
    for k, h in enumerate(hosts):
        i = count - 1 - k
        assert h.address == first + i * 0x1000
        assert ctypes.string_at(h.address, 8) == (i + 1).to_bytes(8, "little")
    ctypes.memmove(hosts[0].address + 8, b"\x55", 1)  # as Unicorn would write
    assert m.read_u8(8) == 0x55 and m.read_u8(0x2008) == 0
    assert _mappings_of(side) == 1
    del hosts, h
    m.close()
    assert _mappings_of(side) == 0
    assert np.fromfile(side, dtype="<u8")[1] == 0  # copy-on-write: the file never changed


def test_ranges_aliasing_the_same_file_bytes_stay_independent(tmp_path):
    side = tmp_path / "alias.bin"
    side.write_bytes(b"\x01" * 0x1000 + b"\x02" * 0x2000)
    m = PhysicalMemory()
    m.add_file(0x0, side, 0x1000, 0x2000)
    m.add_file(0x10000, side, 0x2000, 0x1000)  # the second page of the first range again
    m.add_file(0x20000, side, 0x0, 0x1000)  # disjoint: shares the file's mapping
    assert _mappings_of(side) == 2
    m.write_u8(0x1010, 0x99)
    assert (m.read_u8(0x1010), m.read_u8(0x10010), m.read_u8(0x20010)) == (0x99, 0x02, 0x01)
    m.write_u8(0x10020, 0x77)
    assert (m.read_u8(0x1020), m.read_u8(0x10020)) == (0x02, 0x77)
    m.close()
    assert _mappings_of(side) == 0
    assert side.read_bytes() == b"\x01" * 0x1000 + b"\x02" * 0x2000
