"""Delivering a trap through the guest's IDT, as the processor does in IA-32e mode.

Unicorn never delivers anything (every trap ends the run, see
:mod:`kctx_debug.emulator.control`); this module does what SDM vol. 3A 6.12 and 6.14
(and the INT n pseudo-code of vol. 2A) describe, reading the guest's own IDT, GDT and
TSS through the page tables with implicit supervisor accesses:

1. the gate: ``vector * 16 + 15`` within IDTR.limit, else #GP(vector*8+2+EXT); a 64-bit
   interrupt or trap gate, else #GP(same); for ``int n``/``int3`` the gate's DPL >= CPL,
   else #GP(vector*8+2); present, else #NP(vector*8+2+EXT);
2. the handler's code segment: a non-null selector inside the GDT (#GP(EXT),
   #GP(selector+EXT)), a 64-bit code segment (L=1, D=0) with DPL <= CPL
   (#GP(selector+EXT)), present (#NP(selector+EXT)); a canonical gate offset (#GP(EXT));
3. the stack: the gate's IST slot from the TSS if it names one, else RSPn from the TSS
   on a privilege change, else the current RSP (#TS(TR+EXT) if the TSS is too short,
   #SS(EXT) if the new RSP is not canonical); aligned down to 16 bytes (SDM 6.14.2);
4. the frame (Figure 6-9): SS, RSP, RFLAGS, CS, RIP, then the error code if the event
   has one; a push that faults is a #PF (write, supervisor) at that address;
5. the new state: CS from the gate, SS null with RPL 0 on a privilege change, RIP the
   gate offset, RFLAGS with TF, NT, RF and VM cleared, and IF cleared through an
   interrupt gate (SDM 6.12.1.2); CR2 for a #PF.

Every check runs before anything is written, so a delivery that faults changes
nothing; the fault then replaces the event or escalates per Table 6-5
(:func:`~.exceptions.escalation`): to #DF (error code 0, through gate 8 and its own IST)
and, if delivering #DF faults too, to a :class:`TripleFault`, which is reported rather
than delivered (a real CPU would shut down).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Protocol

from kctx_debug.arch.bits import RFLAGS
from kctx_debug.arch.descriptors import IdtGate, SegmentDescriptor, Selector
from kctx_debug.arch.tss import TSS64_SIZE, Tss64
from kctx_debug.arch.vectors import Vector, pushes_error_code
from kctx_debug.errors import CommandError, KctxError
from kctx_debug.pagetables.entry import PagingMode
from kctx_debug.pagetables.walk import Access, AccessKind, CpuPagingState, WalkResult, translate
from kctx_debug.physmem import PAGE_SIZE
from kctx_debug.snapshot import Segment

from .exceptions import (
    Escalation,
    Trap,
    TrapSource,
    escalation,
    idt_error_code,
    selector_error_code,
)

__all__ = [
    "GATE_SIZE",
    "Delivery",
    "DeliveryError",
    "StackSource",
    "TrapFrame",
    "TrapMachine",
    "TripleFault",
    "deliver",
    "describe_delivery",
    "read_gate",
    "write_gate",
]

GATE_SIZE = 16  # a 64-bit IDT gate (SDM vol. 3A 6.14.1)
_STACK_ALIGN = 16  # SDM vol. 3A 6.14.2
_QWORD = 8
_MASK = (1 << 64) - 1
# Cleared on every delivery through an interrupt or trap gate (SDM vol. 3A 6.12.1.2).
_CLEARED_FLAGS = RFLAGS.TF | RFLAGS.NT | RFLAGS.RF | RFLAGS.VM
_IMPLICIT_READ = Access(AccessKind.READ, implicit=True)


class DeliveryError(KctxError):
    """Delivery cannot be emulated (memory the snapshot lacks, a CPL1/2 handler …)."""


class StackSource(enum.Enum):
    """Which stack the frame was pushed on (SDM vol. 3A 6.14.4, 6.14.5)."""

    CURRENT = "current"
    RSP = "rsp"  # TSS.RSPn on a privilege change
    IST = "ist"  # TSS.ISTn named by the gate


@dataclass(frozen=True)
class TrapFrame:
    """The frame delivery pushes (SDM vol. 3A Figure 6-9), RSP after delivery upwards."""

    error_code: int | None
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    @property
    def size(self) -> int:
        return _QWORD * (6 if self.error_code is not None else 5)

    def to_bytes(self) -> bytes:
        """The quadwords as they lie on the stack, lowest address first."""
        values = (self.rip, self.cs, self.rflags, self.rsp, self.ss)
        if self.error_code is not None:
            values = (self.error_code, *values)
        return struct.pack(f"<{len(values)}Q", *values)

    @classmethod
    def from_bytes(cls, data: bytes, *, error_code: bool) -> TrapFrame:
        """Decode a frame read at the handler's RSP.

        :raises CommandError: fewer bytes than the frame holds.
        """
        count = 6 if error_code else 5
        if len(data) < count * _QWORD:
            raise CommandError(f"a trap frame needs {count * _QWORD} bytes, got {len(data)}")
        values = struct.unpack_from(f"<{count}Q", data)
        code = values[0] if error_code else None
        rip, cs, rflags, rsp, ss = values[-5:]
        return cls(code, rip, cs, rflags, rsp, ss)


@dataclass(frozen=True)
class Delivery:
    """A completed delivery: what was delivered, through which gate, and the frame.

    ``chain`` starts with the event asked for; each later entry replaced the one
    before it because delivering that one faulted (the last is ``trap``). ``reasons``
    says why each replacement happened.
    """

    trap: Trap
    chain: tuple[Trap, ...]
    reasons: tuple[str, ...]
    gate: IdtGate
    handler: int
    frame: TrapFrame
    frame_address: int  # RSP when the handler starts
    stack: StackSource
    cpl_before: int
    cpl_after: int
    cs: int
    ss: int
    rflags: int


@dataclass(frozen=True)
class TripleFault:
    """Delivering #DF faulted: a real processor shuts down. Nothing was changed."""

    chain: tuple[Trap, ...]
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return self.reasons[-1] if self.reasons else ""

    def __str__(self) -> str:
        events = " -> ".join(t.name for t in self.chain)
        return f"triple fault ({events}): {self.reason}"


