"""Backtraces: CFI from ELF ``.eh_frame`` where it covers the code, frame pointers elsewhere.

Each step finds where the caller's return address is stored, by the first rule
that applies to the frame's PC:

1. **CFI**: an FDE of an ELF symbol source covers the PC (its ``.eh_frame`` table
   gives the CFA and where RA and RBP were saved, DWARF for x86-64);
2. **prologue**: the instructions from the function's start to the PC only push
   registers and subtract from RSP (a function's first instructions): RA just above
   what they pushed;
3. **frame pointer**: RA at ``[rbp+8]``, the caller's RBP at ``[rbp]``.

When the frame's function is an IDT handler, the slot the RA would occupy holds the
CPU's trap frame instead (SDM vol. 3A 6.14.2: error code if the vector pushes one,
then RIP, CS, RFLAGS, RSP, SS): the caller is the interrupted context, RIP and RSP
taken from the frame. The walk stops at a zero or unreadable address, a repeated
frame, or :data:`MAX_FRAMES`.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import FDE, RegisterRule
from elftools.elf.elffile import ELFFile

from ..errors import KctxError, SymbolError
from ..symbols import SymbolTable

__all__ = [
    "MAX_FRAMES",
    "CfiRow",
    "CfiTable",
    "Frame",
    "backtrace",
]

MAX_FRAMES = 64
# DWARF register numbers, System V x86-64 psABI Figure 3.36.
DWARF_RBP, DWARF_RSP, DWARF_RA = 6, 7, 16
_WORD = 8
_TRAP_FRAME_RSP = 3  # words from the pushed RIP to the pushed RSP (RIP, CS, RFLAGS, RSP)
# Instructions read from a function's start looking for its stack use (a prologue).
MAX_PROLOGUE = 64
_GPRS = frozenset(
    "rax rbx rcx rdx rsi rdi rbp r8 r9 r10 r11 r12 r13 r14 r15".split()
)  # push of these moves RSP by 8
_FLOW = frozenset({"jump", "call", "ret", "iret", "int", "branch_relative"})
_STACK_OPS = frozenset({"pop", "leave", "enter", "pushf", "pushfq", "popf", "popfq"})

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class CfiRow:
    """The unwind rule at one PC: CFA = reg + offset; RA and RBP saved at CFA + offset."""

    cfa_register: int
    cfa_offset: int
    ra_offset: int | None
    rbp_offset: int | None


class CfiTable:
    """One ELF's ``.eh_frame`` rows, looked up by (relocated) PC."""

    def __init__(self, ranges: list[tuple[int, int, list[tuple[int, CfiRow]]]], name: str):
        self._ranges = sorted(ranges)
        self._starts = [start for start, _end, _rows in self._ranges]
        self.name = name

    def __len__(self) -> int:
        return len(self._ranges)

    @classmethod
    def from_elf(cls, path: str | os.PathLike[str], offset: int = 0) -> CfiTable | None:
        """The table of ``path`` slid by ``offset``; None when it has no ``.eh_frame``.

        :raises SymbolError: the file cannot be read or its CFI is malformed.
        """
        where = os.fspath(path)
        try:
            with open(where, "rb") as handle:
                elf = ELFFile(handle)
                if elf.get_section_by_name(".eh_frame") is None:
                    return None
                dwarf = elf.get_dwarf_info()
                if not dwarf.has_EH_CFI():
                    return None
                ranges = []
                for entry in dwarf.EH_CFI_entries():
                    if isinstance(entry, FDE):
                        ranges.append(_fde_rows(entry, offset))
        except OSError as e:
            raise SymbolError(f"{where}: cannot read: {e.strerror}") from None
        except (ELFError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise SymbolError(f"{where}: malformed .eh_frame: {e}") from None
        return cls(ranges, where)

    def row(self, pc: int) -> CfiRow | None:
        """The rule in force at ``pc``, or None when no FDE covers it."""
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0:
            return None
        start, end, rows = self._ranges[i]
        if not start <= pc < end:
            return None
        found = None
        for at, row in rows:
            if at > pc:
                break
            found = row
        return found


def _register_offset(rule: object) -> int | None:
    if isinstance(rule, RegisterRule) and rule.type == RegisterRule.OFFSET:
        return int(rule.arg)
    return None


def _fde_rows(fde: FDE, offset: int) -> tuple[int, int, list[tuple[int, CfiRow]]]:
    start = fde["initial_location"] + offset
    end = start + fde["address_range"]
    rows = []
    for line in fde.get_decoded().table:
        cfa = line["cfa"]
        if cfa.expr is not None or cfa.reg not in (DWARF_RSP, DWARF_RBP):
            continue  # DWARF expressions are beyond this unwinder
        row = CfiRow(
            cfa.reg,
            cfa.offset,
            _register_offset(line.get(DWARF_RA)),
            _register_offset(line.get(DWARF_RBP)),
        )
        rows.append((line["pc"] + offset, row))
    return start, end, rows


@dataclass(frozen=True)
class Frame:
    """One frame: its PC and stack pointer, and how it was found from the frame below."""

    level: int
    pc: int
    sp: int
    how: str  # "rip", "cfi", "prologue", "frame pointer", "trap frame (#BP)"


@dataclass(frozen=True)
class _Regs:
    pc: int
    sp: int
    fp: int
    exact: bool  # the PC is where execution stopped, not a return address

    @property
    def key(self) -> int:
        """The PC to look rules up by: a return address belongs to the call before it."""
        return self.pc if self.exact else self.pc - 1


def _u64(read: Reader, address: int) -> int:
    return int.from_bytes(read(address, _WORD), "little")


def _ra_slot(
    regs: _Regs, read: Reader, symbols: SymbolTable, cfi: Sequence[CfiTable]
) -> tuple[int, int, str] | None:
    """(address holding the return address, the caller's RBP, method), or None."""
    for table in cfi:
        row = table.row(regs.key)
        if row is not None and row.ra_offset is not None:
            base = regs.sp if row.cfa_register == DWARF_RSP else regs.fp
            cfa = base + row.cfa_offset
            fp = regs.fp if row.rbp_offset is None else _u64(read, cfa + row.rbp_offset)
            return cfa + row.ra_offset, fp, "cfi"
    if regs.exact:
        found = _prologue(regs, read, symbols)
        if found is not None:
            return found
    if regs.fp == 0:
        return None
    return regs.fp + _WORD, _u64(read, regs.fp), "frame pointer"


def _prologue(regs: _Regs, read: Reader, symbols: SymbolTable) -> tuple[int, int, str] | None:
    """RA slot and caller RBP from the instructions between the function's start and PC.

    Only a straight run is understood: pushes and ``sub rsp, IMM`` move the stack, and
    instructions that neither touch RSP nor branch are skipped; anything else (a branch,
    a pop, ``leave`` …) gives up, and the frame pointer is used instead.
    """
    from ..emulator.disasm import disassemble

    hit = symbols.lookup(regs.pc)
    if hit is None or hit.offset > MAX_PROLOGUE:
        return None
    depth, rbp_at = 0, None
    listing = disassemble(read, hit.symbol.address, MAX_PROLOGUE, symbols)
    for insn in listing:
        if insn.address == regs.pc:
            break
        if insn.address > regs.pc:
            return None
        m, ops = insn.mnemonic, insn.op_str
        if m == "push" and ops in _GPRS:
            depth += _WORD
            rbp_at = depth if ops == "rbp" else rbp_at
        elif m == "sub" and ops.startswith("rsp, "):
            try:
                depth += int(ops[len("rsp, ") :], 0)
            except ValueError:
                return None
        elif "rsp" in ops or insn.groups & _FLOW or m in _STACK_OPS:
            if not (m == "mov" and ops == "rbp, rsp"):
                return None
    else:
        return None
    fp = regs.fp if rbp_at is None else _u64(read, regs.sp + depth - rbp_at)
    return regs.sp + depth, fp, "prologue"


def backtrace(
    read: Reader,
    rip: int,
    rsp: int,
    rbp: int,
    symbols: SymbolTable,
    cfi: Sequence[CfiTable] = (),
    handlers: Mapping[int, tuple[str, bool]] | None = None,
    limit: int = MAX_FRAMES,
) -> list[Frame]:
    """The frames from ``rip`` outwards (see the module docstring).

    :param read: ``(va, size) -> bytes``, raising KctxError where memory is unmapped.
    :param handlers: IDT handler address -> (exception name, pushes an error code).
    """
    handlers = handlers or {}
    frames = [Frame(0, rip, rsp, "rip")]
    regs = _Regs(rip, rsp, rbp, exact=True)
    seen = {(rip, rsp)}
    while len(frames) < limit:
        try:
            found = _ra_slot(regs, read, symbols, cfi)
            if found is None:
                break
            slot, fp, how = found
            hit = symbols.lookup(regs.key)
            handler = handlers.get(hit.symbol.address) if hit is not None else None
            if handler is not None:
                name, error_code = handler
                slot += _WORD if error_code else 0
                pc = _u64(read, slot)
                sp = _u64(read, slot + _TRAP_FRAME_RSP * _WORD)
                how = f"trap frame ({name})"
            else:
                pc, sp = _u64(read, slot), slot + _WORD
        except KctxError:
            break
        if pc == 0 or (pc, sp) in seen:
            break
        seen.add((pc, sp))
        frames.append(Frame(len(frames), pc, sp, how))
        regs = _Regs(pc, sp, fp, exact=handler is not None)
    return frames
