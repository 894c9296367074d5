"""``kctx-debug capture PID -o snap.json``: a live process as a kernel-context snapshot.

The process is stopped (every thread, :mod:`.ptrace`), its registers and
present pages are copied (:mod:`.reader`), and it is released unchanged. The
snapshot places each page at its real physical frame (or a synthetic one when
PFNs are hidden), stores the contents once per frame in ``<name>.phys`` next to
the document, records the pagemap entries for offline cross-checks, and adds a
synthesized kernel context (:mod:`.synth`). Both files are written through
temporary names and renamed only once the process has been released alive: a
process that dies mid-capture leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import KctxError
from ..physmem import PAGE_SIZE
from ..snapshot import MemoryRange, PagemapRecord, RangeKind, Snapshot
from ..snapshot_io import check_output_path, snapshot_to_json
from .errors import CaptureError, NoSuchProcessError
from .pagestore import PageStore
from .procmaps import read_maps, read_status
from .ptrace import YAMA_PTRACE_SCOPE, PtraceCalls, StopKind, StoppedProcess, UserRegs
from .reader import SYNTHETIC_BASE_FRAME, CapturedVma, MemoryReader, PfnMode, pfns_visible
from .synth import KernelContextSpec, synthesize

__all__ = [
    "CaptureResult",
    "add_capture_arguments",
    "capture_main",
    "capture_process",
    "describe_capture",
    "run_capture",
    "side_file_path",
]

_LA57_USER_TOP = 1 << 47  # above it a process needs 5-level paging
_INDENT_LIMIT = 20000  # records above which the document is written without indentation
# A syscall interrupted by our stop returns one of these; the kernel restarts it on
# resume (include/linux/errno.h: ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND,
# ERESTART_RESTARTBLOCK).
_RESTART_ERRNOS = {
    512: "ERESTARTSYS",
    513: "ERESTARTNOINTR",
    514: "ERESTARTNOHAND",
    516: "ERESTART_RESTARTBLOCK",
}


@dataclass(frozen=True)
class CaptureResult:
    snapshot: Snapshot
    json_path: Path
    phys_path: Path
    pfn_mode: PfnMode
    pages: int  # virtual pages captured
    frames: int  # distinct frames stored
    captured: tuple[CapturedVma, ...]
    seconds: float  # from attach to release

    @property
    def unreadable(self) -> int:
        return sum(c.unreadable for c in self.captured)

    @property
    def skipped(self) -> tuple[CapturedVma, ...]:
        return tuple(c for c in self.captured if c.skipped)


def side_file_path(output: Path) -> Path:
    """``snap.json`` -> ``snap.phys``, the name ``save_snapshot`` gives a side file."""
    return output.with_name(output.name.removesuffix(".json") + ".phys")


def capture_process(
    pid: int,
    output: str | os.PathLike[str],
    *,
    synthetic: bool = False,
    calls: PtraceCalls | None = None,
    yama_path: Path = YAMA_PTRACE_SCOPE,
    on_stopped: Callable[[StoppedProcess], None] | None = None,
) -> CaptureResult:
    """Capture process ``pid`` into the snapshot ``output`` (plus ``<name>.phys``).

    :param synthetic: place pages at synthetic frames even when real PFNs are visible.
    :param calls: the ptrace/waitpid system calls (a seam for tests).
    :param on_stopped: called while the process is stopped (a seam for tests).
    :raises NoSuchProcessError, PtracePermissionError, ProcessExitedError, CaptureError:
        one line each; nothing is written.
    """
    output = Path(output).absolute()
    _check_target(pid)
    if not output.parent.is_dir():
        raise CaptureError(f"cannot write {output}: folder {output.parent} does not exist")
    check_output_path(output)
    check_output_path(side_file_path(output))
    mode = PfnMode.SYNTHETIC if synthetic or not pfns_visible() else PfnMode.REAL
    store = PageStore(output.parent)
    try:
        started = time.monotonic()
        with StoppedProcess(pid, calls, yama_path) as stopped:
            if on_stopped is not None:
                on_stopped(stopped)
            regs = stopped.registers()
            leader, threads = stopped.leader, len(stopped.stops)
            identity = _identity(pid)
            reader = MemoryReader(pid, store, mode)
            try:
                captured = tuple(reader.read_vma(v) for v in read_maps(pid))
            finally:
                reader.close()
        seconds = time.monotonic() - started
        frames = store.frames()
        frames_end = int(frames[-1]) + 1 if len(frames) else SYNTHETIC_BASE_FRAME
        levels = 5 if any(len(c.vas) and c.vma.end > _LA57_USER_TOP for c in captured) else 4
        spec = synthesize(regs, list(captured), frames_end, levels)
        source = _source(identity, mode, regs, captured, leader.kind, leader.signal, threads, spec)
        pagemap = tuple(
            PagemapRecord(va, entry)
            for c in captured
            for va, entry in zip(c.entry_vas.tolist(), c.entries.tolist(), strict=True)
        )
        side = side_file_path(output)
        return _write(store, output, side, spec, source, pagemap, mode, captured, seconds)
    finally:
        store.close()


def _check_target(pid: int) -> None:
    if pid <= 0:
        raise NoSuchProcessError(pid, "PIDs are positive")
    if pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}"):
        raise CaptureError("cannot capture the capturing process itself")
    status = read_status(pid)
    if not status:
        raise NoSuchProcessError(pid)
    if status.get("State", "").startswith(("Z", "X")):
        raise NoSuchProcessError(pid, "it has exited and is a zombie")
    if status.get("Kthread") == "1" or "VmSize" not in status:
        name = status.get("Name", "?")
        raise CaptureError(f"PID {pid} ({name}) is a kernel thread: it has no user memory")


def _write(
    store: PageStore,
    output: Path,
    side: Path,
    spec: KernelContextSpec,
    source: dict,
    pagemap: tuple[PagemapRecord, ...],
    mode: PfnMode,
    captured: tuple[CapturedVma, ...],
    seconds: float,
) -> CaptureResult:
    temps: list[str] = []
    try:
        fd, phys_tmp = tempfile.mkstemp(prefix=f".{side.name}.", dir=output.parent)
        temps.append(phys_tmp)
        with os.fdopen(fd, "wb") as f:
            runs = store.write_sorted(f.fileno())
            f.flush()
            os.fsync(f.fileno())
        memory = (
            tuple(
                MemoryRange(
                    r.first * PAGE_SIZE,
                    r.count * PAGE_SIZE,
                    RangeKind.FILE,
                    path=side.name,
                    offset=r.offset,
                )
                for r in runs
            )
            + spec.memory
        )
        snap = Snapshot(
            spec.cpu, memory, source, spec.build, pagemap, (spec.symbols,), origin=output
        )
        # json's indenting encoder is pure Python (about 10x slower than the C one):
        # large captures are written compact.
        indent = 1 if len(pagemap) + len(memory) < _INDENT_LIMIT else None
        blob = json.dumps(snapshot_to_json(snap), indent=indent).encode() + b"\n"
        fd, json_tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
        temps.append(json_tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(phys_tmp, side)
        os.replace(json_tmp, output)
        temps.clear()
    except OSError as e:
        raise CaptureError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
    pages = sum(len(c.vas) for c in captured)
    return CaptureResult(snap, output, side, mode, pages, len(store), captured, seconds)


def _identity(pid: int) -> dict:
    """Who the process is (read while it is stopped, so it cannot exit meanwhile)."""
    status = read_status(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read(4096).split(b"\0") if a]
    except OSError:
        argv = []
    return {"pid": pid, "comm": status.get("Name", ""), "exe": exe, "cmdline": argv}


def _source(
    identity: dict,
    mode: PfnMode,
    regs: UserRegs,
    captured: tuple[CapturedVma, ...],
    stop: StopKind,
    signal: int,
    threads: int,
    spec: KernelContextSpec,
) -> dict:
    """The free-form ``source`` section: where the snapshot came from and what it lacks."""
    source: dict = {
        "tool": "kctx-debug capture",
        **identity,
        "kernel": os.uname().release,
        "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pfn": mode.value,
        "stop": stop.value,
        "threads": threads,
        "kernel_area": {"phys": hex(spec.area_base), "size": hex(spec.area_size)},
        "vmas": [_vma_json(c) for c in captured],
    }
    if mode is PfnMode.SYNTHETIC:
        source["synthetic_frames_from"] = hex(SYNTHETIC_BASE_FRAME * PAGE_SIZE)
    if stop is StopKind.SIGNAL:
        source["pending_signal"] = int(signal)
    if regs.syscall is not None:
        ret = regs.rax - (1 << 64) if regs.rax >> 63 else regs.rax
        info: dict = {"nr": regs.syscall, "rax": ret}
        if -ret in _RESTART_ERRNOS:
            info["restart"] = f"{_RESTART_ERRNOS[-ret]}: the kernel restarts it on resume"
        source["syscall"] = info
    return source


def _vma_json(c: CapturedVma) -> dict:
    out = {
        "start": hex(c.vma.start),
        "end": hex(c.vma.end),
        "perms": c.vma.perms_text,
        "path": c.vma.path,
        "pages": len(c.vas),
    }
    if c.unreadable:
        out["unreadable_pages"] = c.unreadable
    if c.skipped:
        out["skipped"] = c.skipped
    return out


def describe_capture(result: CaptureResult) -> str:
    """What the CLI prints after a capture."""
    src = result.snapshot.source
    lines = [
        f"captured PID {src['pid']} ({src['comm']}): {result.pages} pages in "
        f"{sum(1 for c in result.captured if len(c.vas))} VMAs, {result.frames} distinct "
        f"frames, {src['threads']} thread(s) stopped for {result.seconds * 1000:.0f} ms",
    ]
    if result.pfn_mode is PfnMode.SYNTHETIC:
        lines.append(
            f"PFNs: synthetic (pagemap hides PFNs without CAP_SYS_ADMIN, or --synthetic-pfns): "
            f"pages placed from {SYNTHETIC_BASE_FRAME * PAGE_SIZE:#x}"
        )
    else:
        lines.append("PFNs: real (pages sit at the physical frames the kernel reported)")
    for c in result.skipped:
        lines.append(f"skipped {c.vma.describe()}: {c.skipped}")
    if result.unreadable:
        lines.append(f"{result.unreadable} present page(s) could not be read (not captured)")
    size = result.frames * PAGE_SIZE
    lines.append(f"wrote {result.json_path} and {result.phys_path.name} ({size / 2**20:.1f} MiB)")
    return "\n".join(lines)


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``capture`` verb's arguments (for the CLI's parser table)."""
    parser.add_argument("pid", type=int, help="process to capture")
    parser.add_argument("-o", "--output", required=True, help="snapshot document to write")
    parser.add_argument(
        "--synthetic-pfns",
        action="store_true",
        help="place pages at synthetic frames even when real PFNs are visible",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the result and cross-checking it against pagemap",
    )
    parser.set_defaults(func=run_capture)


