"""x86-64 disassembly with symbols, reading code through any ``read_virtual`` callable.

Capstone decodes; this module reads the bytes page by page through the caller's walker
path, names branch, call and RIP-relative targets with a symbol table, and stops cleanly
(a :class:`DisasmStop`, not an exception) where the code runs into memory that cannot be
read.

>>> code = bytes.fromhex("4889e5e8f8ffffffc3")
>>> listing = disassemble(lambda va, n: code[va - 0x1000 : va - 0x1000 + n], 0x1000, 3)
>>> [insn.text for insn in listing]
['mov rbp, rsp', 'call 0x1000', 'ret']
>>> listing.stop is None
True

Symbolized text
---------------
A direct branch or call gets its target's symbol appended: ``call 0xffffffff81001000
<printk>``. An operand addressed relative to RIP gets the absolute address and its symbol
as a comment, as objdump does: ``mov rax, qword ptr [rip + 0x10]  # 0xffffffff81002000
<jiffies>``. Symbols print as :class:`~kctx_debug.symbols.SymbolHit` does (``name`` at
offset 0, ``name+0x10`` otherwise). Bytes capstone cannot decode become a one-byte
``(bad)`` pseudo-instruction, as in objdump, and decoding goes on after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, overload

from capstone import CS_ARCH_X86, CS_MODE_64, CS_OPT_SYNTAX_ATT, CS_OPT_SYNTAX_INTEL, Cs, CsInsn
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_REG_RIP

from ..errors import KctxError

__all__ = [
    "MAX_INSTRUCTION_LENGTH",
    "DisasmStop",
    "Disassembly",
    "DisassemblyError",
    "Instruction",
    "disassemble",
    "format_instruction",
    "read_instruction_bytes",
]

# SDM vol. 2A 2.3.11: an instruction is at most 15 bytes long.
MAX_INSTRUCTION_LENGTH = 15
_PAGE_SIZE = 4096
_ADDRESS_LIMIT = 1 << 64
_SYNTAXES = {"intel": CS_OPT_SYNTAX_INTEL, "att": CS_OPT_SYNTAX_ATT}
# Capstone group names that make an immediate operand a code address.
_BRANCH_GROUPS = frozenset({"call", "jump", "branch_relative"})
# Bytes per line in format_instruction's hex column (objdump shows 7).
_BYTES_COLUMN = 7
_BAD = "(bad)"


class DisassemblyError(KctxError):
    """A disassembly request is invalid (unknown syntax, negative count)."""


class _Symbolizer(Protocol):
    def lookup(self, address: int) -> object | None: ...


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction.

    ``text`` is the symbolized form (see the module docstring); ``target`` is a direct
    branch or call destination and ``memory_target`` the address of a RIP-relative
    operand, each None when absent. ``groups`` holds capstone's group names
    (``call``, ``jump``, ``ret``, ``int``, ``iret``, ``privilege``, ...).
    """

    address: int
    bytes: bytes
    mnemonic: str
    op_str: str
    text: str
    target: int | None = None
    memory_target: int | None = None
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def size(self) -> int:
        return len(self.bytes)

    @property
    def next_address(self) -> int:
        """The address of the instruction that follows in memory (where a call returns)."""
        return self.address + len(self.bytes)

    @property
    def is_call(self) -> bool:
        return "call" in self.groups

    @property
    def is_return(self) -> bool:
        return "ret" in self.groups or "iret" in self.groups

    @property
    def is_bad(self) -> bool:
        """True for bytes that did not decode (the ``(bad)`` pseudo-instruction)."""
        return self.mnemonic == _BAD

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class DisasmStop:
    """Why a listing ended before ``count`` instructions: the address that could not be read."""

    address: int
    reason: str

    def __str__(self) -> str:
        return f"stopped at {self.address:#x}: {self.reason}"


@dataclass(frozen=True)
class Disassembly(Sequence[Instruction]):
    """The instructions decoded, in order, and ``stop`` when the listing ended early."""

    instructions: tuple[Instruction, ...]
    stop: DisasmStop | None = None

    @overload
    def __getitem__(self, index: int) -> Instruction: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Instruction, ...]: ...
    def __getitem__(self, index: int | slice) -> Instruction | tuple[Instruction, ...]:
        return self.instructions[index]

    def __len__(self) -> int:
        return len(self.instructions)

    def __iter__(self) -> Iterator[Instruction]:
        return iter(self.instructions)


