"""Memory commands: x (virtual), xp (physical), disassemble."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CommandError, KctxError
from ..physmem import PAGE_SIZE
from .formats import MAX_STRING, XFormat, format_string, format_units, parse_format
from .registry import Arg, ArgKind, Args, Output, command
from .session import Session
from .styled import Styled

if TYPE_CHECKING:
    from ..emulator.disasm import Disassembly

__all__ = ["COMMANDS", "render_disassembly"]

Reader = Callable[[int, int], bytes]
# x/Ni and disassemble without a count show this many instructions.
DEFAULT_INSTRUCTIONS = 10


def _read_prefix(read: Reader, address: int, size: int) -> tuple[bytes, str | None]:
    """As many bytes as can be read from ``address`` (page by page), and why it stopped."""
    out = bytearray()
    at, end = address, address + size
    while at < end:
        n = min(end, (at // PAGE_SIZE + 1) * PAGE_SIZE) - at
        try:
            out += read(at, n)
        except KctxError as e:
            return bytes(out), access_failure(e)
        at += n
    return bytes(out), None


_REPEATED_ADDRESS = re.compile(r"^cannot access (?:memory at )?0x[0-9a-f]+: ")


def access_failure(error: KctxError) -> str:
    """Why an access failed, without the address the caller's message already names."""
    result = getattr(error, "result", None)
    fault = getattr(result, "fault", None)
    if fault is not None and getattr(fault, "reason", None):
        return str(fault.reason)
    return _REPEATED_ADDRESS.sub("", str(error))


def render_disassembly(listing: Disassembly, rip: int | None, symbols: object | None) -> Styled:
    """One line per instruction, ``=>`` marking the one at RIP, then why it stopped early."""
    from ..emulator.disasm import format_instruction

    out = Styled()
    for i, insn in enumerate(listing):
        if i:
            out.newline()
        here = insn.address == rip
        out.add("=> " if here else "   ", "current" if here else "")
        out.add(format_instruction(insn, symbols), "current" if here else "")
    if listing.stop is not None:
        if listing:
            out.newline()
        out.add(str(listing.stop), "warning")
    return out


def _examine(session: Session, args: Args, physical: bool) -> Output:
    state = session.x_state
    fmt = parse_format(args.suffix, state.format)
    if args.expr is not None:
        address = args.expr
    elif state.next_address is not None and state.physical == physical:
        address = state.next_address
    else:
        raise CommandError("an address is needed (x has nothing to continue from)")
    target = session.target
    read: Reader = target.read_physical if physical else target.read_virtual
    symbols = None if physical else session.symbols
    if fmt.letter == "i":
        from ..emulator.disasm import disassemble

        listing = disassemble(read, address, fmt.count, symbols, session.settings.syntax)
        if not listing and listing.stop is not None:
            reason = _REPEATED_ADDRESS.sub("", str(listing.stop.reason))
            raise CommandError(f"cannot access memory at {address:#x}: {reason}")
        rip = None if physical else target.reg("rip")
        end = listing[-1].next_address if listing else address
        _remember(session, fmt, end, physical)
        return render_disassembly(listing, rip, symbols)
    if fmt.letter == "s":
        return _strings(session, read, address, fmt, physical)
    data, failure = _read_prefix(read, address, fmt.count * fmt.size)
    whole = len(data) - len(data) % fmt.size
    if whole == 0:
        raise CommandError(f"cannot access memory at {address:#x}: {failure}")
    _remember(session, fmt, address + whole, physical)
    out = format_units(address, data[:whole], fmt, symbols)
    if failure is not None:
        out.newline().add(f"cannot access memory at {address + whole:#x}: {failure}", "warning")
    return out


def _strings(session: Session, read: Reader, address: int, fmt: XFormat, physical: bool) -> Output:
    lines = Styled()
    for i in range(fmt.count):
        data, failure = _read_prefix(read, address, MAX_STRING)
        if not data:
            raise CommandError(f"cannot access memory at {address:#x}: {failure}")
        text = data.split(b"\0", 1)[0]
        if i:
            lines.newline()
        lines.extend(format_string(address, text, None if physical else session.symbols))
        address += len(text) + 1
    _remember(session, fmt, address, physical)
    return lines


def _remember(session: Session, fmt: XFormat, next_address: int, physical: bool) -> None:
    state = session.x_state
    state.format, state.next_address, state.physical = fmt, next_address, physical


def _repeat_x(name: str) -> Callable[[Session, Args], str]:
    # An empty line continues after what was shown, in the same format.
    return lambda session, _args: f"{name}{session.x_state.format.suffix}"


@command(
    "x",
    args=(Arg("expr", ArgKind.EXPR, "a virtual address", optional=True),),
    format_suffix=True,
    repeat=_repeat_x("x"),
    examples=("x/8gx $rsp", "x/4i $rip", "x/s msg", "x/16bx bp_handler"),
    category="memory",
)
def x_command(session: Session, args: Args) -> Output:
    """Examine virtual memory: `x/NFU ADDR` (GDB's formats and sizes).

    N is a count; F a format: x hex, d signed, u unsigned, o octal, t binary,
    c char, a address with symbol, s string, i instruction; U a unit: b 1, h 2,
    w 4, g 8 bytes. Missing parts repeat the previous x. Without ADDR, and on an
    empty line, x continues after the last unit shown. Reads go through the
    current page tables as a supervisor read; breakpoints show their original bytes.
    """
    return _examine(session, args, physical=False)


@command(
    "xp",
    args=(Arg("expr", ArgKind.EXPR, "a physical address", optional=True),),
    format_suffix=True,
    repeat=_repeat_x("xp"),
    examples=("xp/4gx 0x100000", "xp/2i 0x1000000"),
    category="memory",
)
def xp_command(session: Session, args: Args) -> Output:
    """Examine physical memory: `xp/NFU PADDR` (formats as for x).

    Physical addresses are the machine's once it is built; they equal the
    snapshot's unless the machine had to move ranges above 2**40.
    """
    return _examine(session, args, physical=True)


@command(
    "disassemble",
    aliases=("disas",),
    args=(
        Arg("expr", ArgKind.EXPR, "start address (default: RIP)", optional=True),
        Arg("count", ArgKind.INT, f"instructions (default {DEFAULT_INSTRUCTIONS})", optional=True),
    ),
    examples=("disassemble", "disassemble bp_handler 9", "disas $rip 3"),
    category="memory",
    dont_repeat=True,
)
def disassemble_command(session: Session, args: Args) -> Output:
    """Disassemble COUNT instructions from ADDR (default: RIP), with symbols.

    Branch targets and RIP-relative operands are named; `=>` marks RIP. The
    listing stops, saying why, where the code runs into unmapped memory.
    `set syntax att` switches to AT&T syntax.
    """
    target = session.target
    rip = target.reg("rip")
    address = rip if args.expr is None else args.expr
    count = DEFAULT_INSTRUCTIONS if args.count is None else args.count
    if not 0 < count <= 1 << 16:
        raise CommandError(f"count {count} must be between 1 and {1 << 16}")
    from ..emulator.disasm import disassemble

    listing = disassemble(
        target.read_virtual, address, count, session.symbols, session.settings.syntax
    )
    if not listing and listing.stop is not None:
        reason = _REPEATED_ADDRESS.sub("", str(listing.stop.reason))
        raise CommandError(f"cannot access memory at {address:#x}: {reason}")
    return render_disassembly(listing, rip, session.symbols)


COMMANDS = (x_command, xp_command, disassemble_command)
