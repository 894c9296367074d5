"""Emulator benchmarks: run speed against bare Unicorn, and building from a 1 GiB snapshot.

Prints ratios measured in the same run; asserts nothing.

1. A compute loop of 100 million instructions runs to a breakpoint, with 16 more
   0xCC bytes planted in code off the loop's path, through ``Machine.run``; the
   same code and memory run on a bare Unicorn engine (paging set up by hand, an
   interrupt hook that stops on int3) twice: with no count (Unicorn's top speed),
   and with ``count=`` (the per-instruction counting hook exact counts rely on).
2. ``Machine.from_context`` on a snapshot whose 1 GiB of RAM is a sparse side file,
   in a subprocess that reports its time and peak RSS (VmHWM), against a subprocess
   that reads the side file once.

Usage: ``python bench/emulator.py [--iterations N]``.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as x86

from kctx_debug.emulator.control import StopKind
from kctx_debug.emulator.machine import DEFAULT_CPU_MODEL, Machine
from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.pagetables.entry import PteFlag, paging_mode
from kctx_debug.physmem import PAGE_SIZE, PhysicalMemory
from kctx_debug.snapshot import CpuState, Segment, Snapshot

KTEXT, KDATA = 0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8100_1000
KTEXT_PA, KDATA_PA, TABLES = 0x20_0000, 0x20_1000, 0x10_0000
CR0, CR4, EFER, MSR_EFER = 0x8005_0033, 0x10_06A0, 0xD01, 0xC000_0080
# mov rcx, imm64; loop: add rax, rcx; xor rbx, rax; dec rcx; jnz loop; int3
LOOP = ("48b9", "4801c8 4831c3 48ffc9 75f5 cc")
OTHER_BREAKPOINTS = 16
GIB = 1 << 30


def loop_code(iterations: int) -> bytes:
    head, body = (bytes.fromhex(h.replace(" ", "")) for h in LOOP)
    return head + struct.pack("<Q", iterations) + body


def build_context(mem: PhysicalMemory, code: bytes) -> KernelContext:
    """Kernel text and data pages behind 4-level tables; RIP at the code, CPL0."""
    tables = PageTableBuilder(mem, paging_mode(False), TABLES, 0x4_0000)
    tables.map(KTEXT, KTEXT_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.G)
    tables.map(KDATA, KDATA_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.G | PteFlag.RW | PteFlag.XD)
    mem.write(KTEXT_PA, code)
    # 16 int3 bytes spread over the rest of the code page, never executed.
    for i in range(OTHER_BREAKPOINTS):
        mem.write(KTEXT_PA + 0x100 + i * 0x40, b"\xcc")
    cpu = CpuState(
        regs={"rip": KTEXT, "rsp": KDATA + 0xFF0, "rflags": 0x2},
        cr0=CR0,
        cr3=tables.root,
        cr4=CR4,
        msrs={"efer": EFER},
        segments={
            "cs": Segment(0x10, 0, 0xFFFF_FFFF, 0xA09B),
            "ss": Segment(0x18, 0, 0xFFFF_FFFF, 0xC093),
        },
    )
    return KernelContext(Snapshot(cpu, ()), mem)


def bare_engine(ctx: KernelContext) -> tuple[Uc, list]:
    """Unicorn alone on the same memory: CR3/CR4/EFER/CR0 and an int3 stop, nothing else."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64, DEFAULT_CPU_MODEL)
    ranges = ctx.mem.host_ranges()
    for r in ranges:
        uc.mem_map_ptr(r.base, r.size, UC_PROT_ALL, r.address)
    uc.reg_write(x86.UC_X86_REG_CR3, ctx.cpu.cr3)
    uc.reg_write(x86.UC_X86_REG_CR4, CR4)
    uc.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, EFER))
    uc.reg_write(x86.UC_X86_REG_CR0, CR0)

    def on_interrupt(uc: Uc, vector: int, _data: object) -> None:
        if vector == 3:
            uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    return uc, ranges


