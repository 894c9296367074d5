"""Benchmark: REPL command latency on a 1 GiB snapshot, against the bare library call.

The bundled demo snapshot is extended with 1 GiB of RAM (physical 0x40000000, a
zero range: mapped, not read from disk) that the direct map covers with 4 KiB pages
(262 144 PTEs), and written to a temporary folder. Each command runs the way the
REPL runs a line (parse, evaluate, call, render, print to an in-memory stream) and is
compared with one Python call doing the same lookup:

- ``x/64gx ADDR`` against ``target.read_virtual(ADDR, 512)``;
- ``pt walk ADDR`` against ``target.translate(ADDR)``;
- ``info idt`` against ``decode_idt(mem, cpu, translate)``;
- ``stepi`` (context display off, then on) against ``machine.step(1)``.

Prints the median latency of each and the ratio; the issue's target is under 20 ms
per command.

Run: ``python bench/repl.py [--runs N]``
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.repl.commands import default_registry
from kctx_debug.repl.dispatch import Dispatcher
from kctx_debug.repl.output import Printer
from kctx_debug.repl.runner import execute
from kctx_debug.repl.session import Session
from kctx_debug.tables import decode_idt

GB = 1 << 30
RAM_BASE = 0x4000_0000
DIRECT_MAP = 0xFFFF_8880_0000_0000
TABLES_BASE, TABLES_SIZE = 0x80_0000, 0x40_0000  # room for 513 page tables
TARGET_MS = 20.0


def big_snapshot(folder: Path) -> Path:
    """The demo plus 1 GiB of RAM mapped 4 KiB at a time; the document's path."""
    doc = json.loads(demo_snapshot_path().read_text())
    doc["memory"].append({"base": hex(RAM_BASE), "size": hex(GB), "kind": "zero"})
    doc["memory"].append({"base": hex(TABLES_BASE), "size": hex(TABLES_SIZE), "kind": "zero"})
    tables = doc["build"]["page_tables"]
    tables["tables"] = {"base": hex(TABLES_BASE), "size": hex(TABLES_SIZE)}
    doc["cpu"]["cr3"] = hex(TABLES_BASE)  # the builder puts the top table first
    tables["mappings"].append(
        {"va": hex(DIRECT_MAP + RAM_BASE), "pa": hex(RAM_BASE), "size": hex(GB),
         "page_size": "4K", "flags": ["RW", "G", "XD"]}
    )  # fmt: skip
    path = folder / "big.json"
    path.write_text(json.dumps(doc))
    return path


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm caches (symbols, decoders, Unicorn's translation)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        session = Session.open(big_snapshot(Path(tmp)))
        opened = time.perf_counter() - started
        session.registry = default_registry()
        dispatcher = Dispatcher(session.registry, session)
        sink = io.StringIO()
        printer = Printer(sink, sink, color=False)

        def run(line: str) -> Callable[[], object]:
            def once() -> None:
                sink.seek(0)
                sink.truncate()
                if not execute(dispatcher, printer, line):
                    raise SystemExit(f"{line!r} failed: {sink.getvalue()}")

            return once

        address = DIRECT_MAP + RAM_BASE + GB // 2 + 0x123000
        execute(dispatcher, printer, "set context off")
        started = time.perf_counter()
        machine = session.machine
        built = time.perf_counter() - started
        target = session.target
        # The demo's loop, without the int3: stepi runs the same few instructions.
        target.write_virtual(0x40000E, b"\x90")
        cases = [
            ("x/64gx", run(f"x/64gx {address:#x}"), lambda: target.read_virtual(address, 512)),
            ("pt walk", run(f"pt walk {address:#x}"), lambda: target.translate(address)),
            (
                "info idt",
                run("info idt"),
                lambda: decode_idt(target.mem, target.cpu, target.virt_to_phys),
            ),
            ("stepi", run("stepi"), lambda: machine.step(1)),
        ]
        print(f"1 GiB snapshot: opened in {opened * 1e3:.0f} ms, ", end="")
        print(f"machine built in {built * 1e3:.0f} ms")
        print(f"{'command':<18}{'REPL median':>14}{'bare call':>14}{'ratio':>9}  target")
        for name, command, bare in cases:
            repl_s = median_seconds(command, args.runs)
            bare_s = median_seconds(bare, args.runs)
            ok = "ok" if repl_s * 1e3 < TARGET_MS else f"over {TARGET_MS:.0f} ms"
            print(
                f"{name:<18}{repl_s * 1e3:>11.3f} ms{bare_s * 1e3:>11.3f} ms"
                f"{repl_s / bare_s:>8.1f}x  {ok}"
            )
        execute(dispatcher, printer, "set context on")
        with_context = median_seconds(run("stepi"), args.runs)
        bare_s = median_seconds(lambda: machine.step(1), args.runs)
        ok = "ok" if with_context * 1e3 < TARGET_MS else f"over {TARGET_MS:.0f} ms"
        print(
            f"{'stepi + context':<18}{with_context * 1e3:>11.3f} ms{bare_s * 1e3:>11.3f} ms"
            f"{with_context / bare_s:>8.1f}x  {ok}"
        )
        session.close()


if __name__ == "__main__":
    main()
