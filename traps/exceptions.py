"""The exception model: what trapped, how it is delivered, its error code, and the policy.

A :class:`Trap` is one event to deliver through the IDT: a CPU exception raised by an
instruction, a software interrupt (``int n``, ``int3``), an injected external
interrupt or NMI. It carries what delivery needs: the vector, where it came from
(:class:`TrapSource`, which decides the EXT bit and the gate-DPL check), the error
code if the vector pushes one, CR2 for a #PF, and the RIP to push.

Error codes (SDM vol. 3A 6.13): #PF's comes from the page walk for the access that
faulted (:mod:`kctx_debug.emulator.control` works it out); a selector error code
(#GP/#NP/#SS/#TS on a segment load) is found by decoding the faulting instruction
(:func:`segment_error_code`); everything else pushes 0.

:func:`escalation` is SDM vol. 3A Table 6-5 (conditions for generating a double fault),
which :mod:`.delivery` applies when delivery itself faults.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone.x86 import X86_OP_MEM, X86_OP_REG

from kctx_debug.arch.descriptors import SegmentDescriptor, Selector
from kctx_debug.arch.vectors import (
    EXCEPTIONS,
    FIRST_USER_VECTOR,
    NUM_VECTORS,
    ExceptionClass,
    Vector,
    exception_name,
    pushes_error_code,
)
from kctx_debug.emulator.control import StopEvent, StopKind
from kctx_debug.emulator.disasm import read_instruction_bytes
from kctx_debug.errors import CommandError, KctxError

__all__ = [
    "ErrorCode",
    "Escalation",
    "FaultClass",
    "PolicyTable",
    "Trap",
    "TrapPolicy",
    "TrapSource",
    "describe_policy",
    "escalation",
    "fault_class",
    "idt_error_code",
    "segment_error_code",
    "selector_error_code",
    "trap_from_stop",
]

_SELECTOR_MASK = 0xFFFC  # a selector without its RPL: index and TI (SDM vol. 3A 3.4.2)


class ErrorCode(enum.IntFlag):
    """Low bits of a selector/IDT error code (SDM vol. 3A 6.13, Figure 6-6).

    Bits 15:3 hold the selector index (or the IDT vector), as in a selector.
    """

    EXT = 1 << 0  # during delivery of an event external to the program
    IDT = 1 << 1  # the index refers to an IDT gate
    TI = 1 << 2  # (with IDT=0) the index refers to the LDT


def selector_error_code(selector: int, ext: bool) -> int:
    """The error code naming ``selector``: its index and TI, plus EXT."""
    return (selector & _SELECTOR_MASK) | (ErrorCode.EXT if ext else 0)


def idt_error_code(vector: int, ext: bool) -> int:
    """The error code naming IDT gate ``vector``: ``vector * 8 + 2``, plus EXT."""
    return Selector(index=vector).raw | ErrorCode.IDT | (ErrorCode.EXT if ext else 0)


class TrapSource(enum.Enum):
    """Where an event came from; decides EXT, the gate-DPL check and the RIP pushed."""

    FAULT = "fault"  # an exception an instruction raised (fault or abort): RIP of it
    TRAP = "trap"  # a hardware trap exception (#DB single-step, int1): next RIP
    SOFTWARE = "software"  # int n, int3, into: gate DPL >= CPL checked, EXT = 0
    EXTERNAL = "external"  # an external (injected) interrupt
    NMI = "nmi"

    @property
    def ext(self) -> bool:
        """SDM vol. 3A 6.13: EXT is clear only for INT n, INT3 and INTO."""
        return self is not TrapSource.SOFTWARE


class TrapPolicy(enum.Enum):
    """What the debugger does when the guest raises a vector."""

    STOP = "stop"  # hand control to the user (delivered on resume unless discarded)
    DELIVER = "deliver"  # deliver through the guest's IDT and keep running


@dataclass
class PolicyTable:
    """Per-vector :class:`TrapPolicy`; vectors not set use ``default``."""

    default: TrapPolicy = TrapPolicy.DELIVER
    overrides: dict[int, TrapPolicy] = field(default_factory=dict)

    def get(self, vector: int) -> TrapPolicy:
        return self.overrides.get(vector, self.default)

    def set(self, vector: int, policy: TrapPolicy | str) -> None:
        """:raises CommandError: a vector outside 0-255 or an unknown policy."""
        if not isinstance(vector, int) or not 0 <= vector < NUM_VECTORS:
            raise CommandError(f"vector {vector!r} is outside 0-255")
        try:
            self.overrides[vector] = TrapPolicy(policy)
        except ValueError:
            raise CommandError(f"unknown trap policy {policy!r} (use stop or deliver)") from None

    def items(self) -> Iterator[tuple[int, TrapPolicy]]:
        """Every vector's policy, 0-255."""
        return ((v, self.get(v)) for v in range(NUM_VECTORS))


