"""Commands on CPU state and values: info registers, info cpu, set, p, info symbol."""

from __future__ import annotations

import json
import re

from ..arch.registers import RegisterGroup, lookup_register
from ..errors import CommandError
from ..snapshot import SEGMENT_REGISTERS, Segment
from .evaluation import REGISTER_ALIASES
from .formats import parse_format
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .render import (
    REGISTER_GROUPS,
    render_cpu_info,
    render_register,
    render_register_group,
    render_segment,
    symbolize,
)
from .session import Session
from .styled import Styled, join_lines

__all__ = ["COMMANDS"]

_JSON = Flag("json", "print one JSON document")
_DEFAULT_GROUPS = ("general", "segment", "control", "table")
_GROUP_ALIASES = {"gp": "general", "seg": "segment", "cr": "control", "msrs": "msr"}


@command(
    "info registers",
    aliases=("i r", "info reg"),
    args=(Arg("what", ArgKind.TEXT, "register groups or names", optional=True),),
    flags=(_JSON,),
    examples=("info registers", "info registers control", "info registers rip cr3 efer"),
    category="state",
    dont_repeat=True,
)
def info_registers(session: Session, args: Args) -> Output:
    """Show registers: general, segment, control, table, msr, all, or by name.

    With no argument: general, segment, control and table registers, as QEMU's
    ``info registers`` shows them (CR3, GDTR, IDTR and TR included).

    Segment registers show the hidden base, limit and attributes (from the snapshot,
    or on a machine from the descriptor the selector names in the current GDT).
    Control registers and EFER/RFLAGS show their decoded flags, addresses their
    symbol. Registers changed by the last run are highlighted.
    """
    target = session.target
    cpu = target.cpu
    words = (args.what or "").replace(",", " ").split() or list(_DEFAULT_GROUPS)
    if args.json:
        return json.dumps(_registers_json(session, words), indent=1)
    changed = session.changed_registers()
    parts: list[Styled] = []
    for word in words:
        key = word.lstrip("$").lower()
        key = _GROUP_ALIASES.get(key, key)
        if key in REGISTER_GROUPS:
            parts.append(render_register_group(cpu, key, session.symbols, changed))
        elif key in SEGMENT_REGISTERS:
            parts.append(render_segment(key, cpu.segments.get(key, Segment(0))))
        elif key in ("tr", "ldtr"):
            parts.append(render_segment(key, getattr(cpu, key)))
        else:
            name = REGISTER_ALIASES.get(key, key)
            parts.append(render_register(name, target.reg(name), session.symbols))
    return join_lines(parts)


def _registers_json(session: Session, words: list[str]) -> dict[str, int]:
    target = session.target
    names: list[str] = []
    for word in words:
        key = _GROUP_ALIASES.get(word.lstrip("$").lower(), word.lstrip("$").lower())
        if key in ("general", "all"):
            names += RegisterGroup.GENERAL.names
        if key in ("segment", "all"):
            names += RegisterGroup.SEGMENT.names
        if key in ("control", "all"):
            names += RegisterGroup.CONTROL.names
        if key in ("msr", "all"):
            names += [n for n in target.cpu.msrs if n != "pkru"]
        if key in ("table", "all"):
            names += ("tr", "ldtr")
        if key not in REGISTER_GROUPS:
            names.append(REGISTER_ALIASES.get(key, key))
    return {name: target.reg(name) for name in dict.fromkeys(names)}


@command(
    "info cpu",
    examples=("info cpu",),
    category="state",
    dont_repeat=True,
)
def info_cpu(session: Session, args: Args) -> Output:
    """Show the execution mode, CPL, paging mode, interrupt flag and the pending trap."""
    target = session.target
    levels = len(target.mode.levels)
    return render_cpu_info(target.cpu, levels, session.pending_trap(), session.symbols)


# set {u64} ADDR = VALUE, set *(u32*)ADDR = VALUE, set $reg = VALUE, set NAME VALUE
_ASSIGN = r"\s*(?P<addr>.+?)\s*=(?!=)\s*(?P<value>.+)"
_SET_MEMORY = re.compile(r"\{\s*(u8|u16|u32|u64)\s*\}" + _ASSIGN)
_SET_DEREF = re.compile(r"\*\s*\(\s*(u8|u16|u32|u64)\s*\*\s*\)" + _ASSIGN)
_SET_REGISTER = re.compile(r"\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)\s*(?P<value>.+)")
_SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


