"""Record and replay of a 10 000-trap run: traps per second for both.

The run is the int3 fixture (fixtures/traps/int3.S) with its loop count RBX raised
to N in a temporary copy of the snapshot: N times a ring-3 int3 delivered through
the DPL3 gate, the handler's five instructions, iretq. ``record`` writes one
flushed trace line per trap; ``replay`` reruns it and compares every event.
Prints the numbers; asserts nothing (beyond the replay being identical).

Usage: ``python bench/record_replay.py [--traps N] [--fsync]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kctx_debug.traps.replay import describe_replay, record, replay

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "traps" / "int3.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traps", type=int, default=10_000)
    parser.add_argument("--fsync", action="store_true", help="fsync the trace after every line")
    args = parser.parse_args(argv)
    doc = json.loads(FIXTURE.read_text())
    doc["cpu"]["regs"]["rbx"] = hex(args.traps)
    done = next(int(e["address"], 16) for e in doc["symbols"][0]["entries"] if e["name"] == "done")
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "int3.json"
        snapshot.write_text(json.dumps(doc))
        trace = Path(tmp) / "int3.ktrace.jsonl"
        rec = record(snapshot, trace, until=done, max_events=args.traps + 1, fsync=args.fsync)
        size = trace.stat().st_size
        rep = replay(snapshot, trace)
    traps = rec.events - 1  # the last event is the stop
    print(f"run: {traps} int3 traps, {rec.final.icount} guest instructions, trace {size} bytes")
    print(f"record: {rec.seconds:.3f} s, {traps / rec.seconds:,.0f} traps/s")
    print(f"replay: {rep.seconds:.3f} s, {traps / rep.seconds:,.0f} traps/s")
    print(describe_replay(rep))
    return 0 if rep.ok and traps == args.traps else 1


if __name__ == "__main__":
    sys.exit(main())