class _Fault(Exception):
    """Internal: a check failed; the exception delivery raises instead."""

    def __init__(self, vector: int, error_code: int, reason: str, cr2: int | None = None):
        super().__init__(reason)
        self.vector, self.error_code, self.reason, self.cr2 = vector, error_code, reason, cr2


class TrapMachine(Protocol):
    """What delivery uses of :class:`~kctx_debug.emulator.machine.Machine`."""

    @property
    def cpl(self) -> int: ...
    @property
    def paging_mode(self) -> PagingMode: ...
    def reg_read(self, name: str) -> int: ...
    def reg_write(self, name: str, value: int) -> None: ...
    def table_register(self, name: str) -> Segment: ...
    @property
    def memory(self) -> object: ...  # machine-physical memory, as the walker reads it
    @property
    def paging(self) -> CpuPagingState: ...
    def translate(self, va: int, access: Access | None = None) -> WalkResult: ...
    def read_physical(self, address: int, size: int) -> bytes: ...
    def write_virtual(self, va: int, data: bytes) -> None: ...
    def enter_ring0(self, rip: int, rsp: int, *, cs=None, ss=None, rflags=None) -> None: ...
    def enter_ring3(self, rip: int, rsp: int, *, cs=None, ss=None, rflags=None) -> None: ...


# -- reading through the page tables ------------------------------------------------------


def _page_fault(walk: WalkResult, va: int, what: str) -> _Fault:
    fault = walk.fault
    assert fault is not None
    if fault.vector == Vector.PF:
        return _Fault(Vector.PF, int(fault.error_code), f"{what}: {fault.reason}", cr2=va)
    return _Fault(fault.vector, 0, f"{what}: {fault.reason}")