@command(
    "set",
    args=(Arg("assignment", ArgKind.TEXT, "what to set", optional=True),),
    examples=(
        "set $rax = 0x1234",
        "set {u64} $rsp = $rip + 4",
        "set *(u32*)0x7ffffffff000 = 7",
        "set context off",
    ),
    dont_repeat=True,
    category="state",
)
def set_command(session: Session, args: Args) -> Output:
    """Write a register or memory, or change a setting.

    `set $REG = EXPR` writes a register (partial ones keep the rest of their
    parent; builds the machine). `set {u8|u16|u32|u64} ADDR = EXPR` (or
    `set *(u64*)ADDR = EXPR`) writes virtual memory through the current page
    tables. `set NAME VALUE` changes a setting: `context on|off` (the display
    on every stop), `context-code N`, `context-stack N`, `syntax intel|att`,
    `debug on|off` (tracebacks for internal errors). `set` alone lists them.
    """
    text = (args.assignment or "").strip()
    if text.startswith("var "):
        text = text[4:].strip()
    if not text:
        return _show_settings(session)
    for pattern in (_SET_MEMORY, _SET_DEREF):
        m = pattern.fullmatch(text)
        if m:
            size = _SIZES[m.group(1)]
            address = session.evaluate(m.group("addr"))
            value = session.evaluate(m.group("value"))
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            session.write_virtual(address, data)
            return None
    m = _SET_REGISTER.fullmatch(text)
    if m:
        name = REGISTER_ALIASES.get(m.group("name").lower(), m.group("name").lower())
        lookup_register(name)
        value = session.evaluate(m.group("value"))
        session.machine.reg_write(name, value & ((1 << lookup_register(name).width) - 1))
        return None
    words = text.split()
    if len(words) == 2:
        return session.change_setting(words[0], words[1])
    raise CommandError(
        f"cannot parse 'set {text}' (expected $REG = EXPR, {{u64}} ADDR = EXPR or NAME VALUE)"
    )


def _show_settings(session: Session) -> Output:
    rows = session.describe_settings()
    return join_lines(Styled().add(f"{k:<15}", "reg").add(v) for k, v in rows)


def _print_value(value: int, suffix: str, session: Session) -> Styled:
    out = Styled()
    if suffix:
        fmt = parse_format(suffix)
        letter = fmt.letter
        if letter in "si":
            raise CommandError(f"print/{letter} is not supported (use x/{letter})")
        if letter == "a":
            return out.add(f"{value:#x}", "addr").add(symbolize(session.symbols, value), "sym")
        text = {
            "x": f"{value:#x}",
            "d": str(value - (1 << 64) if value >> 63 else value),
            "u": str(value),
            "o": f"{value:#o}",
            "t": f"{value:b}",
            "c": repr(chr(value & 0xFF)),
        }[letter]
        return out.add(text, "value")
    signed = value - (1 << 64) if value >> 63 else value
    out.add(f"{value:#x}", "value").add(f"  {signed}", "dim")
    return out.add(symbolize(session.symbols, value), "sym")


@command(
    "print",
    aliases=("p",),
    args=(Arg("expr", ArgKind.EXPR, "the expression"),),
    format_suffix=True,
    examples=("p $rsp + 8", "p/x *(u64*)$rsp", "print bp_handler+4"),
    category="state",
    dont_repeat=True,
)
def print_command(session: Session, args: Args) -> Output:
    """Evaluate an expression: hex, signed decimal and symbol (`/x /d /u /o /t /c /a`).

    Expressions: numbers (`0x10`, `16`), registers (`$rax`, `$cr3`, `$pc`),
    symbols (`do_page_fault+0x10`), `+ - * / % & | ^ << >> ~ !`, comparisons,
    parentheses, and memory reads `*(u8*)`, `*(u16*)`, `*(u32*)`, `*(u64*)`.
    """
    return _print_value(args.expr, args.suffix, session)


@command(
    "info symbol",
    args=(Arg("expr", ArgKind.EXPR, "an address"),),
    examples=("info symbol $rip", "info symbol 0xffffffff81000004"),
    category="state",
    dont_repeat=True,
)
def info_symbol(session: Session, args: Args) -> Output:
    """Name the symbol containing an address, as `name+off`."""
    hit = session.symbols.lookup(args.expr)
    if hit is None:
        return Styled(f"no symbol matches {args.expr:#x}")
    sym = hit.symbol
    size = f", size {sym.size:#x}" if sym.size else ""
    return Styled().add(str(hit), "sym").add(f"  ({sym.name} at {sym.address:#x}{size})", "dim")


COMMANDS = (info_registers, info_cpu, set_command, print_command, info_symbol)
