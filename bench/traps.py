"""Trap benchmarks: breakpoints cost nothing between hits; how fast traps are delivered.

Prints figures measured in the same run; asserts nothing.

1. The compute loop of bench/emulator.py (100 million instructions to a final int3)
   with 64 breakpoints armed off the loop's path, run by ``Debugger.cont``, against
   ``Machine.run`` on a fresh machine and bare Unicorn with and without ``count=``
   (the same code and memory). Issue 6 asks for a ratio to bare Unicorn >= 0.8.
2. Delivery: the bundled demo's ring-3 int3 loop, each int3 delivered through the IDT
   to a CPL0 handler that returns with iretq (and one syscall round trip per 4096):
   round trips per second through ``Debugger.cont``.

Usage: ``python bench/traps.py [--iterations N] [--traps N]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.emulator.machine import Machine
from kctx_debug.pagetables.context import open_context
from kctx_debug.physmem import PhysicalMemory
from kctx_debug.traps.debugger import Debugger
from kctx_debug.traps.events import TrapKind

ARMED = 64


def _emulator_bench():
    """bench/emulator.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "bench_emulator", Path(__file__).with_name("emulator.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_debugger(emu, ctx) -> tuple[float, int]:
    dbg = Debugger(Machine.from_context(ctx))
    dbg.set_policy(3, "stop")  # the loop ends at the guest's own int3
    for i in range(ARMED):
        dbg.break_at(emu.KTEXT + 0x900 + 0x10 * i)
    dbg.machine.run(count=1000)  # warm up, as the other runs do
    dbg.machine.reg_write("rip", emu.KTEXT)
    start = time.perf_counter()
    event = dbg.cont()
    elapsed = time.perf_counter() - start
    if event.kind is not TrapKind.EXCEPTION or event.vector != 3:
        raise SystemExit(f"unexpected stop: {event}")
    return elapsed, dbg.machine.icount - 1000


def bench_breakpoints(iterations: int) -> None:
    emu = _emulator_bench()
    instructions = 1 + 4 * iterations + 1
    mem = PhysicalMemory()
    mem.add_zero(0, 0x40_0000)
    ctx = emu.build_context(mem, emu.loop_code(iterations))
    print(f"breakpoints: {instructions / 1e6:.0f} M instructions, {ARMED} breakpoints armed")
    debugger_s, executed = time_debugger(emu, ctx)
    machine_s, _ = emu.time_machine(ctx)
    bare_s = min(emu.time_bare(ctx, None) for _ in range(2))
    counted_s = min(emu.time_bare(ctx, 2 * instructions) for _ in range(2))
    print(f"  executed (exact)                    {executed}")
    for label, seconds in (
        ("Debugger.cont, 64 breakpoints", debugger_s),
        ("Machine.run", machine_s),
        ("bare Unicorn, count=", counted_s),
        ("bare Unicorn, no count", bare_s),
    ):
        print(f"  {label:36s}{instructions / seconds / 1e6:8.0f} M instr/s  {seconds:7.3f} s")
    print(f"  ratio vs Machine.run                 {machine_s / debugger_s:8.2f}")
    print(f"  ratio vs bare with count=            {counted_s / debugger_s:8.2f}  (target >= 0.8)")
    print(f"  ratio vs bare without count          {bare_s / debugger_s:8.2f}")


def bench_delivery(traps: int) -> None:
    dbg = Debugger(Machine.from_context(open_context(demo_snapshot_path())))
    start = time.perf_counter()
    while len(dbg.trap_log) < traps:
        dbg.cont(count=13 * 100)
    elapsed = time.perf_counter() - start
    delivered = sum(1 for e in dbg.trap_log if e.handler is not None)
    print(f"delivery: the demo's int3 loop, {delivered} traps delivered (CPL3 -> CPL0 -> iretq)")
    print(f"  {delivered / elapsed:8.0f} traps/s   {elapsed:7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=25_000_000, help="loop iterations")
    parser.add_argument("--traps", type=int, default=5000, help="traps to deliver")
    args = parser.parse_args()
    bench_breakpoints(args.iterations)
    bench_delivery(args.traps)


if __name__ == "__main__":
    main()
