"""The context shown on every stop (GEF/pwndbg style): why, registers, code, stack.

- **why** (printed by the caller, :func:`~.cmd_running.report_stop`): the trap's name,
  vector, error code, CR2 and the handler it went to;
- **registers**: the general registers, those changed by the run highlighted;
- **code**: a few instructions before RIP (decoded from the start of its symbol, when
  that is near) and after it, ``=>`` marking RIP;
- **stack**: words from RSP, each with its symbol.

``set context off`` turns it off; ``set context-code N``/``context-stack N`` size it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import KctxError
from ..snapshot import GENERAL_REGISTERS
from ..symbols import SymbolTable
from .render import symbolize
from .styled import Styled

__all__ = ["render_code", "render_context", "render_registers_compact", "render_stack"]

Reader = Callable[[int, int], bytes]
# Instructions shown before RIP when the symbol's start is this close.
_BEFORE, _NEAR = 2, 0x100
_PER_LINE = 3


def render_registers_compact(regs: dict[str, int], changed: Iterable[str]) -> Styled:
    """The general registers, three per line; changed ones in the ``changed`` role."""
    moved = set(changed)
    out = Styled()
    names = [n for n in GENERAL_REGISTERS if n in regs]
    for i, name in enumerate(names):
        if i and i % _PER_LINE == 0:
            out.newline()
        elif i:
            out.add("  ")
        out.add(f"{name:<7}", "reg")
        out.add(f"0x{regs[name]:016x}", "changed" if name in moved else "value")
    return out


def render_code(
    read: Reader, rip: int, symbols: SymbolTable, count: int, syntax: str = "intel"
) -> Styled:
    """``count`` instructions from RIP, with up to two before it when its symbol is near."""
    from ..emulator.disasm import disassemble
    from .cmd_memory import render_disassembly

    start = rip
    hit = symbols.lookup(rip)
    if hit is not None and 0 < hit.offset <= _NEAR:
        before = disassemble(read, hit.symbol.address, hit.offset, symbols, syntax)
        addresses = [i.address for i in before if i.address < rip]
        if addresses and before[len(addresses) - 1].next_address == rip:
            start = addresses[max(0, len(addresses) - _BEFORE)]
    listing = disassemble(read, start, count + (_BEFORE if start != rip else 0), symbols, syntax)
    return render_disassembly(listing, rip, symbols)


def render_stack(read: Reader, rsp: int, symbols: SymbolTable, words: int) -> Styled:
    """``words`` 8-byte words from RSP: ``0x7ffe…: 0x40000f <user_start+0xf>``."""
    out = Styled()
    for i in range(words):
        address = rsp + 8 * i
        try:
            value = int.from_bytes(read(address, 8), "little")
        except KctxError:
            if i:
                out.newline()
            out.add(f"{address:#018x}  (unreadable)", "warning")
            break
        if i:
            out.newline()
        out.add(f"{address:#018x}", "addr").add(f"  +{8 * i:#04x}  ", "dim")
        out.add(f"0x{value:016x}", "value").add(symbolize(symbols, value), "sym")
    return out


def render_context(
    regs: dict[str, int],
    changed: Iterable[str],
    read: Reader,
    symbols: SymbolTable,
    code: int,
    stack: int,
    syntax: str = "intel",
) -> Styled:
    """Registers, code and stack, each under a heading (the caller says why it stopped)."""
    out = Styled()
    sections: list[tuple[str, Callable[[], Styled]]] = [
        ("registers", lambda: render_registers_compact(regs, changed)),
        ("code", lambda: render_code(read, regs["rip"], symbols, code, syntax)),
        ("stack", lambda: render_stack(read, regs["rsp"], symbols, stack)),
    ]
    for i, (title, render) in enumerate(sections):
        if i:
            out.newline()
        out.add(f"── {title} ", "heading").add("─" * (60 - len(title)), "heading")
        try:
            out.newline().extend(render())
        except KctxError as e:
            out.newline().add(f"({title} unreadable: {e})", "warning")
    return out
