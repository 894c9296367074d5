"""Breakpoint and watchpoint commands: break, tbreak, delete, enable, disable, condition,
info breakpoints, watch, rwatch, awatch (the engine is traps/breakpoints.py and
traps/watchpoints.py)."""

from __future__ import annotations

import json
import re

from ..errors import CommandError
from ..traps.breakpoints import describe_breakpoint
from ..traps.watchpoints import describe_watchpoint
from .dispatch import parse_int
from .preconditions import requires_debugger
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .session import Session
from .styled import Styled, join_lines

__all__ = ["COMMANDS", "split_condition", "watch_target"]

_IF = re.compile(r"\s+if\s+|^if\s+")
# `watch *(u32*)ADDR`: GDB's way of naming the bytes to watch.
_WATCH_CAST = re.compile(r"\*\s*\(\s*u(8|16|32|64)\s*\*\s*\)\s*(?P<addr>.+)")


def split_condition(text: str | None) -> tuple[str | None, str | None]:
    """``LOCATION if COND`` -> (location, condition); either may be missing."""
    if not text or not text.strip():
        return None, None
    parts = _IF.split(text.strip(), maxsplit=1)
    location = parts[0].strip() or None
    condition = parts[1].strip() if len(parts) > 1 else None
    if len(parts) > 1 and not condition:
        raise CommandError("'if' needs a condition")
    return location, condition


def _location(session: Session, text: str | None) -> int:
    if text is None:
        return session.target.reg("rip")
    stripped = text[1:] if text.startswith("*") and not _WATCH_CAST.fullmatch(text) else text
    return session.evaluate(stripped)


def _set_breakpoint(session: Session, args: Args, temporary: bool) -> Output:
    location, condition = split_condition(args.location)
    address = _location(session, location)
    dbg = session.debugger
    bp = dbg.tbreak(address, condition) if temporary else dbg.break_at(address, condition)
    kind = "Temporary breakpoint" if temporary else "Breakpoint"
    out = Styled(f"{kind} {bp.number} at ").add(f"{bp.address:#x}", "addr")
    hit = session.symbols.lookup(bp.address)
    if hit is not None:
        out.add(f" <{hit}>", "sym")
    if condition:
        out.add(f" if {condition}", "dim")
    return out


_LOCATION = Arg("location", ArgKind.TEXT, "address or symbol (default: RIP), then 'if COND'", True)


@command(
    "break",
    aliases=("b", "br"),
    args=(_LOCATION,),
    examples=("break bp_handler", "break *0x40000e", "b bp_handler+4 if $rax == 8"),
    dont_repeat=True,
    category="breakpoints",
)
@requires_debugger
def break_command(session: Session, args: Args) -> Output:
    """Set a breakpoint (an int3 in guest memory) at an address, optionally conditional.

    The location is an expression (`*ADDR` as in GDB is accepted); `if COND` makes
    it stop only when COND is non-zero, evaluated at each hit. The breakpoint lives in
    the physical byte the address maps to, so aliases of the page trap too.
    """
    return _set_breakpoint(session, args, temporary=False)


@command(
    "tbreak",
    aliases=("tb",),
    args=(_LOCATION,),
    examples=("tbreak bp_handler", "tbreak *$rip+3"),
    dont_repeat=True,
    category="breakpoints",
)
@requires_debugger
def tbreak_command(session: Session, args: Args) -> Output:
    """Set a temporary breakpoint: deleted the first time it stops the machine."""
    return _set_breakpoint(session, args, temporary=True)


def _targets(session: Session, text: str | None) -> list[tuple[str, int]]:
    """``1 3 w2`` -> [("break", 1), ("break", 3), ("watch", 2)]; all of them when empty."""
    dbg = session.debugger
    if not text or not text.strip():
        return [("break", bp.number) for bp in dbg.breakpoints] + [
            ("watch", wp.number) for wp in dbg.watchpoints
        ]
    out = []
    for word in text.split():
        if word[:1] in "wW":
            out.append(("watch", parse_int(word[1:], "watchpoint number (wN)")))
        else:
            out.append(("break", parse_int(word, "breakpoint number")))
    return out


def _each(session: Session, text: str | None, verb: str) -> Output:
    """Delete, enable or disable each named breakpoint (N) and watchpoint (wN)."""
    dbg = session.debugger
    targets = _targets(session, text)
    if not targets:
        return Styled("no breakpoints or watchpoints")
    for kind, number in targets:
        if kind == "break":
            {"delete": dbg.delete, "enable": dbg.enable, "disable": dbg.disable}[verb](number)
        elif verb == "delete":
            dbg.watchpoints.delete(number)
        else:
            dbg.watchpoints.enable(number, verb == "enable")
    return None


_NUMBERS = Arg(
    "numbers", ArgKind.TEXT, "breakpoint numbers, wN for watchpoints (default: all)", True
)


@command(
    "delete",
    aliases=("d",),
    args=(_NUMBERS,),
    examples=("delete 1", "delete w1", "delete"),
    dont_repeat=True,
    category="breakpoints",
)
@requires_debugger
def delete_command(session: Session, args: Args) -> Output:
    """Delete breakpoints (N) or watchpoints (wN) by number; all of them without one."""
    return _each(session, args.numbers, "delete")


