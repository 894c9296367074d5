"""translate_many must agree with per-address translate() on every lane.

The tables are random but mixed on purpose: 4 KiB, 2 MiB and 1 GiB pages,
not-present entries, reserved bits of every kind, table frames outside the
snapshot, protection keys, in 4-level and 5-level paging; the addresses mostly
follow populated entries, with non-canonical and fully random ones mixed in.
"""

from __future__ import annotations

import numpy as np
import pytest

from kctx_debug.errors import PageTableError
from kctx_debug.pagetables.batch import BatchStatus, translate_many
from kctx_debug.pagetables.walk import CpuPagingState, FaultKind, WalkStatus, translate
from kctx_debug.physmem import PhysicalMemory

P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
XD = 1 << 63
MEM_SIZE = 8 << 20
ROOT = 0x1000
MAX_TABLES = 200

_STATUS = {
    FaultKind.NOT_PRESENT: BatchStatus.NOT_PRESENT,
    FaultKind.RESERVED: BatchStatus.RESERVED,
    FaultKind.NON_CANONICAL: BatchStatus.NON_CANONICAL,
}


class RandomTables:
    """Random page tables in 8 MiB of memory, remembering which entries are tables."""

    def __init__(self, rng: np.random.Generator, levels: int, maxphyaddr: int) -> None:
        self.rng = rng
        self.mem = PhysicalMemory()
        self.mem.add_zero(0, MEM_SIZE)
        self.maxphyaddr = maxphyaddr
        self.next_frame = ROOT + 0x1000
        self.children: dict[int, dict[int, int]] = {}  # table -> {index: child table}
        self.written: dict[int, list[int]] = {}  # table -> indices of entries written
        self.levels = levels
        self.fill(ROOT, levels - 1)

    def alloc(self) -> int:
        frame = self.next_frame
        self.next_frame += 0x1000
        return frame

    def flags(self) -> int:
        r = self.rng
        bits = P | int(r.random() < 0.8) * RW | int(r.random() < 0.6) * US
        bits |= int(r.random() < 0.2) * XD | int(r.integers(0, 16)) << 59  # protection key
        return bits | int(r.integers(0, 8)) << 9 | int(r.integers(0, 2)) << 5  # AVL, A

    def fill(self, table: int, height: int) -> None:
        r = self.rng
        self.children[table] = {}
        count = 12 if height else 40
        indices = {0, 255, 256, 511} | set(r.integers(0, 512, size=count).tolist())
        self.written[table] = sorted(indices)
        for index in indices:
            kind = r.choice(
                ["table", "large", "page", "absent", "reserved", "missing", "pat"],
                p=[0.35, 0.2, 0.2, 0.1, 0.07, 0.05, 0.03],
            )
            page = int(r.integers(0, 1 << 20)) << 12
            if height == 0:
                value = page | self.flags() | (PS if kind == "pat" else 0)
            elif kind == "table" and len(self.children) < MAX_TABLES:
                child = self.alloc()
                value = child | self.flags()
                self.children[table][index] = child
                self.fill(child, height - 1)
            elif kind in ("large", "pat") and height in (1, 2):
                size = 1 << (12 + 9 * height)
                value = page & ~(size - 1) | self.flags() | PS | (0x1000 if kind == "pat" else 0)
            elif kind == "absent":
                value = (page | self.flags()) & ~P
            elif kind == "reserved":
                bad = int(r.choice([PS, 1 << 13, *(1 << b for b in range(self.maxphyaddr, 52))]))
                value = page | self.flags() | bad
            elif kind == "missing":
                value = (MEM_SIZE + page) | self.flags()
            else:
                value = page | self.flags()
            self.mem.write_u64(table + 8 * index, value)

    def random_va(self, la57: bool) -> int:
        r = self.rng
        va, table = 0, ROOT
        for level in range(self.levels):
            populated = self.written.get(table, [])
            if populated and r.random() < 0.85:
                index = int(r.choice(populated))
            else:
                index = int(r.integers(0, 512))
            shift = 12 + 9 * (self.levels - 1 - level)
            va |= index << shift
            table = self.children.get(table, {}).get(index, 0) if table else 0
        va |= int(r.integers(0, 4096))
        bits = 57 if la57 else 48
        if va >> (bits - 1) & 1:
            va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
        return va