def run_capture(args: argparse.Namespace) -> int:
    """Run ``capture`` from parsed arguments; prints the summary and the cross-check."""
    result = capture_process(args.pid, args.output, synthetic=args.synthetic_pfns)
    print(describe_capture(result))
    if not args.no_verify:
        from ..pagetables.context import open_context
        from ..pagetables.pagemap import Verdict, cross_check

        ctx = open_context(result.json_path)
        try:
            entries = {r.va: r.entry for r in ctx.snapshot.pagemap}
            report = cross_check(ctx.mem, ctx.paging.root, ctx.mode, entries)
            if result.pfn_mode is PfnMode.REAL:
                print(report.describe(limit=10))
            else:
                # Every page is PFN_HIDDEN: listing them says nothing more than the counts.
                print("\n".join(report.describe().splitlines()[:2]))
                hidden = report.counts[Verdict.PFN_HIDDEN]
                print(
                    f"  (no PFNs to compare: {hidden} of {len(report)} pages are mapped in "
                    "both, which is all a synthetic-frame snapshot can show)"
                )
        finally:
            ctx.close()
    return 0


def capture_main(argv: Sequence[str] | None = None) -> int:
    """``kctx-debug capture`` as a stand-alone entry point; KctxError -> one line, exit 1."""
    parser = argparse.ArgumentParser(
        prog="kctx-debug capture",
        description="Capture a live process (registers, pages at their physical frames, "
        "pagemap) into a kernel-context snapshot, leaving it running unchanged.",
    )
    add_capture_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_capture(args)
    except KctxError as e:
        print(f"kctx-debug: {e}", file=sys.stderr)
        return 1