@command(
    "disable",
    args=(_NUMBERS,),
    examples=("disable 2", "disable"),
    dont_repeat=True,
    category="breakpoints",
)
@requires_debugger
def disable_command(session: Session, args: Args) -> Output:
    """Disable breakpoints or watchpoints (their int3 is lifted; they stay listed)."""
    return _each(session, args.numbers, "disable")


@command(
    "enable",
    args=(_NUMBERS,),
    examples=("enable 2", "enable"),
    dont_repeat=True,
    category="breakpoints",
)
@requires_debugger
def enable_command(session: Session, args: Args) -> Output:
    """Enable breakpoints or watchpoints again."""
    return _each(session, args.numbers, "enable")


@command(
    "condition",
    args=(
        Arg("number", ArgKind.INT, "breakpoint number"),
        Arg("expr", ArgKind.TEXT, "the condition (none: remove it)", optional=True),
    ),
    examples=("condition 1 $rax == 8", "condition 1 *(u64*)bp_count > 3", "condition 1"),
    dont_repeat=True,
    category="breakpoints",
)
@requires_debugger
def condition_command(session: Session, args: Args) -> Output:
    """Make a breakpoint conditional (it stops only when EXPR is non-zero), or unconditional."""
    text = args.expr.strip() if args.expr else None
    bp = session.debugger.condition(args.number, text or None)
    if bp.condition is None:
        return Styled(f"Breakpoint {bp.number} now unconditional.")
    return None


@command(
    "info breakpoints",
    aliases=("i b", "info watchpoints"),
    flags=(Flag("json", "print one JSON document"),),
    examples=("info breakpoints", "info breakpoints --json"),
    category="breakpoints",
    dont_repeat=True,
)
def info_breakpoints(session: Session, args: Args) -> Output:
    """List breakpoints and watchpoints: number, kind, enabled, address, hits, condition."""
    if not session.has_debugger:
        return "[]" if args.json else Styled("no breakpoints or watchpoints")
    dbg = session.debugger
    if args.json:
        items = [
            {
                "number": bp.number,
                "type": "breakpoint",
                "temporary": bp.temporary,
                "enabled": bp.enabled,
                "address": bp.address,
                "phys": bp.phys,
                "hits": bp.hits,
                "condition": bp.condition,
            }
            for bp in dbg.breakpoints
        ] + [
            {
                "number": wp.number,
                "type": f"{wp.kind.value} watchpoint",
                "enabled": wp.enabled,
                "address": wp.address,
                "size": wp.size,
                "hits": wp.hits,
            }
            for wp in dbg.watchpoints
        ]
        return json.dumps(items, indent=1)
    symbols = session.symbols
    lines = [describe_breakpoint(bp, lambda a: symbols.format_address(a)) for bp in dbg.breakpoints]
    lines += ["w" + describe_watchpoint(wp) for wp in dbg.watchpoints]
    if not lines:
        return Styled("no breakpoints or watchpoints")
    return join_lines(lines)


def watch_target(session: Session, text: str, size: int | None) -> tuple[int, int]:
    """(address, size) for ``*(u32*)ADDR`` (4 bytes) or ``ADDR`` (``--size``, default 8)."""
    m = _WATCH_CAST.fullmatch(text.strip())
    if m:
        cast = int(m.group(1)) // 8
        if size is not None and size != cast:
            raise CommandError(f"--size {size} contradicts the u{m.group(1)} cast")
        return session.evaluate(m.group("addr")), cast
    return session.evaluate(text), 8 if size is None else size


def _watch(session: Session, args: Args, kind: str) -> Output:
    address, size = watch_target(session, args.expr, args.size)
    dbg = session.debugger
    wp = {"write": dbg.watch, "read": dbg.rwatch, "access": dbg.awatch}[kind](address, size)
    label = {"write": "Watchpoint", "read": "Read watchpoint", "access": "Access watchpoint"}
    out = Styled(f"{label[kind]} {wp.number}: ").add(f"{wp.address:#x}", "addr")
    return out.add(f" ({wp.size} bytes)", "dim")


_WATCH_ARGS = dict(
    args=(Arg("expr", ArgKind.TEXT, "*(u64*)ADDR, or an address"),),
    flags=(Flag("size", "bytes to watch (default 8, or the cast's)", "N", ArgKind.INT),),
    dont_repeat=True,
    category="breakpoints",
)


@command("watch", examples=("watch *(u64*)bp_count", "watch $rsp - 8 --size 8"), **_WATCH_ARGS)
@requires_debugger
def watch_command(session: Session, args: Args) -> Output:
    """Stop after an instruction writes the watched bytes (old and new value reported)."""
    return _watch(session, args, "write")


@command("rwatch", examples=("rwatch *(u64*)bp_count",), **_WATCH_ARGS)
@requires_debugger
def rwatch_command(session: Session, args: Args) -> Output:
    """Stop after an instruction reads the watched bytes."""
    return _watch(session, args, "read")


@command("awatch", examples=("awatch *(u32*)0x7ffffffff000",), **_WATCH_ARGS)
@requires_debugger
def awatch_command(session: Session, args: Args) -> Output:
    """Stop after an instruction reads or writes the watched bytes."""
    return _watch(session, args, "access")


COMMANDS = (
    break_command,
    tbreak_command,
    delete_command,
    disable_command,
    enable_command,
    condition_command,
    info_breakpoints,
    watch_command,
    rwatch_command,
    awatch_command,
)