def _read(machine: TrapMachine, va: int, size: int, what: str) -> bytes:
    """An implicit supervisor read (descriptor tables, TSS); faults become _Fault."""
    out = bytearray()
    while len(out) < size:
        addr = (va + len(out)) & _MASK
        n = min(size - len(out), PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
        walk = machine.translate(addr, _IMPLICIT_READ)
        if walk.fault is not None:
            raise _page_fault(walk, addr, what)
        if not walk.ok:
            raise DeliveryError(f"{what} at {addr:#x}: a page table is not in the snapshot")
        out += machine.read_physical(walk.phys, n)
    return bytes(out)


def read_gate(machine: TrapMachine, vector: int) -> IdtGate:
    """The IDT gate for ``vector``, read through IDTR (a debugger read: no privilege checks).

    :raises CommandError: the vector is outside IDTR.limit or the IDT cannot be read.
    """
    idtr = machine.table_register("idtr")
    base, limit = idtr.base or 0, idtr.limit or 0
    if not 0 <= vector <= 0xFF or vector * GATE_SIZE + GATE_SIZE - 1 > limit:
        raise CommandError(f"vector {vector:#x} is outside the IDT (limit {limit:#x})")
    try:
        return IdtGate.from_bytes(_read(machine, base + vector * GATE_SIZE, GATE_SIZE, "IDT"))
    except _Fault as e:
        raise CommandError(f"cannot read IDT gate {vector:#x}: {e.reason}") from None


def write_gate(machine: TrapMachine, vector: int, gate: IdtGate) -> None:
    """Write ``gate`` over IDT entry ``vector`` in guest memory (read-only pages too).

    :raises CommandError: the vector is outside IDTR.limit or the IDT cannot be written.
    """
    read_gate(machine, vector)  # bounds and readability
    base = machine.table_register("idtr").base or 0
    machine.write_virtual(base + vector * GATE_SIZE, gate.to_bytes())


# -- the checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    gate: IdtGate
    handler: int
    target_cpl: int
    stack: StackSource
    frame: TrapFrame
    frame_address: int
    cs: int
    ss: int
    rflags: int


def _gate(machine: TrapMachine, trap: Trap) -> IdtGate:
    vector, ext = trap.vector, trap.source.ext
    idt_code = idt_error_code(vector, ext)
    idtr = machine.table_register("idtr")
    if vector * GATE_SIZE + GATE_SIZE - 1 > (idtr.limit or 0):
        raise _Fault(Vector.GP, idt_code, f"gate {vector:#x} is beyond IDTR.limit")
    raw = _read(machine, (idtr.base or 0) + vector * GATE_SIZE, GATE_SIZE, "IDT")
    gate = IdtGate.from_bytes(raw)
    if not gate.is_valid_64bit_type:
        raise _Fault(Vector.GP, idt_code, f"gate {vector:#x} is not a 64-bit interrupt/trap gate")
    cpl = machine.cpl
    if trap.source is TrapSource.SOFTWARE and gate.dpl < cpl:
        reason = f"gate {vector:#x} has DPL {gate.dpl} < CPL {cpl}"
        raise _Fault(Vector.GP, idt_error_code(vector, False), reason)
    if not gate.p:
        raise _Fault(Vector.NP, idt_code, f"gate {vector:#x} is not present")
    return gate


def _code_segment(machine: TrapMachine, gate: IdtGate, ext: bool) -> SegmentDescriptor:
    selector = Selector.from_int(gate.selector)
    code = selector_error_code(gate.selector, ext)
    if selector.is_null:
        raise _Fault(Vector.GP, int(ext), "the gate's code selector is null")
    table = machine.table_register("ldtr" if selector.ti else "gdtr")
    if selector.table_offset + 7 > (table.limit or 0):
        raise _Fault(Vector.GP, code, f"selector {gate.selector:#x} is beyond the table limit")
    raw = _read(machine, (table.base or 0) + selector.table_offset, 8, "GDT")
    desc = SegmentDescriptor.from_bytes(raw)
    if not desc.is_code or desc.dpl > machine.cpl:
        reason = f"selector {gate.selector:#x} is not a code segment of DPL <= CPL"
        raise _Fault(Vector.GP, code, reason)
    if not desc.p:
        raise _Fault(Vector.NP, code, f"code segment {gate.selector:#x} is not present")
    if not desc.l or desc.db:
        raise _Fault(Vector.GP, code, f"code segment {gate.selector:#x} is not 64-bit")
    return desc


def _new_stack(
    machine: TrapMachine, gate: IdtGate, target_cpl: int, ext: bool
) -> tuple[int, StackSource]:
    cpl = machine.cpl
    if gate.ist == 0 and target_cpl == cpl:
        return machine.reg_read("rsp"), StackSource.CURRENT
    tr = machine.table_register("tr")
    if (tr.limit or 0) < TSS64_SIZE - 1:
        reason = f"the TSS limit {tr.limit or 0:#x} is below {TSS64_SIZE - 1:#x}"
        raise _Fault(Vector.TS, selector_error_code(tr.selector, ext), reason)
    tss = Tss64.from_bytes(_read(machine, tr.base or 0, TSS64_SIZE, "TSS"))
    if gate.ist:
        return tss.ist_stack(gate.ist), StackSource.IST
    return tss.rsp_for(target_cpl), StackSource.RSP


def _check_pushes(machine: TrapMachine, top: int, size: int, user: bool, ext: bool) -> None:
    """Each quadword push from ``top`` down, in push order (SS first)."""
    mode = machine.paging_mode
    access = Access(AccessKind.WRITE, user=user)
    checked_page = None
    for address in range(top - _QWORD, top - size - 1, -_QWORD):
        address &= _MASK
        if not mode.is_canonical(address):
            raise _Fault(Vector.SS, int(ext), f"stack push at {address:#x} is not canonical")
        page = address & ~(PAGE_SIZE - 1)
        if page == checked_page:
            continue
        walk = machine.translate(address, access)
        if walk.fault is not None:
            raise _page_fault(walk, address, "stack push")
        if not walk.ok:
            raise DeliveryError(f"stack push at {address:#x}: a page table is not in the snapshot")
        checked_page = page


class _Planning:
    """The machine while a delivery is planned (nothing changes): every walk uses the
    paging state read once, instead of reading the registers again for each."""

    def __init__(self, machine: TrapMachine) -> None:
        self._machine = machine
        self._paging = machine.paging

    def __getattr__(self, name: str):
        return getattr(self._machine, name)

    def translate(self, va: int, access: Access | None = None) -> WalkResult:
        return translate(self._machine.memory, va, self._paging, access)


def _plan(machine: TrapMachine, trap: Trap) -> _Plan:
    ext = trap.source.ext
    gate = _gate(machine, trap)
    desc = _code_segment(machine, gate, ext)
    if not machine.paging_mode.is_canonical(gate.offset):
        raise _Fault(Vector.GP, int(ext), f"handler {gate.offset:#x} is not canonical")
    cpl = machine.cpl
    target_cpl = cpl if desc.conforming else desc.dpl
    if target_cpl not in (0, cpl):
        raise DeliveryError(f"a handler at CPL {target_cpl} cannot be emulated")
    rsp, stack = _new_stack(machine, gate, target_cpl, ext)
    if not machine.paging_mode.is_canonical(rsp):
        raise _Fault(Vector.SS, int(ext), f"new stack pointer {rsp:#x} is not canonical")
    top = rsp & ~(_STACK_ALIGN - 1)
    rflags = machine.reg_read("rflags")
    with_code = trap.source is TrapSource.FAULT and pushes_error_code(trap.vector)
    error_code = (trap.error_code or 0) if with_code else None
    frame = TrapFrame(
        error_code=error_code,
        rip=trap.return_rip,
        cs=machine.reg_read("cs"),
        rflags=int(rflags | RFLAGS.RF) if trap.sets_rf else rflags,
        rsp=machine.reg_read("rsp"),
        ss=machine.reg_read("ss"),
    )
    _check_pushes(machine, top, frame.size, user=target_cpl == 3, ext=ext)
    new_flags = int(rflags & ~_CLEARED_FLAGS)
    if gate.is_interrupt_gate:
        new_flags &= ~int(RFLAGS.IF)
    # On a privilege change SS becomes a null selector with RPL = the new CPL (6.14.4).
    ss = target_cpl if target_cpl != cpl else machine.reg_read("ss")
    return _Plan(
        gate, gate.offset, target_cpl, stack, frame, (top - frame.size) & _MASK, gate.selector,
        ss, new_flags,
    )  # fmt: skip


def _commit(machine: TrapMachine, trap: Trap, plan: _Plan) -> None:
    machine.write_virtual(plan.frame_address, plan.frame.to_bytes())
    if trap.vector == Vector.PF and trap.source is TrapSource.FAULT and trap.cr2 is not None:
        machine.reg_write("cr2", trap.cr2)
    cpl = machine.cpl
    if plan.target_cpl == cpl and plan.cs == machine.reg_read("cs"):
        machine.reg_write("rsp", plan.frame_address)
        machine.reg_write("rflags", plan.rflags)
        machine.reg_write("rip", plan.handler)
    elif plan.target_cpl == 0:
        machine.enter_ring0(
            plan.handler, plan.frame_address, cs=plan.cs, ss=plan.ss, rflags=plan.rflags
        )
    else:
        machine.enter_ring3(
            plan.handler, plan.frame_address, cs=plan.cs, ss=plan.ss, rflags=plan.rflags
        )


def deliver(machine: TrapMachine, trap: Trap) -> Delivery | TripleFault:
    """Deliver ``trap`` through the guest's IDT, escalating faults as the CPU would.

    :raises DeliveryError: something delivery needs is outside what can be emulated
        (nothing has been changed then).
    """
    chain, reasons = [trap], []
    current = trap
    cpl_before = machine.cpl
    while True:
        try:
            plan = _plan(_Planning(machine), current)  # type: ignore[arg-type]
            break
        except _Fault as fault:
            reasons.append(f"delivering {current.name}: {fault.reason}")
            step = escalation(current, fault.vector)
            rip = current.fault_rip
            if step is Escalation.SHUTDOWN:
                return TripleFault(tuple(chain), tuple(reasons))
            if step is Escalation.DOUBLE_FAULT:
                current = Trap(Vector.DF, TrapSource.FAULT, rip, pc=rip, error_code=0)
            else:
                current = Trap(
                    fault.vector, TrapSource.FAULT, rip, pc=rip, error_code=fault.error_code,
                    cr2=fault.cr2,
                )  # fmt: skip
            chain.append(current)
    _commit(machine, current, plan)
    return Delivery(
        trap=current,
        chain=tuple(chain),
        reasons=tuple(reasons),
        gate=plan.gate,
        handler=plan.handler,
        frame=plan.frame,
        frame_address=plan.frame_address,
        stack=plan.stack,
        cpl_before=cpl_before,
        cpl_after=plan.target_cpl,
        cs=plan.cs,
        ss=plan.ss,
        rflags=plan.rflags,
    )


def describe_delivery(result: Delivery | TripleFault) -> str:
    """One line per event, e.g. ``#PF error=0x2 -> 0xffffffff81000100 on ist1 rsp=…``."""
    if isinstance(result, TripleFault):
        return str(result)
    lines = [f"{reason}" for reason in result.reasons]
    trap = result.trap
    code = f" error={trap.error_code:#x}" if result.frame.error_code is not None else ""
    stack = result.stack.value + (str(result.gate.ist) if result.stack is StackSource.IST else "")
    lines.append(
        f"{trap.name}{code} -> {result.handler:#x} (cpl {result.cpl_before}->{result.cpl_after},"
        f" {stack} stack, rsp={result.frame_address:#x})"
    )
    return "\n".join(lines)
