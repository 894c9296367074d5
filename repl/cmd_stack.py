"""bt (backtrace) and save (the current state as a new snapshot)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ..arch.vectors import exception_name, pushes_error_code
from ..errors import CommandError, KctxError
from ..snapshot import SymbolSource
from ..snapshot_io import save_snapshot
from ..tables import decode_idt
from .backtrace import MAX_FRAMES, backtrace
from .overwrite import check_output_path
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .render import symbolize
from .session import Session
from .styled import Styled, join_lines
from .target import machine_cpu_state

__all__ = ["COMMANDS", "idt_handlers"]


def idt_handlers(session: Session) -> dict[int, tuple[str, bool]]:
    """Handler address -> (exception name, pushes an error code), from the current IDT.

    A handler shared by vectors that disagree on the error code is left out: the
    unwinder cannot tell which frame layout it is looking at.
    """
    target = session.target
    try:
        entries = decode_idt(target.mem, target.cpu, target.virt_to_phys)
    except KctxError:
        return {}
    seen: dict[int, tuple[str, bool] | None] = {}
    for entry in entries:
        gate = entry.gate
        if not gate.p:
            continue
        info = (exception_name(entry.vector), pushes_error_code(entry.vector))
        previous = seen.get(gate.offset, info)
        seen[gate.offset] = info if previous is not None and previous[1] == info[1] else None
    return {address: info for address, info in seen.items() if info is not None}


@command(
    "bt",
    aliases=("backtrace", "where"),
    args=(Arg("limit", ArgKind.INT, f"at most this many frames (default {MAX_FRAMES})", True),),
    flags=(Flag("json", "print one JSON document"),),
    examples=("bt", "bt 5", "bt --json"),
    category="stack",
    dont_repeat=True,
)
def bt_command(session: Session, args: Args) -> Output:
    """Show the call stack, innermost frame first, each PC symbolized.

    Each frame is unwound with CFI from `.eh_frame` when the snapshot's symbols come
    from an ELF that has one; else, for the innermost frame, from the prologue (the
    pushes and `sub rsp` between the function's start and RIP); else with frame
    pointers (the RBP chain). An interrupt handler's caller is the interrupted
    context, read from the trap frame the CPU pushed.
    """
    limit = MAX_FRAMES if args.limit is None else args.limit
    if not 0 < limit <= MAX_FRAMES:
        raise CommandError(f"limit must be between 1 and {MAX_FRAMES}")
    target = session.target
    frames = backtrace(
        target.read_virtual,
        target.reg("rip"),
        target.reg("rsp"),
        target.reg("rbp"),
        session.symbols,
        session.cfi_tables(),
        _handlers(session),
        limit,
    )
    if args.json:
        return json.dumps(
            [
                {
                    "level": f.level,
                    "pc": f.pc,
                    "sp": f.sp,
                    "how": f.how,
                    "symbol": _name(session, f.pc),
                }
                for f in frames
            ],
            indent=1,
        )
    return join_lines(
        Styled(f"#{f.level:<3}")
        .add(f"{f.pc:#018x}", "addr")
        .add(symbolize(session.symbols, f.pc) or " <?>", "sym")
        .add(f"  sp={f.sp:#x}  ({f.how})", "dim")
        for f in frames
    )


def _handlers(session: Session) -> dict[int, tuple[str, bool]]:
    """The IDT's handlers; the last delivery tells the frame layout of a shared handler."""
    handlers = idt_handlers(session)
    delivery = session.debugger.last_delivery if session.has_debugger else None
    if delivery is not None:
        handlers[delivery.handler] = (delivery.trap.name, delivery.trap.error_code is not None)
    return handlers


def _name(session: Session, address: int) -> str | None:
    hit = session.symbols.lookup(address)
    return str(hit) if hit is not None else None


def _moved_symbols(session: Session, folder: Path) -> tuple[SymbolSource, ...]:
    """Symbol sources with file paths rewritten relative to the new snapshot's folder."""
    snap = session.context.snapshot
    out = []
    for i, src in enumerate(snap.symbols):
        if src.kind == "inline":
            out.append(src)
            continue
        path = snap.resolve(src.path, f"symbols[{i}].path")
        out.append(replace(src, path=os.path.relpath(path, folder)))
    return tuple(out)


@command(
    "save",
    args=(Arg("file", ArgKind.WORD, "the new snapshot document (.json)"),),
    flags=(Flag("force", "overwrite an existing FILE (and its .phys side file)"),),
    examples=("save after-int3.json", "save after-int3.json --force"),
    dont_repeat=True,
    category="traps",
)
def save_command(session: Session, args: Args) -> Output:
    """Save the current state as a new snapshot: the machine's registers and memory.

    Memory goes to a sparse side file next to the document (`NAME.phys`), with
    breakpoint bytes restored to the guest's; the build section is dropped since
    its result is in memory. A trap left pending is not saved. It never writes over
    the open snapshot or its side files, nor over another existing file (or its
    `.phys`) without `--force`.
    """
    path = Path(args.file)
    if path.suffix != ".json":
        raise CommandError(f"{path}: a snapshot document ends in .json")
    side = path.with_suffix(".phys")
    check_output_path(session, path, force=args.force)
    # The side file of a document being replaced is part of what is replaced.
    check_output_path(session, side, force=args.force, replacing=[side] if path.exists() else [])
    snap = session.context.snapshot
    notes = []
    if session.has_machine:
        machine = session.machine
        if machine.relocations:
            raise CommandError(
                "this machine moved memory above 2**40 into other frames: "
                "saving it as a snapshot is not supported"
            )
        cpu = machine_cpu_state(machine, session.target.read_virtual)
        snap = replace(snap, cpu=cpu)
        if session.has_debugger and session.debugger.pending_trap is not None:
            notes.append(f"the pending {session.debugger.pending_trap.name} is not saved")
    snap = replace(snap, symbols=_moved_symbols(session, path.absolute().parent))
    with session.breakpoints_lifted():
        saved = save_snapshot(snap, path, mem=session.context.mem)
    out = Styled(f"saved {saved.origin} ({len(saved.memory)} memory ranges)")
    for note in notes:
        out.newline().add(f"note: {note}", "warning")
    return out


COMMANDS = (bt_command, save_command)
