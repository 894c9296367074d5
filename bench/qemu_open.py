"""Opening a QEMU dump must not read guest memory: time it against one full read.

Writes a sparse ELF core with one 1 GiB PT_LOAD (page tables mapping one kernel VA
patched in), then measures ``read_qemu_dump`` + ``KernelContext.from_snapshot`` +
one ``translate``, and one sequential read of the whole file with a 1 MiB buffer.
Page caches cannot be dropped here (that needs root and disturbs the machine), and
a sparse file's holes read at memory speed, so the read is a lower bound on what a
real dump on disk costs: the printed ratio understates the gap.

Run: ``.venv/bin/python bench/qemu_open.py [--size-mib 1024] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qemu.elfcore import CpuNote, Load, write_core

from kctx_debug.pagetables.context import KernelContext
from kctx_debug.qemu_dump import read_qemu_dump

VA = 0xFFFFFFFF81000000  # PML4 511, PDPT 510, PD 8 (a 2 MiB page)
PA = 0x1000000
P, RW, PS = 1, 2, 0x80  # SDM vol. 3A Table 4-19
CHUNK = 1 << 20


def write_dump(path: Path, size: int) -> None:
    """A sparse core: PML4 at 0x1000, PDPT 0x2000, PD 0x3000 mapping VA -> PA with 2 MiB."""
    segments = {
        "cs": (0x10, 0xFFFFFFFF, 0x00AF9B00, 0),
        "ss": (0x18, 0xFFFFFFFF, 0x00CF9300, 0),
        "gdt": (0, 0x7F, 0, 0xFFFFFE0000001000),
        "idt": (0, 0xFFF, 0, 0xFFFFFE0000000000),
    }
    cpu = CpuNote({"rip": VA}, segments, (0x80050033, 0, 0, 0x1000, 0xA0))
    layout = write_core(path, [cpu], [Load(0, size=size)])
    base = layout.load_offsets[0]
    with open(path, "r+b") as f:
        entries = (
            (0x1000 + 511 * 8, 0x2000 | P | RW),
            (0x2000 + 510 * 8, 0x3000 | P | RW),
            (0x3000 + 8 * 8, PA | P | RW | PS),
        )
        for phys, value in entries:
            f.seek(base + phys)
            f.write(struct.pack("<Q", value))
        f.seek(base + PA)
        f.write(b"kctx-bench")


def _io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def time_open(path: Path) -> tuple[float, int, int]:
    """Seconds to open and translate once; bytes read() meanwhile; page faults meanwhile."""
    io0, faults0 = _io_counters()["rchar"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    ctx = KernelContext.from_snapshot(read_qemu_dump(path))
    try:
        phys = ctx.virt_to_phys(VA + 0x123)
        elapsed = time.perf_counter() - t0
        assert phys == PA + 0x123 and ctx.read_virtual(VA, 10) == b"kctx-bench"
    finally:
        ctx.close()
    io1, faults1 = _io_counters()["rchar"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return elapsed, io1 - io0, faults1 - faults0


def time_read(path: Path) -> float:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="PT_LOAD size (default 1 GiB)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--dir", default=None, help="where to write the dump (default: tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.core"
        write_dump(path, args.size_mib << 20)
        opens = [time_open(path) for _ in range(args.repeat)]
        reads = [time_read(path) for _ in range(args.repeat)]
        size = os.stat(path).st_size
    open_s = statistics.median(o[0] for o in opens)
    read_s = statistics.median(reads)
    print(f"dump: {size / (1 << 30):.2f} GiB sparse ELF core, {args.repeat} runs, medians")
    print(f"open (read_qemu_dump + KernelContext + translate): {open_s * 1e3:8.2f} ms")
    print(f"  bytes read() while opening: {opens[-1][1]}, minor page faults: {opens[-1][2]}")
    print(f"sequential read, 1 MiB buffer:                     {read_s * 1e3:8.2f} ms")
    print(f"ratio open/read: {open_s / read_s:.5f} (page cache not dropped; holes read fast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
