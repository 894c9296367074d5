"""Record a run's trap log to a trace, and replay a trace to check it still happens.

:func:`record` opens a snapshot, runs a :class:`~.debugger.Debugger` with every
vector's policy ``deliver`` (the guest's handlers run, as on hardware), its
breakpoints armed, and interrupts injected at fixed instruction counts, and writes
every :class:`~.events.TrapEvent` to a trace (:mod:`.trace`) as it happens.
:func:`replay` runs the snapshot again with the options the trace's header names
and compares event by event; the first divergence is reported field by field:

    event 7 (#PF at icount 1234): field rip: recorded 0x401000, replayed 0x401003

A run is one command after another: ``cont`` (or ``until`` the header's address)
with a count that ends where the next injection is due; the budget stop that
ends such a leg is not an event of the run and is not recorded (events are
renumbered so ``seq`` has no gaps). The run ends with the first other stop
(``until``, ``halt``, ``budget``, ``triple fault`` …), or after ``max_events``
events with a ``user-stop``; that stop is the trace's last event.

The CLI verbs are :func:`record_main`/:func:`replay_main` with their argument
tables :func:`add_record_arguments`/:func:`add_replay_arguments`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .. import __version__
from ..arch.vectors import NUM_VECTORS
from ..emulator.control import StopKind
from ..emulator.machine import Machine
from ..errors import CommandError, TraceError
from ..pagetables.context import KernelContext, open_context
from .debugger import Debugger
from .events import TrapEvent, TrapKind
from .exceptions import TrapPolicy
from .trace import RecordOptions, TraceHeader, TraceReader, TraceWriter, read_header

__all__ = [
    "Divergence",
    "FieldDifference",
    "RecordResult",
    "ReplayResult",
    "SnapshotSource",
    "add_record_arguments",
    "add_replay_arguments",
    "compare_events",
    "describe_replay",
    "record",
    "record_main",
    "replay",
    "replay_main",
    "run_events",
    "snapshot_for_trace",
]

PathLike = str | os.PathLike[str]
# Fields printed in decimal; every other integer is an address, selector or error code.
_DECIMAL_FIELDS = frozenset({"seq", "icount", "vector", "cpl"})
_BUDGET = StopKind.BUDGET.value


# -- driving a run -----------------------------------------------------------------------


def _run_leg(dbg: Debugger, until: int | None, count: int | None) -> TrapEvent:
    if until is None:
        return dbg.cont(count=count)
    return dbg.until(until, count=count)


def run_events(
    dbg: Debugger, options: RecordOptions, sink: Callable[[TrapEvent], None]
) -> TrapEvent:
    """Drive ``dbg`` as ``options`` say, passing every event of the run to ``sink``.

    Events reach ``sink`` renumbered from 0, the final stop last; it is also returned.
    ``sink`` may call ``dbg.stop()`` to end the run early (with a ``user-stop``).
    """
    for vector in range(NUM_VECTORS):
        dbg.set_policy(vector, TrapPolicy.DELIVER)
    for address in options.breaks:
        dbg.break_at(address)
    machine = dbg.machine
    injections = sorted(options.inject)
    budget_end = None if options.budget is None else machine.icount + options.budget
    sent = 0

    def forward(event: TrapEvent) -> None:
        nonlocal sent
        if event.kind is TrapKind.STOP:
            return  # the driver decides whether a stop ends the run
        sink(event.with_seq(sent))
        sent += 1
        if sent >= options.max_events:
            dbg.stop()

    dbg.on_event.append(forward)
    try:
        while True:
            icount = machine.icount
            while injections and injections[0][0] <= icount:
                dbg.inject(injections.pop(0)[1])
            if sent >= options.max_events:
                # Reached by an injection, outside a command: stop where the run is.
                final = replace(dbg.cont(count=0), name=StopKind.USER_STOP.value)
                break
            ends = [
                n for n in (budget_end, injections[0][0] if injections else None) if n is not None
            ]
            count = None if not ends else max(min(ends) - icount, 0)
            final = _run_leg(dbg, options.until, count)
            if final.kind is not TrapKind.STOP:
                continue  # a breakpoint: recorded, and the run goes on
            at_injection = bool(injections) and machine.icount == injections[0][0]
            if final.name == _BUDGET and at_injection and machine.icount != budget_end:
                continue
            break
    finally:
        dbg.on_event.remove(forward)
    final = final.with_seq(sent)
    sink(final)
    return final


@dataclass
class _Opened:
    ctx: KernelContext
    machine: Machine
    debugger: Debugger

    def close(self) -> None:
        self.machine.close()
        self.ctx.close()


@dataclass(frozen=True)
class SnapshotSource:
    """How to open a snapshot path: a kctx JSON document or a QEMU ELF core (see
    :func:`~kctx_debug.pagetables.context.open_context`)."""

    cpu: int = 0  # the vCPU of a QEMU dump
    symbols: PathLike | None = None  # System.map, kallsyms or vmlinux for a QEMU dump
    allow_outside: bool = False  # side files may live outside the document's folder

    def open(self, path: PathLike) -> KernelContext:
        return open_context(
            path, allow_outside=self.allow_outside, cpu=self.cpu, symbols=self.symbols
        )


def _open(snapshot_path: PathLike, source: SnapshotSource) -> _Opened:
    ctx = source.open(snapshot_path)
    try:
        machine = Machine.from_context(ctx)
        return _Opened(ctx, machine, Debugger(machine))
    except BaseException:
        ctx.close()
        raise


# -- recording -------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordResult:
    trace: Path
    events: int  # including the final stop
    final: TrapEvent
    seconds: float


def record(
    snapshot_path: PathLike,
    trace_path: PathLike,
    *,
    breaks: tuple[int, ...] | list[int] = (),
    until: int | None = None,
    inject: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    max_events: int = 100_000,
    budget: int | None = None,
    fsync: bool = False,
    source: SnapshotSource = SnapshotSource(),
) -> RecordResult:
    """Run the snapshot (a document or a QEMU dump) with every trap delivered and
    write its trace; the header names the snapshot file and its content hash.

    :param breaks: breakpoint addresses (each hit is an event; the run goes on).
    :param until: end the run when RIP reaches this address.
    :param inject: (instruction count, vector) pairs, delivered at those counts.
    :param max_events: end the run after this many events (then a ``user-stop``).
    :param budget: end the run after this many guest instructions.
    :param source: how to open ``snapshot_path`` (the vCPU of a dump …).
    :raises KctxError: the snapshot cannot be opened or run, or the trace written.
    """
    options = RecordOptions(
        breaks=tuple(breaks),
        until=until,
        inject=tuple((n, v) for n, v in inject),
        max_events=max_events,
        budget=budget,
    )
    if max_events < 1:
        raise CommandError(f"max_events must be at least 1, got {max_events}")
    opened = _open(snapshot_path, source)
    started = time.perf_counter()
    try:
        header = TraceHeader(
            snapshot=Path(snapshot_path).name,
            snapshot_hash=opened.ctx.snapshot.content_hash(),
            tool_version=__version__,
            options=options,
        )
        with TraceWriter(trace_path, header, fsync=fsync) as writer:
            final = run_events(opened.debugger, options, writer.write)
            count = writer.events_written
    finally:
        opened.close()
    return RecordResult(Path(trace_path), count, final, time.perf_counter() - started)


# -- replaying -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDifference:
    field: str  # a TrapEvent field, or ``regs.NAME``
    recorded: object
    replayed: object

    def __str__(self) -> str:
        return (
            f"field {self.field}: recorded {_show(self.field, self.recorded)}, "
            f"replayed {_show(self.field, self.replayed)}"
        )


def _show(name: str, value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and name not in _DECIMAL_FIELDS:
        return f"{value:#x}"
    return "absent" if value is None else str(value)


def compare_events(recorded: TrapEvent, replayed: TrapEvent) -> tuple[FieldDifference, ...]:
    """Every field that differs, in the JSON form's order (registers one by one)."""
    a, b = recorded.to_json(), replayed.to_json()
    out = []
    for key in a:
        if key == "regs":
            for reg in list(a["regs"]) + [r for r in b["regs"] if r not in a["regs"]]:
                if a["regs"].get(reg) != b["regs"].get(reg):
                    out.append(
                        FieldDifference(f"regs.{reg}", a["regs"].get(reg), b["regs"].get(reg))
                    )
        elif a[key] != b[key]:
            out.append(FieldDifference(key, a[key], b[key]))
    return tuple(out)


