"""Trap commands: inject, idt set, trap policy, info traps, record start/stop."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..arch.vectors import exception_name
from ..errors import CommandError
from ..snapshot import GENERAL_REGISTERS
from ..traps.events import TrapEvent, TrapKind
from ..traps.trace import RecordOptions, TraceHeader, TraceWriter
from .cmd_running import describe_trap, report_stop
from .overwrite import check_output_path
from .preconditions import requires_debugger, requires_recording
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .render import symbolize
from .session import Session
from .styled import Styled, join_lines

__all__ = ["COMMANDS"]


@command(
    "inject",
    args=(Arg("vector", ArgKind.VECTOR, "vector number or name (#PF, nmi, 0x20)"),),
    flags=(
        Flag("error", "the error code to push (vectors that push one)", "N", ArgKind.EXPR),
        Flag("cr2", "CR2 for a #PF", "ADDR", ArgKind.EXPR),
        Flag("force", "deliver a maskable interrupt even with RFLAGS.IF clear"),
    ),
    examples=("inject 0x20", "inject #PF --error 2 --cr2 0x1000", "inject nmi"),
    dont_repeat=True,
    category="traps",
)
@requires_debugger
def inject_command(session: Session, args: Args) -> Output:
    """Deliver an interrupt or exception through the guest's IDT now.

    Vectors 32-255 are external interrupts: with RFLAGS.IF clear they wait (unless
    `--force`) and are delivered once a run sets IF. Exceptions take `--error` and,
    for #PF, `--cr2`. The machine is left at the handler's first instruction.
    """
    dbg = session.debugger
    first = len(dbg.trap_log)
    session.remember_registers()
    event = dbg.inject(args.vector, args.error, args.cr2, force=args.force)
    if event is None:
        return Styled(dbg.message or f"vector {args.vector:#x} queued", "warning")
    return report_stop(session, dbg, first, event)


@command(
    "idt set",
    args=(
        Arg("vector", ArgKind.VECTOR, "the gate (number or name)"),
        Arg("handler", ArgKind.EXPR, "the new handler address"),
    ),
    flags=(Flag("selector", "code segment selector for the gate", "SEL", ArgKind.EXPR),),
    examples=("idt set 3 default_handler", "idt set #PF 0xffffffff81000020 --selector 0x10"),
    dont_repeat=True,
    category="traps",
)
@requires_debugger
def idt_set(session: Session, args: Args) -> Output:
    """Point an IDT gate at another handler, in guest memory (type, DPL and IST kept).

    E.g. redirect #BP to a stub that stops (a breakpoint on it), inspect the trap
    frame, then `continue` runs the stub's iretq back to the interrupted code.
    """
    gate = session.debugger.idt_set(args.vector, args.handler, selector=args.selector)
    out = Styled(f"{args.vector:#04x} {exception_name(args.vector):<11} {gate}")
    return out.add(symbolize(session.symbols, gate.offset), "sym")


@command(
    "trap policy",
    args=(
        Arg("vector", ArgKind.VECTOR, "vector number or name", optional=True),
        Arg("policy", ArgKind.WORD, "what to do", optional=True, choices=("stop", "deliver")),
    ),
    examples=("trap policy 3 stop", "trap policy #PF deliver", "trap policy"),
    dont_repeat=True,
    category="traps",
)
@requires_debugger
def trap_policy(session: Session, args: Args) -> Output:
    """Choose what a trap raised by the guest does: `stop` (hand control to you) or `deliver`.

    With `stop` the command that ran stops with the trap pending (shown with the
    handler it would go to); the next stepi or continue delivers it. Without
    arguments, list the vectors whose policy is not the default (`deliver`).
    """
    dbg = session.debugger
    if args.vector is not None and args.policy is None:
        raise CommandError("trap policy VECTOR needs stop or deliver")
    if args.vector is not None:
        dbg.set_policy(args.vector, args.policy)
        return None
    default = dbg.policy.default
    rows = [
        f"{v:#04x} {exception_name(v):<11} {p.value}"
        for v, p in dbg.policy.items()
        if p is not default
    ]
    return join_lines([f"default: {default.value}", *rows])


@command(
    "info traps",
    args=(Arg("count", ArgKind.INT, "only the last COUNT events", optional=True),),
    flags=(Flag("json", "print one JSON document (the trace format's event objects)"),),
    examples=("info traps", "info traps 5", "info traps --json"),
    category="traps",
    dont_repeat=True,
)
def info_traps(session: Session, args: Args) -> Output:
    """Show the trap log: every breakpoint, exception, interrupt, syscall and stop so far."""
    log = session.debugger.trap_log if session.has_debugger else []
    if args.count is not None:
        log = log[-args.count :] if args.count > 0 else []
    if args.json:
        return json.dumps([e.to_json() for e in log], indent=1)
    if not log:
        return Styled("the trap log is empty")
    return join_lines(
        Styled(f"#{e.seq:<4} icount {e.icount:<10} ", "dim").extend(
            describe_trap(e, session.symbols)
        )
        for e in log
    )


@command(
    "record start",
    args=(Arg("file", ArgKind.WORD, "the trace to write (JSON Lines)"),),
    flags=(Flag("force", "overwrite an existing FILE"),),
    examples=("record start run.ktrace.jsonl", "record start run.ktrace.jsonl --force"),
    dont_repeat=True,
    category="traps",
)
@requires_debugger
def record_start(session: Session, args: Args) -> Output:
    """Write every trap event from now on to a trace file (docs/trace-format.md).

    The header names the snapshot (by file name: keep the trace next to it) and its
    content hash, and lists the breakpoints set now. It never writes over the open
    snapshot or its side files, nor over another existing file without `--force`.
    """
    if session.recorder is not None:
        raise CommandError(f"already recording to {session.recorder.path} (record stop first)")
    check_output_path(session, Path(args.file), force=args.force)
    dbg = session.debugger
    name = session.source.name if session.source is not None else "snapshot.json"
    options = RecordOptions(breaks=tuple(bp.address for bp in dbg.breakpoints if bp.enabled))
    header = TraceHeader(
        name, session.context.snapshot.content_hash(), __version__, options, origin="repl"
    )
    writer = TraceWriter(Path(args.file), header)
    session.recorder = writer

    def record(event: TrapEvent) -> None:
        writer.write(event.with_seq(writer.events_written))

    dbg.on_event.append(record)
    session.record_callback = record
    return Styled(f"recording trap events to {writer.path}")


@command(
    "record stop",
    examples=("record stop",),
    dont_repeat=True,
    category="traps",
)
@requires_recording
def record_stop(session: Session, args: Args) -> Output:
    """Finish the trace: a final stop event is written and the file closed."""
    writer = session.recorder
    assert writer is not None
    dbg = session.debugger
    if session.record_callback in dbg.on_event:
        dbg.on_event.remove(session.record_callback)
    machine = dbg.machine
    regs = {name: machine.reg_read(name) for name in GENERAL_REGISTERS}
    writer.write(
        TrapEvent(
            seq=writer.events_written,
            icount=machine.icount,
            kind=TrapKind.STOP,
            name="record stop",
            rip=regs["rip"],
            cs=machine.reg_read("cs"),
            cpl=machine.cpl,
            regs=regs,
        )
    )
    count = writer.events_written
    writer.close()
    session.recorder = None
    session.record_callback = None
    return Styled(f"wrote {count} events to {writer.path}")


COMMANDS = (inject_command, idt_set, trap_policy, info_traps, record_start, record_stop)