@dataclass(frozen=True)
class Trap:
    """One event to deliver through the IDT.

    ``pc`` is the instruction that raised it (None for external events);
    ``return_rip`` is the RIP pushed: the faulting instruction for a fault, the next
    instruction for a trap or software interrupt, the interrupted one for an
    external event. ``error_code`` is None exactly when no error code is pushed.
    """

    vector: int
    source: TrapSource
    return_rip: int
    pc: int | None = None
    error_code: int | None = None
    cr2: int | None = None

    @property
    def name(self) -> str:
        """``#PF``; ``int 0x80`` for a software interrupt; ``irq 0x20`` for an external one."""
        if self.source is TrapSource.SOFTWARE and self.vector not in (Vector.BP, Vector.OF):
            return f"int {self.vector:#x}"
        if self.source is TrapSource.EXTERNAL:
            return f"irq {self.vector:#x}"
        return exception_name(self.vector)

    @property
    def fault_rip(self) -> int:
        """The RIP a fault *during delivery* of this event reports (SDM vol. 3A 6.5)."""
        return self.pc if self.pc is not None else self.return_rip

    @property
    def sets_rf(self) -> bool:
        """Whether the RFLAGS image pushed has RF set.

        SDM vol. 3B 17.3.1.1: for any fault-class exception other than an instruction-
        breakpoint #DB (which kctx-debug never raises) the processor sets RF in the
        image it pushes, so that IRET does not re-trigger an instruction breakpoint.
        """
        return (
            self.source is TrapSource.FAULT
            and self.vector < FIRST_USER_VECTOR
            and EXCEPTIONS[self.vector].kind is ExceptionClass.FAULT
        )


# -- double faults (SDM vol. 3A 6.15, Interrupt 8) -----------------------------------------


class FaultClass(enum.Enum):
    """SDM vol. 3A Table 6-4: interrupt and exception classes."""

    BENIGN = "benign"
    CONTRIBUTORY = "contributory"
    PAGE_FAULT = "page fault"


_CONTRIBUTORY = frozenset({Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.CP})
_PAGE_FAULT_CLASS = frozenset({Vector.PF, Vector.VE})


def fault_class(trap: Trap) -> FaultClass:
    """Table 6-4's class; interrupts (software, external, NMI) are benign."""
    if trap.source not in (TrapSource.FAULT, TrapSource.TRAP):
        return FaultClass.BENIGN
    if trap.vector in _CONTRIBUTORY:
        return FaultClass.CONTRIBUTORY
    if trap.vector in _PAGE_FAULT_CLASS:
        return FaultClass.PAGE_FAULT
    return FaultClass.BENIGN


class Escalation(enum.Enum):
    SERIAL = "serial"  # deliver the second exception instead
    DOUBLE_FAULT = "double fault"
    SHUTDOWN = "shutdown"  # a triple fault


