"""Benchmark: the vectorized layout dump against a naive one-entry-at-a-time walker.

Two address spaces, built with ``PageTableBuilder``:

(a) 1 000 000 present 4 KiB pages in five regions (user text, heap, libraries with
    scattered frames, the direct map with flags changing every 1000 pages, vmalloc);
(b) 512 GiB mapped with 1 GiB and 2 MiB pages.

Both are dumped with ``iter_mappings`` and with the naive recursive walker below
(pure Python, one ``mem.read_u64`` per entry, the same coalescing rule); the two
outputs are checked to be identical, then pages per second and the ratio are
printed (target: at least 20x).

Run: ``python bench/pagetables_dump.py``
"""

from __future__ import annotations

import random
import time

from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.dump import iter_mappings
from kctx_debug.pagetables.entry import ADDRESS_MASK, FOUR_LEVEL, PAT_LARGE, PagingMode, PteFlag
from kctx_debug.physmem import PhysicalMemory

KB, MB, GB = 1 << 10, 1 << 20, 1 << 30
P, RW, US, A, PS, G, XD = (PteFlag.P, PteFlag.RW, PteFlag.US, PteFlag.A, PteFlag.PS,
                           PteFlag.G, PteFlag.XD)  # fmt: skip
FLAGS_MASK = ((1 << 64) - 1) & ~ADDRESS_MASK
TABLES = 0x1_0000_0000  # table area at 4 GiB
TABLE_AREA = 32 * MB


def _builder() -> tuple[PhysicalMemory, PageTableBuilder]:
    mem = PhysicalMemory()
    mem.add_zero(TABLES, TABLE_AREA)
    return mem, PageTableBuilder(mem, FOUR_LEVEL, TABLES, TABLE_AREA)


def build_4k() -> tuple[PhysicalMemory, int, int]:
    """Space (a); returns (mem, root, present pages)."""
    mem, b = _builder()
    b.map(0x400000, 0x100000000 * 2, 100_000 * 4 * KB, 4 * KB, US)  # user text
    b.map(0x5555_5555_0000, 0x2_0000_0000 * 2, 200_000 * 4 * KB, 4 * KB, US | RW | XD)  # heap
    rng = random.Random(1)
    frames = list(range(0x300000, 0x300000 + 200_000, 16))
    rng.shuffle(frames)
    for i, pfn in enumerate(frames):  # libraries: 16-page pieces at scattered frames
        b.map(0x7F00_0000_0000 + i * 64 * KB, pfn * 4 * KB, 64 * KB, 4 * KB, US | A)
    for i in range(300):  # direct map in 4K pages, attributes alternating every 1000 pages
        flags = RW | G | XD if i % 2 else RW | G | XD | A
        b.map(0xFFFF_8880_0000_0000 + i * 1000 * 4 * KB, i * 1000 * 4 * KB, 1000 * 4 * KB,
              4 * KB, flags)  # fmt: skip
    b.map(0xFFFF_C900_0000_0000, 0x8_0000_0000, 200_000 * 4 * KB, 4 * KB, RW | G | XD)  # vmalloc
    return mem, b.root, 1_000_000


def build_large() -> tuple[PhysicalMemory, int, int]:
    """Space (b): 256 GiB in 1 GiB pages, 256 GiB in 2 MiB pages."""
    mem, b = _builder()
    b.map(0xFFFF_8880_0000_0000, 0, 256 * GB, GB, RW | G | XD)
    b.map(0xFFFF_C900_0000_0000, 256 * GB, 256 * GB, 2 * MB, RW | G | XD)
    return mem, b.root, 256 + 256 * GB // (2 * MB)


def naive_dump(mem: PhysicalMemory, root: int, mode: PagingMode) -> list[tuple]:
    """Same coalescing as iter_mappings, reading one u64 at a time (reserved bits ignored)."""
    out: list[tuple] = []
    run: list = []  # [start, key, phys, next_phys, contiguous]
    last = len(mode.levels) - 1

    def flush(end: int) -> None:
        if run:
            start, (prot, _, depth), phys, _, contiguous = run
            out.append((start, end, mode.levels[depth].name, prot, phys, contiguous))
            run.clear()

    def note(va: int, key: tuple, phys: int | None, size: int) -> None:
        if run and run[1] == key:
            if phys is not None:
                run[4] = run[4] and phys == run[3]
                run[3] = phys + size
            return
        flush(va)
        run.extend([va, key, phys, None if phys is None else phys + size, True])

    def walk(table: int, depth: int, base: int, eff_in: int, lo: int, hi: int) -> None:
        level = mode.levels[depth]
        for i in range(lo, hi):
            e = mem.read_u64(table + 8 * i)
            va = base + (i << level.shift)
            if not e & P:
                note(va, (e & FLAGS_MASK, 0, depth), None, level.page_size)
                continue
            eff = (eff_in & e & (RW | US)) | ((eff_in | e) & XD)
            if depth == last or (level.large_pages and e & PS):
                prot = e & FLAGS_MASK | (e & PAT_LARGE if level.large_pages else 0)
                phys = e & ADDRESS_MASK & ~(level.page_size - 1)
                note(va, (prot, eff, depth), phys, level.page_size)
            else:
                walk(e & ADDRESS_MASK, depth + 1, va, eff, 0, 512)

    half = 1 << (mode.va_bits - 1)
    walk(root, 0, 0, RW | US, 0, 256)
    flush(half)
    walk(root, 0, (1 << 64) - (1 << mode.va_bits), RW | US, 256, 512)
    flush(1 << 64)
    return out


def vector_dump(mem: PhysicalMemory, root: int, mode: PagingMode) -> list[tuple]:
    return [
        (r.start, r.end, r.level.name, r.entry_flags, r.phys, r.phys_contiguous)
        for r in iter_mappings(mem, root, mode)
    ]


def _timed(fn, *args, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    for name, build in (("(a) 1M x 4 KiB pages", build_4k), ("(b) 512 GiB in 1G/2M", build_large)):
        t, (mem, root, pages) = _timed(build)
        print(f"{name}: built in {t:.2f} s")
        fast, ranges = _timed(vector_dump, mem, root, FOUR_LEVEL, repeat=3)
        slow, naive = _timed(naive_dump, mem, root, FOUR_LEVEL)
        if ranges != naive:
            raise SystemExit(f"{name}: the two dumps differ")
        print(f"  {len(ranges)} ranges; {pages} leaf pages")
        print(f"  vectorized: {fast * 1e3:9.1f} ms  {pages / fast:14,.0f} pages/s")
        print(f"  naive:      {slow * 1e3:9.1f} ms  {pages / slow:14,.0f} pages/s")
        print(f"  ratio: {slow / fast:.1f}x (target >= 20x)")
        mem.close()


if __name__ == "__main__":
    main()