def _label(event: TrapEvent) -> str:
    what = event.name or event.kind.value
    return f"{what} at icount {event.icount}"


@dataclass(frozen=True)
class Divergence:
    """The first event that differs (``recorded``/``replayed`` None: that side ended)."""

    seq: int
    recorded: TrapEvent | None
    replayed: TrapEvent | None
    differences: tuple[FieldDifference, ...] = ()

    def __str__(self) -> str:
        if self.recorded is None:
            assert self.replayed is not None
            return (
                f"event {self.seq}: the recorded trace ends here, "
                f"the replay goes on with {_label(self.replayed)}"
            )
        head = f"event {self.seq} ({_label(self.recorded)})"
        if self.replayed is None:
            return f"{head}: the replay ended before it"
        return f"{head}: " + "\n  ".join(str(d) for d in self.differences)


@dataclass(frozen=True)
class ReplayResult:
    trace: Path
    snapshot: Path
    events: int  # events compared (identical ones, plus the divergent one)
    recorded_hash: str
    replayed_hash: str
    divergence: Divergence | None
    seconds: float

    @property
    def hash_matches(self) -> bool:
        return self.recorded_hash == self.replayed_hash

    @property
    def ok(self) -> bool:
        return self.divergence is None and self.hash_matches


def describe_replay(result: ReplayResult) -> str:
    """``identical: 12 events (…)``, or the first divergence then the hash note."""
    lines = []
    if result.divergence is not None:
        lines.append(f"{result.trace.name}: {result.divergence}")
    if not result.hash_matches:
        lines.append(
            f"{result.trace.name}: snapshot hash: recorded {result.recorded_hash}, "
            f"replayed {result.replayed_hash} ({result.snapshot.name} is not the recorded snapshot)"
        )
    if not lines:
        lines.append(f"{result.trace.name}: identical: {result.events} events")
    return "\n".join(lines)