def escalation(first: Trap, second_vector: int) -> Escalation:
    """SDM vol. 3A Table 6-5: what a fault while delivering ``first`` turns into."""
    second = fault_class(Trap(second_vector, TrapSource.FAULT, 0))
    if first.vector == Vector.DF and first.source is TrapSource.FAULT:
        # "If another contributory or page fault exception occurs while attempting to
        # call the double-fault handler, the processor enters shutdown mode."
        return Escalation.SERIAL if second is FaultClass.BENIGN else Escalation.SHUTDOWN
    before = fault_class(first)
    if before is FaultClass.CONTRIBUTORY and second is FaultClass.CONTRIBUTORY:
        return Escalation.DOUBLE_FAULT
    if before is FaultClass.PAGE_FAULT and second is not FaultClass.BENIGN:
        return Escalation.DOUBLE_FAULT
    return Escalation.SERIAL


# -- from a machine stop ------------------------------------------------------------------


class _MachineView(Protocol):
    """The parts of :class:`~kctx_debug.emulator.machine.Machine` used here."""

    def read_virtual(self, va: int, size: int) -> bytes: ...
    def reg_read(self, name: str) -> int: ...


def trap_from_stop(machine: _MachineView, stop: StopEvent) -> Trap:
    """The :class:`Trap` for a BREAKPOINT (guest int3) or EXCEPTION stop.

    :raises CommandError: the stop is not a trap.
    """
    if stop.kind not in (StopKind.BREAKPOINT, StopKind.EXCEPTION) or stop.vector is None:
        raise CommandError(f"a {stop.kind.value} stop is not a trap")
    vector = stop.vector
    if vector == Vector.DB:
        return Trap(vector, TrapSource.TRAP, stop.rip, pc=stop.pc)
    if stop.software:
        return Trap(vector, TrapSource.SOFTWARE, stop.rip, pc=stop.pc)
    pc = stop.pc if stop.pc is not None else stop.rip
    error_code: int | None = None
    cr2: int | None = None
    if pushes_error_code(vector):
        if vector == Vector.PF:
            error_code = stop.error_code or 0
        else:
            error_code = segment_error_code(machine, pc, vector)
    if stop.page_fault is not None:
        cr2 = stop.page_fault.address
    return Trap(vector, TrapSource.FAULT, pc, pc=pc, error_code=error_code, cr2=cr2)


# -- selector error codes from the faulting instruction ----------------------------------

# Instructions that load a segment register from an operand (SDM vol. 2: MOV Sreg,
# LSS/LFS/LGS, LTR, LLDT): operand index of the selector source; far pointers are
# m16:64, the selector following the 8-byte offset.
_SELECTOR_OPERAND = {"mov": 1, "ltr": 0, "lldt": 0}
_FAR_POINTER = frozenset({"lss", "lfs", "lgs"})
_POP_SEGMENT = frozenset({"pop"})
# Returns that load CS (and SS) from the stack: stack offsets of the selectors
# (SDM vol. 2A IRET: RIP, CS, RFLAGS, RSP, SS; RET far: RIP, CS).
_STACK_SELECTORS = {"iretq": (8, 32), "iret": (8, 32), "retf": (8,), "retfq": (8,)}
_QWORD = 8


