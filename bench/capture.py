"""Live-capture throughput: pages per second for a child with N MiB touched.

Usage: python bench/capture.py [--mib 256] [--repeat 3] [--synthetic-pfns]

The child is a Python process that writes one byte into every page of an
N MiB buffer and sleeps. Each round captures it into a fresh folder and
reports pages/s over the whole capture (stop, copy, synthesize, write), the
time the process was held stopped, and the time to load the result and
cross-check it against its pagemap entries.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kctx_debug.capture import capture_process
from kctx_debug.pagetables.context import open_context
from kctx_debug.pagetables.pagemap import cross_check

CHILD = """
import sys, time
buf = bytearray({size})
buf[::4096] = b"\\x5a" * (len(buf) // 4096)  # one write per page: every page present
print("ready", flush=True)
time.sleep(3600)
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB the child touches")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--synthetic-pfns", action="store_true")
    args = parser.parse_args(argv)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(size=args.mib << 20)], stdout=subprocess.PIPE
    )
    try:
        if child.stdout.readline() != b"ready\n":
            raise SystemExit("child did not start")
        rates, stopped, verify = [], [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "snap.json"
                t0 = time.perf_counter()
                result = capture_process(child.pid, out, synthetic=args.synthetic_pfns)
                elapsed = time.perf_counter() - t0
                rates.append(result.pages / elapsed)
                stopped.append(result.seconds)
                t1 = time.perf_counter()
                ctx = open_context(out)
                try:
                    entries = {r.va: r.entry for r in ctx.snapshot.pagemap}
                    report = cross_check(ctx.mem, ctx.paging.root, ctx.mode, entries)
                finally:
                    ctx.close()
                verify.append(time.perf_counter() - t1)
        print(
            f"capture of a {args.mib} MiB child ({result.pages} pages, {result.frames} frames, "
            f"pfn {result.pfn_mode.value}, {args.repeat} rounds):"
        )
        print(
            f"  {statistics.median(rates):,.0f} pages/s median, {max(rates):,.0f} best "
            f"({max(rates) * 4096 / 2**20:,.0f} MiB/s)"
        )
        print(f"  process held stopped {statistics.median(stopped) * 1000:.0f} ms (median)")
        print(
            f"  load + cross-check {statistics.median(verify) * 1000:.0f} ms, "
            f"{report.percent_agree:.1f}% agree"
        )
    finally:
        child.kill()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