def snapshot_for_trace(trace_path: PathLike) -> Path:
    """The snapshot (document or QEMU dump) a trace's header names, in the trace's folder.

    :raises TraceError: the header is malformed.
    :raises CommandError: no such snapshot next to the trace.
    """
    trace_path = Path(trace_path)
    path = trace_path.parent / read_header(trace_path).snapshot
    if not path.is_file():
        raise CommandError(f"{trace_path.name}: its snapshot {path.name} is not next to it")
    return path


def replay(
    snapshot_path: PathLike, trace_path: PathLike, source: SnapshotSource = SnapshotSource()
) -> ReplayResult:
    """Run the snapshot as the trace's header says and compare every event.

    ``source`` says how to open the snapshot (a QEMU dump's vCPU …); the header
    does not record it, but a different vCPU gives a different snapshot hash.
    The run stops at the first divergence. The trace is read as the run goes
    (a long trace is never held in memory).

    :raises TraceError: the trace is malformed (naming the line and field).
    :raises KctxError: the snapshot cannot be opened.
    """
    started = time.perf_counter()
    with TraceReader(trace_path) as reader:
        if reader.header.origin == "repl":
            raise TraceError(
                str(trace_path),
                1,
                "origin: recorded interactively in the REPL, from the session's state at "
                "'record start': it documents that session and cannot be replayed "
                "(record replayable traces with 'kctx-debug record')",
            )
        recorded = iter(reader)
        opened = _open(snapshot_path, source)
        try:
            replayed_hash = opened.ctx.snapshot.content_hash()
            state = _Comparison(recorded, opened.debugger)
            run_events(opened.debugger, reader.header.options, state.take)
            divergence = state.finish()
        finally:
            opened.close()
        header = reader.header
    return ReplayResult(
        Path(trace_path),
        Path(snapshot_path),
        state.compared,
        header.snapshot_hash,
        replayed_hash,
        divergence,
        time.perf_counter() - started,
    )