def _u(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _gdt_descriptor(machine: _MachineView, selector: int) -> SegmentDescriptor | None:
    sel = Selector.from_int(selector)
    if sel.is_null or sel.ti:
        return None
    gdtr = machine.reg_read("gdtr")  # limit | base << 16 (the SGDT image)
    base, limit = gdtr >> 16, gdtr & 0xFFFF
    if sel.table_offset + 7 > limit:
        return None
    try:
        return SegmentDescriptor.from_bytes(machine.read_virtual(base + sel.table_offset, 8))
    except KctxError:
        return None


def _usable(desc: SegmentDescriptor | None, selector: int) -> bool:
    return desc is not None and desc.p and desc.s and desc.dpl == selector & 3


def segment_error_code(machine: _MachineView, pc: int, vector: int) -> int:
    """The error code of a #GP/#NP/#SS/#TS raised by the instruction at ``pc``.

    A segment load (``mov sreg``, ``pop sreg``, ``lss``/``lfs``/``lgs``, ``ltr``,
    ``lldt``) reports the selector it loaded (SDM vol. 3A 6.13); ``iretq``/``retf``
    the first selector from the stack whose GDT descriptor is not a present segment
    of DPL = RPL. Anything else (a non-canonical address, a privileged instruction,
    a null selector) pushes 0. Unreadable code gives 0.
    """
    if vector not in (Vector.GP, Vector.NP, Vector.SS, Vector.TS):
        return 0
    try:
        insn = _decode(machine, pc)
        if insn is None:
            return 0
        selector = _culprit_selector(machine, insn)
    except KctxError:
        return 0
    return selector_error_code(selector, ext=False) if selector else 0


def _decode(machine: _MachineView, pc: int):  # -> CsInsn | None
    code = read_instruction_bytes(machine.read_virtual, pc)
    if not code:
        return None
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    cs.detail = True
    try:
        return next(cs.disasm(code, pc, 1), None)
    except CsError:
        return None


def _segment_operand(insn, index: int) -> bool:
    ops = insn.operands
    return (
        len(ops) > index
        and ops[index].type == X86_OP_REG
        and (insn.reg_name(ops[index].reg) in ("cs", "ds", "es", "fs", "gs", "ss"))
    )


def _operand_value(machine: _MachineView, insn, op, offset: int = 0, size: int = 2) -> int:
    if op.type == X86_OP_REG:
        return machine.reg_read(insn.reg_name(op.reg)) & 0xFFFF
    if op.type != X86_OP_MEM:
        return 0
    mem = op.mem
    address = mem.disp
    if mem.base:
        base = insn.reg_name(mem.base)
        address += insn.address + insn.size if base == "rip" else machine.reg_read(base)
    if mem.index:
        address += machine.reg_read(insn.reg_name(mem.index)) * mem.scale
    if mem.segment and insn.reg_name(mem.segment) in ("fs", "gs"):
        address += machine.reg_read(f"{insn.reg_name(mem.segment)}_base")
    return _u(machine.read_virtual((address + offset) & (2**64 - 1), size))


def _culprit_selector(machine: _MachineView, insn) -> int:
    name = insn.mnemonic
    if name == "mov" and _segment_operand(insn, 0):
        return _operand_value(machine, insn, insn.operands[1])
    if name in ("ltr", "lldt"):
        return _operand_value(machine, insn, insn.operands[0])
    if name in _FAR_POINTER and len(insn.operands) == 2:
        return _operand_value(machine, insn, insn.operands[1], offset=_QWORD)
    if name in _POP_SEGMENT and _segment_operand(insn, 0):
        return _u(machine.read_virtual(machine.reg_read("rsp"), 2))
    if name in _STACK_SELECTORS:
        rsp = machine.reg_read("rsp")
        for offset in _STACK_SELECTORS[name]:
            selector = _u(machine.read_virtual(rsp + offset, 2))
            desc = _gdt_descriptor(machine, selector)
            if selector & _SELECTOR_MASK and not _usable(desc, selector):
                return selector
    return 0


def describe_policy(table: PolicyTable) -> str:
    """``default deliver; stop: #PF #GP``: the table in one line."""
    stops = [exception_name(v) for v, p in table.overrides.items() if p is TrapPolicy.STOP]
    delivers = [exception_name(v) for v, p in table.overrides.items() if p is TrapPolicy.DELIVER]
    parts = [f"default {table.default.value}"]
    if stops:
        parts.append("stop: " + " ".join(stops))
    if delivers:
        parts.append("deliver: " + " ".join(delivers))
    return "; ".join(parts)