def cpu_for(la57: bool, maxphyaddr: int, nxe: bool, pke: bool) -> CpuPagingState:
    return CpuPagingState.from_registers(
        cr0=0x8001_0011,
        cr3=ROOT,
        cr4=0x20 | (0x1000 if la57 else 0) | (0x40_0000 if pke else 0) | 0x100_0000,
        efer=0x500 | (0x800 if nxe else 0),
        maxphyaddr=maxphyaddr,
    )


def check_equal(tables: RandomTables, cpu: CpuPagingState, vas: list[int]) -> None:
    batch = translate_many(tables.mem, np.array(vas, dtype=np.uint64), cpu)
    assert len(batch) == len(vas)
    for i, va in enumerate(vas):
        r = translate(tables.mem, va, cpu)
        got = (
            bool(batch.ok[i]),
            int(batch.phys[i]),
            int(batch.page_size[i]),
            bool(batch.writable[i]),
            bool(batch.user[i]),
            bool(batch.executable[i]),
            int(batch.pkey[i]),
            BatchStatus(int(batch.status[i])),
            int(batch.depth[i]),
        )
        if r.status is WalkStatus.NOT_CAPTURED:
            status = BatchStatus.NOT_CAPTURED
        elif r.fault is not None:
            status = _STATUS[r.fault.kind]
        else:
            status = BatchStatus.OK
        want = (
            r.ok,
            r.phys or 0,
            r.page_size or 0,
            r.writable,
            r.user,
            r.executable,
            -1 if r.pkey is None else r.pkey,
            status,
            len(r.steps) - 1,
        )
        assert got == want, f"va {va:#x}"


@pytest.mark.parametrize(
    ("seed", "la57", "maxphyaddr", "nxe", "pke"),
    [
        (1, False, 46, True, True),
        (2, False, 52, False, False),
        (3, True, 40, True, False),
        (4, True, 52, False, True),
    ],
)
def test_batch_equals_translate(seed, la57, maxphyaddr, nxe, pke):
    rng = np.random.default_rng(seed)
    tables = RandomTables(rng, 5 if la57 else 4, maxphyaddr)
    vas = [tables.random_va(la57) for _ in range(3000)]
    vas += rng.integers(0, 2**64, size=500, dtype=np.uint64).tolist()  # mostly non-canonical
    check_equal(tables, cpu_for(la57, maxphyaddr, nxe, pke), vas)


def test_batch_covers_every_outcome():
    rng = np.random.default_rng(1)
    tables = RandomTables(rng, 4, 46)
    vas = [tables.random_va(False) for _ in range(3000)] + [1 << 63]
    batch = translate_many(
        tables.mem, np.array(vas, dtype=np.uint64), cpu_for(False, 46, True, True)
    )
    assert set(batch.status.tolist()) == set(BatchStatus)
    assert set(batch.page_size[batch.ok].tolist()) == {1 << 12, 1 << 21, 1 << 30}


def test_frames_are_reread_on_every_call():
    mem = PhysicalMemory()
    mem.add_zero(0, 0x10000)
    cpu = cpu_for(False, 52, True, False)
    mem.write_u64(ROOT, 0x2000 | P)
    mem.write_u64(0x2000, 0x4000_0000 | P | PS)
    assert translate_many(mem, [0x1234], cpu).phys.tolist() == [0x4000_1234]
    mem.write_u64(0x2000, 0x8000_0000 | P | PS)
    assert translate_many(mem, [0x1234], cpu).phys.tolist() == [0x8000_1234]


def test_input_forms():
    mem = PhysicalMemory()
    mem.add_zero(0, 0x10000)
    cpu = cpu_for(False, 52, True, False)
    assert len(translate_many(mem, [], cpu)) == 0
    big = translate_many(mem, [2**64 - 1, 0], cpu)  # a Python list above 2**63
    assert big.status.tolist() == [BatchStatus.NOT_PRESENT, BatchStatus.NOT_PRESENT]
    assert translate_many(mem, np.array([5], dtype=np.int32), cpu).depth.tolist() == [0]


@pytest.mark.parametrize(
    "vas",
    [[-1], [2**64], [[1, 2]], np.array([1.5]), ["0x10"]],
    ids=["negative", "too-big", "2d", "float", "string"],
)
def test_bad_input_raises(vas):
    mem = PhysicalMemory()
    mem.add_zero(0, 0x1000)
    with pytest.raises(PageTableError):
        translate_many(mem, vas, cpu_for(False, 52, True, False))


def test_paging_off_raises():
    cpu = CpuPagingState.from_registers(cr0=0x11, cr3=0, cr4=0, efer=0)
    with pytest.raises(PageTableError):
        translate_many(PhysicalMemory(), [0], cpu)