class _Comparison:
    """Compares replayed events with the recorded stream as they come."""

    def __init__(self, recorded: Iterator[TrapEvent], dbg: Debugger) -> None:
        self._recorded = recorded
        self._dbg = dbg
        self.compared = 0
        self.divergence: Divergence | None = None

    def take(self, event: TrapEvent) -> None:
        if self.divergence is not None:
            return
        self.compared += 1
        expected = next(self._recorded, None)
        if expected is None:
            self.divergence = Divergence(event.seq, None, event)
        else:
            diff = compare_events(expected, event)
            if diff:
                self.divergence = Divergence(event.seq, expected, event, diff)
        if self.divergence is not None:
            self._dbg.stop()

    def finish(self) -> Divergence | None:
        if self.divergence is None:
            missing = next(self._recorded, None)
            if missing is not None:
                self.divergence = Divergence(missing.seq, missing, None)
        return self.divergence


# -- command line -------------------------------------------------------------------------


def _address(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text  # a symbol, resolved once the snapshot is open


def _injection(text: str) -> tuple[int, int]:
    count, sep, vector = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(count, 0), int(vector, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ICOUNT:VECTOR, got {text!r}") from None


# Bounds a CLI recording of code that never stops: about a second of emulation.
DEFAULT_RECORD_BUDGET = 100_000_000


def _add_snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshot", help="kctx JSON snapshot or QEMU dump-guest-memory ELF core")
    parser.add_argument("--cpu", type=int, default=0, help="vCPU of a QEMU dump (default 0)")
    parser.add_argument("--symbols", help="System.map, kallsyms or vmlinux for a QEMU dump")
    parser.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let side files live outside the snapshot's folder",
    )


def _source(args: argparse.Namespace) -> SnapshotSource:
    return SnapshotSource(args.cpu, args.symbols, args.allow_outside_paths)


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``record`` verb: ``record SNAPSHOT -o TRACE [--break A] [--until A] [--inject N:V]``
    (``--cpu N`` and ``--symbols FILE`` for a QEMU dump)."""
    _add_snapshot_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="trace to write (.ktrace.jsonl)")
    parser.add_argument(
        "--break",
        dest="breaks",
        action="append",
        default=[],
        type=_address,
        metavar="ADDR",
        help="breakpoint (address or symbol; repeatable)",
    )
    parser.add_argument(
        "--until",
        type=_address,
        metavar="ADDR",
        help="end the run when RIP reaches ADDR (address or symbol)",
    )
    parser.add_argument(
        "--inject",
        action="append",
        default=[],
        type=_injection,
        metavar="ICOUNT:VECTOR",
        help="deliver VECTOR when ICOUNT instructions have run (repeatable)",
    )
    parser.add_argument("--max-events", type=int, default=100_000, help="stop after N events")
    parser.add_argument(
        "--budget",
        type=int,
        default=DEFAULT_RECORD_BUDGET,
        help="stop after N guest instructions (default %(default)s, so a loop cannot run forever)",
    )
    parser.set_defaults(func=record_main)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``replay`` verb: ``replay SNAPSHOT TRACE [--cpu N]``; exit 0 identical, 1 otherwise."""
    _add_snapshot_arguments(parser)
    parser.add_argument("trace", help="trace to replay (.ktrace.jsonl)")
    parser.set_defaults(func=replay_main)


def _resolve(snapshot: str, source: SnapshotSource, values: list[int | str]) -> list[int]:
    if all(isinstance(v, int) for v in values):
        return [int(v) for v in values]
    ctx = source.open(snapshot)
    try:
        return [v if isinstance(v, int) else ctx.symbols.address(v) for v in values]
    finally:
        ctx.close()


def record_main(args: argparse.Namespace) -> int:
    """Run ``record`` from parsed arguments; prints one summary line."""
    source = _source(args)
    addresses = _resolve(
        args.snapshot, source, [*args.breaks, *([args.until] if args.until else [])]
    )
    breaks = addresses[: len(args.breaks)]
    until = addresses[len(args.breaks)] if args.until is not None else None
    result = record(
        args.snapshot,
        args.output,
        breaks=breaks,
        until=until,
        inject=args.inject,
        max_events=args.max_events,
        budget=args.budget,
        source=source,
    )
    print(
        f"recorded {result.events} events to {result.trace} "
        f"(ended: {result.final.name} at icount {result.final.icount})"
    )
    return 0


def replay_main(args: argparse.Namespace) -> int:
    """Run ``replay`` from parsed arguments: 0 identical, 1 with the first divergence."""
    result = replay(args.snapshot, args.trace, _source(args))
    print(describe_replay(result))
    return 0 if result.ok else 1
