"""Running commands: stepi, nexti, continue, finish, until; and the report shown on a stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..arch.vectors import exception_name
from ..errors import CommandError, KctxError
from ..traps.events import TrapEvent, TrapKind
from .preconditions import requires_debugger
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .render import symbolize
from .session import Session, StopRecord
from .stopview import render_context
from .styled import Styled

if TYPE_CHECKING:
    from ..traps.debugger import Debugger

__all__ = ["BATCH_BUDGET", "COMMANDS", "describe_trap", "report_stop", "run_and_report"]

# Events of one command listed before the stop line; older ones are in `info traps`.
MAX_LISTED_EVENTS = 8
MAX_STEPS = 1 << 20
# In batch mode a run without --count stops after this many instructions: a script never hangs.
BATCH_BUDGET = 100_000_000


def describe_trap(event: TrapEvent, symbols: object) -> Styled:
    """One line for an event: what, where (symbolized), CPL, error code, CR2, handler."""
    out = Styled()
    at = f"{event.rip:#x}{symbolize(symbols, event.rip)}"  # type: ignore[arg-type]
    if event.kind is TrapKind.BREAKPOINT:
        return out.add(event.name.capitalize(), "trap").add(f" at {at}")
    if event.kind is TrapKind.WATCHPOINT:
        return out.add(event.name, "trap")
    if event.kind is TrapKind.STOP:
        return out.add(f"stopped: {event.name}", "trap").add(f" at {at}")
    name = event.name or (exception_name(event.vector) if event.vector is not None else "trap")
    vector = f" (vector {event.vector})" if event.vector is not None else ""
    out.add(f"{name}{vector}", "trap").add(f" at {at}, CPL{event.cpl}")
    if event.error_code is not None:
        out.add(f", error code {event.error_code:#x}")
    if event.cr2 is not None:
        out.add(f", CR2 {event.cr2:#x}")
    if event.handler is not None:
        label = event.handler_symbol or f"{event.handler:#x}"
        out.add(" -> delivered to ").add(label, "sym").add(f" ({event.handler:#x})", "dim")
    return out


def _pending_line(session: Session, dbg: Debugger) -> Styled:
    """Why a stop-policy trap is waiting, and the handler delivery would run."""
    trap = dbg.pending_trap
    assert trap is not None
    out = Styled("  pending: ", "dim").add(trap.name, "trap")
    try:
        from ..traps.delivery import read_gate

        gate = read_gate(dbg.machine, trap.vector)
        out.add(" -> handler ").add(f"{gate.offset:#x}", "addr")
        out.add(symbolize(session.symbols, gate.offset), "sym")
    except KctxError as e:
        out.add(f" (gate unreadable: {e})", "warning")
    return out.add("; continue or stepi delivers it", "dim")


def report_stop(session: Session, dbg: Debugger, first: int, event: TrapEvent) -> Styled:
    """The events of one command, the stop line, and the context display (if on)."""
    events = dbg.trap_log[first:]
    earlier = events[:-1] if events and events[-1] is event else events
    out = Styled()
    if len(earlier) > MAX_LISTED_EVENTS:
        skipped = len(earlier) - MAX_LISTED_EVENTS
        out.add(f"({skipped} earlier events: see 'info traps')", "dim").newline()
        earlier = earlier[-MAX_LISTED_EVENTS:]
    for e in earlier:
        out.extend(describe_trap(e, session.symbols)).newline()
    out.extend(describe_trap(event, session.symbols))
    pending = dbg.pending_trap is not None
    if pending:
        out.newline().extend(_pending_line(session, dbg))
    if dbg.message and not pending:
        out.newline().add(dbg.message, "warning")
    if dbg.shutdown is not None:
        out.newline().add("the machine is shut down (triple fault)", "error")
    summary = str(describe_trap(event, None))
    session.last_stop = StopRecord(event, summary, pending)
    if session.settings.context:
        machine = dbg.machine
        out.newline().extend(
            render_context(
                machine.registers(),
                session.changed_registers(),
                dbg.read_virtual,
                session.symbols,
                session.settings.context_code,
                session.settings.context_stack,
                session.settings.syntax,
            )
        )
    else:
        rip = dbg.machine.reg_read("rip")
        out.newline().extend(_location_line(session, dbg, rip))
    return out


def _location_line(session: Session, dbg: Debugger, rip: int) -> Styled:
    from ..emulator.disasm import format_instruction

    try:
        listing = dbg.disassemble(rip, 1, session.settings.syntax)
    except KctxError as e:
        return Styled(f"{rip:#x}: {e}", "warning")
    if not listing:
        return Styled(f"{rip:#x}: code unreadable", "warning")
    return Styled("=> ", "current").add(format_instruction(listing[0], session.symbols), "current")


def run_and_report(session: Session, action: Callable[[Debugger], TrapEvent]) -> Output:
    """Run ``action`` on the debugger with Ctrl-C able to stop it; report the stop."""
    dbg = session.debugger
    first = len(dbg.trap_log)
    session.remember_registers()
    session.running = True
    try:
        event = action(dbg)
    finally:
        session.running = False
    return report_stop(session, dbg, first, event)


def _run_bounded(
    session: Session, count: int | None, action: Callable[[Debugger, int | None], TrapEvent]
) -> Output:
    """``action(dbg, count)``; in batch mode with no count, under :data:`BATCH_BUDGET`."""
    default = count is None and session.batch
    budget = BATCH_BUDGET if default else count
    output = run_and_report(session, lambda dbg: action(dbg, budget))
    stop = session.last_stop
    event = stop.event if stop is not None else None
    if default and event is not None and event.kind is TrapKind.STOP and event.name == "budget":
        out = output if isinstance(output, Styled) else Styled(str(output or ""))
        note = f"batch mode: stopped after the default budget of {budget} instructions"
        return out.newline().add(note + " (give --count N for another bound)", "warning")
    return output


def _count(value: int | None) -> int:
    n = 1 if value is None else value
    if not 0 < n <= MAX_STEPS:
        raise CommandError(f"count {n} must be between 1 and {MAX_STEPS}")
    return n


@command(
    "stepi",
    aliases=("si",),
    args=(Arg("count", ArgKind.INT, "instructions (default 1)", optional=True),),
    examples=("stepi", "stepi 4", "si"),
    category="running",
)
@requires_debugger
def stepi_command(session: Session, args: Args) -> Output:
    """Execute one instruction (or COUNT), stopping early at a breakpoint or stop-policy trap.

    A trap left pending by the last stop is delivered first, and that is the step:
    it stops at the handler's first instruction. An empty line steps again.
    """
    count = _count(args.count)
    return run_and_report(session, lambda dbg: dbg.stepi(count))


def _nexti(dbg: Debugger, count: int) -> TrapEvent:
    event = dbg.nexti()
    for _ in range(count - 1):
        if event.kind is not TrapKind.STOP or event.name != "budget" or dbg.pending_trap:
            break
        event = dbg.nexti()
    return event


@command(
    "nexti",
    aliases=("ni",),
    args=(Arg("count", ArgKind.INT, "instructions (default 1)", optional=True),),
    examples=("nexti", "nexti 3", "ni"),
    category="running",
)
@requires_debugger
def nexti_command(session: Session, args: Args) -> Output:
    """Step one instruction, stepping over calls (the call runs until it returns here)."""
    count = _count(args.count)
    return run_and_report(session, lambda dbg: _nexti(dbg, count))


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise CommandError(f"--timeout takes seconds, not {text!r}") from None
    if not 0 < value <= 1e6:
        raise CommandError(f"--timeout {value} must be positive")
    return value


@command(
    "continue",
    aliases=("c", "cont"),
    flags=(
        Flag("timeout", "stop after this many seconds", "SECONDS"),
        Flag("count", "stop after this many instructions", "N", ArgKind.INT),
    ),
    examples=("continue", "c", "continue --timeout 0.5", "continue --count 1000"),
    category="running",
)
@requires_debugger
def continue_command(session: Session, args: Args) -> Output:
    """Run until a breakpoint, watchpoint or stop-policy trap (Ctrl-C stops it).

    Traps whose policy is `deliver` (the default) go through the guest's IDT on the
    way and are listed; `trap policy VEC stop` makes a vector stop instead.
    Interactively the run has no bound but `--count` and `--timeout`; in batch
    mode (`--batch`, or commands read from a pipe) a run without `--count` stops
    after 100000000 instructions, and says so, so a script never hangs.
    """
    timeout = _seconds(args.timeout)
    count = None if args.count is None else _count(args.count)
    return _run_bounded(session, count, lambda dbg, n: dbg.cont(timeout=timeout, count=n))


@command(
    "finish",
    aliases=("fin",),
    examples=("finish",),
    category="running",
)
@requires_debugger
def finish_command(session: Session, args: Args) -> Output:
    """Run until the current function returns to its caller.

    The return address is read at RSP on a function's first instruction, else at
    RBP+8 (a frame-pointer prologue). In the handler of the last trap delivered,
    finish runs until its iretq is back in the interrupted code (the trap frame's
    RIP, CS and RSP). At the outermost frame (a return address of 0 or where no
    code can run) it fails at once. In batch mode the run stops after 100000000
    instructions.
    """
    return _run_bounded(session, None, lambda dbg, n: dbg.finish(count=n))


@command(
    "until",
    aliases=("u", "advance"),
    args=(Arg("location", ArgKind.LOCATION, "a code address"),),
    examples=("until bp_handler", "until *0x40000f", "until $rip + 5"),
    category="running",
    dont_repeat=True,
)
@requires_debugger
def until_command(session: Session, args: Args) -> Output:
    """Run until RIP reaches an address (or something else stops the machine first).

    An address where no code can run (unmapped, not executable) fails at once. In
    batch mode the run stops after 100000000 instructions.
    """
    address = args.location
    reason = session.debugger.fetch_fault(address)
    if reason is not None:
        raise CommandError(f"until: cannot run to {address:#x}: no code can run there ({reason})")
    return _run_bounded(session, None, lambda dbg, n: dbg.until(address, count=n))


COMMANDS = (stepi_command, nexti_command, continue_command, finish_command, until_command)