def _read_ahead(
    read_virtual: Callable[[int, int], bytes], address: int, size: int
) -> tuple[bytes, DisasmStop | None]:
    """Up to ``size`` bytes from ``address``, one page at a time, stopping at the first failure."""
    out = bytearray()
    at = address
    end = min(address + size, _ADDRESS_LIMIT)
    while at < end:
        n = min(end, (at // _PAGE_SIZE + 1) * _PAGE_SIZE) - at
        try:
            data = read_virtual(at, n)
        except KctxError as exc:
            return bytes(out), DisasmStop(at, str(exc))
        out += data[:n]
        if len(data) < n:
            return bytes(out), DisasmStop(at + len(data), "read returned fewer bytes")
        at += n
    if end < address + size:
        return bytes(out), DisasmStop(end, "end of the 64-bit address space")
    return bytes(out), None


def read_instruction_bytes(read_virtual: Callable[[int, int], bytes], address: int) -> bytes:
    """Bytes to decode one instruction at ``address`` from: the 15 it may span, else the
    rest of its page when the next page cannot be read, else ``b""``."""
    for size in (MAX_INSTRUCTION_LENGTH, _PAGE_SIZE - address % _PAGE_SIZE):
        try:
            return read_virtual(address, size)
        except KctxError:
            continue
    return b""


def _label(symbols: _Symbolizer | None, address: int) -> str:
    hit = symbols.lookup(address) if symbols is not None else None
    return f" <{hit}>" if hit is not None else ""


def _decode(cs_insn: CsInsn, symbols: _Symbolizer | None) -> Instruction:
    groups = frozenset(cs_insn.group_name(g) for g in cs_insn.groups)
    text = f"{cs_insn.mnemonic} {cs_insn.op_str}".rstrip()
    target = memory_target = None
    for op in cs_insn.operands:
        if op.type == X86_OP_IMM and groups & _BRANCH_GROUPS:
            target = op.imm % _ADDRESS_LIMIT
        elif op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP:
            memory_target = (cs_insn.address + cs_insn.size + op.mem.disp) % _ADDRESS_LIMIT
    if target is not None:
        text += _label(symbols, target)
    if memory_target is not None:
        text += f"  # {memory_target:#x}{_label(symbols, memory_target)}"
    return Instruction(
        cs_insn.address,
        bytes(cs_insn.bytes),
        cs_insn.mnemonic,
        cs_insn.op_str,
        text,
        target,
        memory_target,
        groups,
    )


def disassemble(
    read_virtual: Callable[[int, int], bytes],
    address: int,
    count: int,
    symbols: _Symbolizer | None = None,
    syntax: str = "intel",
) -> Disassembly:
    """Decode up to ``count`` instructions starting at ``address``.

    :param read_virtual: ``(va, size) -> bytes``, raising a
        :class:`~kctx_debug.errors.KctxError` for unreadable memory (the context's or the
        machine's ``read_virtual``).
    :param symbols: anything with ``lookup(address)`` returning a printable hit or None
        (a :class:`~kctx_debug.symbols.SymbolTable`).
    :param syntax: ``"intel"`` or ``"att"``.
    :return: a sequence of :class:`Instruction`; its ``stop`` says where and why it ended
        early when the code ran into unreadable memory.
    :raises DisassemblyError: unknown syntax, negative count, address outside 64 bits.
    """
    if syntax not in _SYNTAXES:
        raise DisassemblyError(f"unknown syntax {syntax!r} (expected 'intel' or 'att')")
    if count < 0 or not 0 <= address < _ADDRESS_LIMIT:
        raise DisassemblyError(f"invalid request: {count} instructions at {address:#x}")
    engine = Cs(CS_ARCH_X86, CS_MODE_64)
    engine.detail = True
    engine.syntax = _SYNTAXES[syntax]
    code, fault = _read_ahead(read_virtual, address, count * MAX_INSTRUCTION_LENGTH)
    out: list[Instruction] = []
    offset = 0
    while len(out) < count:
        window = code[offset : offset + MAX_INSTRUCTION_LENGTH]
        decoded = next(engine.disasm(window, address + offset, 1), None)
        if decoded is not None:
            out.append(_decode(decoded, symbols))
            offset += decoded.size
            continue
        here = address + offset
        if fault is not None and len(window) < MAX_INSTRUCTION_LENGTH:
            if window:  # an instruction cut short by the unreadable page
                reason = f"instruction at {here:#x} runs into {fault.address:#x}: {fault.reason}"
                fault = DisasmStop(here, reason)
            return Disassembly(tuple(out), fault)
        out.append(Instruction(here, window[:1], _BAD, "", _BAD))
        offset += 1
    return Disassembly(tuple(out))


def format_instruction(insn: Instruction, symbols: _Symbolizer | None = None) -> str:
    """One listing line: ``0xffffffff81000000 <_start>:  48 89 e5              mov rbp, rsp``.

    The address is labelled with its symbol when ``symbols`` has one; the hex column is
    padded to seven bytes so that short instructions line up.
    """
    hex_bytes = " ".join(f"{b:02x}" for b in insn.bytes)
    width = 3 * _BYTES_COLUMN - 1
    return f"{insn.address:#x}{_label(symbols, insn.address)}:  {hex_bytes:<{width}}  {insn.text}"
