"""Benchmark: vectorized translate_many() against per-address translate().

Builds a Linux-like 4-level address space (2 MiB direct map of 4 GiB, kernel
text in 2 MiB pages, modules and vmalloc in 4 KiB pages, a user process with
text, heap, libraries and stack), draws random addresses (80% inside mappings,
20% anywhere in the canonical halves), translates them all with
``translate_many`` and a subsample one by one with ``translate``, checks the two
agree on the subsample, and prints addresses per second for both and the ratio.

Run: ``python bench/pagetables_translate.py [--count N] [--sample N]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kctx_debug.pagetables.batch import translate_many
from kctx_debug.pagetables.walk import CpuPagingState, translate
from kctx_debug.physmem import PhysicalMemory

P, RW, US, A, D, PS, G = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80, 0x100
XD = 1 << 63
KB, MB, GB = 1 << 10, 1 << 20, 1 << 30
PML4 = 0x10_0000

# (start VA, size, page size, leaf flags): the regions a small Linux guest maps.
REGIONS = [
    (0xFFFF_8880_0000_0000, 4 * GB, 2 * MB, P | RW | A | D | G | XD),  # direct map
    (0xFFFF_FFFF_8100_0000, 32 * MB, 2 * MB, P | A | G),  # kernel text
    (0xFFFF_FFFF_8300_0000, 8 * MB, 4 * KB, P | RW | A | D | G | XD),  # kernel data/bss
    (0xFFFF_FFFF_A000_0000, 16 * MB, 4 * KB, P | A | G),  # modules
    (0xFFFF_C900_0000_0000, 64 * MB, 4 * KB, P | RW | A | D | G | XD),  # vmalloc
    (0x0000_0000_0040_0000, 2 * MB, 4 * KB, P | US | A),  # user text
    (0x0000_0000_0100_0000, 16 * MB, 4 * KB, P | RW | US | A | D | XD),  # heap
    (0x0000_7F00_0000_0000, 24 * MB, 4 * KB, P | US | A),  # shared libraries
    (0x0000_7FFF_FFFD_E000, 132 * KB, 4 * KB, P | RW | US | A | D | XD),  # stack
]


class TableBuilder:
    """Writes 4-level tables into ``mem``, allocating table frames upwards."""

    def __init__(self, mem: PhysicalMemory) -> None:
        self.mem = mem
        self.next_frame = PML4 + 0x1000
        self.tables: dict[tuple[int, int], int] = {}  # (table, index) -> child table

    def child(self, table: int, index: int, user: bool) -> int:
        key = (table, index)
        if key not in self.tables:
            self.tables[key] = self.next_frame
            self.next_frame += 0x1000
            flags = P | RW | A | (US if user else 0)
            self.mem.write_u64(table + 8 * index, self.tables[key] | flags)
        return self.tables[key]

    def map(self, va: int, phys: int, page_size: int, flags: int) -> None:
        user = bool(flags & US)
        table = PML4
        for shift in (39, 30, 21, 12):
            index = (va >> shift) & 0x1FF
            if 1 << shift == page_size:
                large = PS if page_size > 4 * KB else 0
                self.mem.write_u64(table + 8 * index, phys | flags | large)
                return
            table = self.child(table, index, user)


def build() -> tuple[PhysicalMemory, CpuPagingState]:
    mem = PhysicalMemory()
    mem.add_zero(0, 64 * MB)
    builder = TableBuilder(mem)
    phys = 0
    for start, size, page_size, flags in REGIONS:
        for offset in range(0, size, page_size):
            phys = (phys + page_size - 1) & ~(page_size - 1)
            builder.map(start + offset, phys, page_size, flags)
            phys += page_size
    cpu = CpuPagingState.from_registers(
        cr0=0x8005_0033, cr3=PML4, cr4=0x3406E0, efer=0xD01, maxphyaddr=46
    )
    return mem, cpu


def random_addresses(rng: np.random.Generator, count: int) -> np.ndarray:
    starts = np.array([r[0] for r in REGIONS], dtype=np.uint64)
    sizes = np.array([r[1] for r in REGIONS], dtype=np.uint64)
    inside = int(count * 0.8)
    which = rng.integers(0, len(REGIONS), size=inside)
    offsets = (rng.random(inside) * sizes[which].astype(np.float64)).astype(np.uint64)
    mapped = starts[which] + offsets
    anywhere = rng.integers(0, 1 << 47, size=count - inside, dtype=np.uint64)
    upper = rng.random(count - inside) < 0.5
    anywhere[upper] |= np.uint64(0xFFFF_8000_0000_0000)
    vas = np.concatenate([mapped, anywhere])
    rng.shuffle(vas)
    return vas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="addresses in the batch")
    parser.add_argument("--sample", type=int, default=50_000, help="addresses walked one by one")
    args = parser.parse_args()

    mem, cpu = build()
    rng = np.random.default_rng(2024)
    vas = random_addresses(rng, args.count)

    t0 = time.perf_counter()
    batch = translate_many(mem, vas, cpu)
    batch_s = time.perf_counter() - t0

    sample = vas[: args.sample].tolist()
    t0 = time.perf_counter()
    walks = [translate(mem, va, cpu) for va in sample]
    single_s = time.perf_counter() - t0

    for i, walk in enumerate(walks):
        if bool(batch.ok[i]) != walk.ok or int(batch.phys[i]) != (walk.phys or 0):
            raise SystemExit(f"MISMATCH at {sample[i]:#x}: batch and translate() disagree")

    batch_rate = args.count / batch_s
    single_rate = args.sample / single_s
    mapped = int(batch.ok.sum())
    print(f"address space: {len(REGIONS)} regions, {mapped}/{args.count} sampled addresses mapped")
    print(f"translate_many: {args.count} addresses in {batch_s:.3f} s = {batch_rate:,.0f} addr/s")
    print(
        f"translate():    {args.sample} addresses in {single_s:.3f} s = {single_rate:,.0f} addr/s "
        f"({1e6 / single_rate:.1f} us each; {args.count / single_rate:.1f} s for all {args.count})"
    )
    print(f"ratio: {batch_rate / single_rate:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