def time_bare(ctx: KernelContext, count: int | None) -> float:
    uc, _keep = bare_engine(ctx)
    uc.emu_start(KTEXT, 0, count=1000)  # warm up: first translation, code buffer
    start = time.perf_counter()
    uc.emu_start(KTEXT, 0, count=count or 0)
    elapsed = time.perf_counter() - start
    assert uc.reg_read(x86.UC_X86_REG_RIP) == KTEXT + len(loop_code(0))
    return elapsed


def time_machine(ctx: KernelContext) -> tuple[float, int]:
    machine = Machine.from_context(ctx)
    machine.run(count=1000)  # warm up, as for bare Unicorn
    machine.reg_write("rip", KTEXT)
    start = time.perf_counter()
    event = machine.run()
    elapsed = time.perf_counter() - start
    if event.kind is not StopKind.BREAKPOINT or event.pc != KTEXT + len(loop_code(0)) - 1:
        raise SystemExit(f"unexpected stop: {event}")
    return elapsed, event.executed


def bench_run(iterations: int) -> None:
    instructions = 1 + 4 * iterations + 1
    mem = PhysicalMemory()
    mem.add_zero(0, 0x40_0000)
    ctx = build_context(mem, loop_code(iterations))
    print(f"run: {instructions / 1e6:.0f} M instructions to int3, {OTHER_BREAKPOINTS} more armed")
    machine_s, executed = time_machine(ctx)
    bare_s = min(time_bare(ctx, None) for _ in range(2))
    counted_s = min(time_bare(ctx, 2 * instructions) for _ in range(2))
    print(f"  executed (exact)                    {executed}")
    for label, seconds in (
        ("Machine.run", machine_s),
        ("bare Unicorn, count= (same hook)", counted_s),
        ("bare Unicorn, no count", bare_s),
    ):
        print(f"  {label:36s}{instructions / seconds / 1e6:8.0f} M instr/s  {seconds:7.3f} s")
    print(f"  ratio vs bare with count=            {counted_s / machine_s:8.2f}  (target >= 0.8)")
    print(f"  ratio vs bare without count          {bare_s / machine_s:8.2f}  (target >= 0.8)")


# -- building from a 1 GiB snapshot ----------------------------------------------------------


def peak_rss() -> int:
    """This process's peak resident set (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_build(path: str, machine: bool = True) -> None:
    """In a fresh process: open the side file as a context and (unless ``machine`` is
    False) build a machine on it; print the seconds that took and the peak RSS."""
    mem = PhysicalMemory()
    mem.add_file(0, path, 0, GIB)
    ctx = build_context(mem, b"\xf4")
    start = time.perf_counter()
    if machine:
        Machine.from_context(ctx)
    print(time.perf_counter() - start, peak_rss())


def child_read(path: str) -> None:
    """In a fresh process: read the side file once; print seconds and peak RSS."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    print(time.perf_counter() - start, peak_rss())


def _child(kind: str, path: str) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, path],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def bench_build() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ram.bin")
        with open(path, "wb") as f:
            f.truncate(GIB)  # sparse: no disk blocks
        build_s, build_rss = _child("build", path)
        _zero, context_rss = _child("context", path)
        read_s, read_rss = _child("read", path)
    print("build: Machine.from_context on 1 GiB of snapshot RAM (sparse side file)")
    print(
        f"  Machine.from_context   {build_s * 1e3:8.1f} ms   peak RSS {build_rss / 2**20:7.1f} MiB"
    )
    print(f"  context only (imports) {0:8.1f} ms   peak RSS {context_rss / 2**20:7.1f} MiB")
    print(f"  read side file once    {read_s * 1e3:8.1f} ms   peak RSS {read_rss / 2**20:7.1f} MiB")
    print(f"  time ratio build/read  {build_s / read_s:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=25_000_000, help="loop iterations")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path = args.child
        if kind == "read":
            child_read(path)
        else:
            child_build(path, machine=kind == "build")
        return
    bench_run(args.iterations)
    bench_build()


if __name__ == "__main__":
    main()
