"""Running a machine: run/step/stop with exact counts, and why a run stopped.

A run is a loop of ``emu_start(count=chunk)`` calls with the counting hook of
:mod:`.engine`: the count is read after each, so :attr:`Runner.icount` is exact. The
counter counts started instructions: a fault's instruction did not retire (nor did
one whose fetch faulted, which never started), a trap's did (``int3``, ``int n``,
``syscall``, ``hlt``).

Chunks last a few milliseconds: :meth:`Runner.stop` (from any thread) and timeouts
are honoured between them, where the count is exact. A ``uc.emu_stop()`` from
another thread would stop either before or after the next instruction's counting
hook, leaving the count ambiguous by one.

Every trap Unicorn reports comes to a hook and ends the run as a :class:`StopEvent`;
for a #PF the access that faulted is worked out (:func:`classify_fault_access`) and
walked, which gives the error code Unicorn does not expose.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from capstone import CS_AC_READ, CS_AC_WRITE, CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone.x86 import X86_OP_MEM
from unicorn import (
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from ..arch.vectors import Vector, exception_name
from ..errors import KctxError
from ..pagetables.entry import PagingMode
from ..pagetables.walk import Access, AccessKind, PfErrorCode, WalkResult
from .disasm import MAX_INSTRUCTION_LENGTH, read_instruction_bytes
from .engine import (
    EmulatorError,
    EngineLayout,
    InstructionCounter,
    clear_exception_in_flight,
    disable_exits,
)

__all__ = [
    "MAX_CHUNK",
    "PageFaultInfo",
    "Runner",
    "StopEvent",
    "StopKind",
    "classify_fault_access",
    "describe_stop",
]

MIN_CHUNK = 1 << 10
FIRST_CHUNK = 1 << 16
MAX_CHUNK = 1 << 24
# Chunks are sized so that one lasts about this long (seconds): stop/timeout latency.
CHUNK_SECONDS = (0.004, 0.02)
# Opcode bytes that identify the instruction before a trap's RIP (SDM vol. 2).
INT3, INT1, INT_IMM8, HLT = 0xCC, 0xF1, 0xCD, 0xF4
_RIP, _CR2 = x86.UC_X86_REG_RIP, x86.UC_X86_REG_CR2


# -- stop events ------------------------------------------------------------------------


class StopKind(Enum):
    """Why a run ended."""

    BREAKPOINT = "breakpoint"  # vector 3: int3 (ours or the guest's)
    EXCEPTION = "exception"  # a fault or software interrupt; ``vector`` says which
    SYSCALL = "syscall"  # syscall/sysenter: Unicorn does not execute them
    BUDGET = "budget"  # the instruction count asked for ran out
    TIMEOUT = "timeout"
    HALT = "halt"  # hlt
    USER_STOP = "user-stop"  # Runner.stop() or Ctrl-C
    UNTIL = "until"  # RIP reached the ``until`` address
    HOOK = "hook"  # a hook asked to stop after its instruction (Runner.stop_after_instruction)
    ERROR = "error"  # the engine failed (e.g. memory the snapshot does not hold)


@dataclass(frozen=True)
class PageFaultInfo:
    """A #PF: CR2, the access that faulted (best determination) and the walk for it."""

    address: int
    access: Access | None
    walk: WalkResult | None

    @property
    def error_code(self) -> PfErrorCode | None:
        """The error code the processor would push, from the walk (None if undetermined)."""
        if self.walk is None or self.walk.fault is None:
            return None
        return self.walk.fault.error_code


@dataclass(frozen=True)
class StopEvent:
    """One stop: its kind, where execution resumes, and the instruction counts."""

    kind: StopKind
    rip: int  # where execution resumes
    icount: int  # the machine's instruction count after the stop
    executed: int  # instructions this run retired
    vector: int | None = None
    pc: int | None = None  # the instruction that trapped, faulted or made the syscall
    software: bool = False  # int3 / int n / syscall, not a fault
    page_fault: PageFaultInfo | None = None
    message: str = ""

    @property
    def error_code(self) -> int | None:
        """#PF's error code when known; other error codes are the trap layer's business."""
        if self.page_fault is None or self.page_fault.error_code is None:
            return None
        return int(self.page_fault.error_code)

    @property
    def name(self) -> str:
        """``#PF`` for an exception, ``int 0x80`` for a software interrupt, else the kind."""
        if self.vector is None:
            return self.kind.value
        if self.software and self.vector not in (Vector.BP, Vector.DB):
            return f"int {self.vector:#x}"
        return exception_name(self.vector)

    def __str__(self) -> str:
        return describe_stop(self)


def describe_stop(event: StopEvent) -> str:
    """One line: ``#PF at 0xffffffff81000010 (cr2=0x0 error=0x2) after 12 instructions``."""
    what = event.name if event.kind is StopKind.EXCEPTION else event.kind.value
    if event.kind is StopKind.BREAKPOINT:
        what = "breakpoint"
    where = event.pc if event.pc is not None else event.rip
    detail = ""
    if event.page_fault is not None:
        code = event.error_code
        detail = f" (cr2={event.page_fault.address:#x}" + (
            f" error={code:#x})" if code is not None else ")"
        )
    if event.message:
        detail += f": {event.message}"
    return f"{what} at {where:#x}{detail} after {event.executed} instructions"


# -- deciding a #PF's access ------------------------------------------------------------

# Instructions whose only memory access is the stack (SDM vol. 2: push/call write it).
_STACK_WRITES = frozenset({"push", "pushf", "pushfq", "call", "enter"})
_STACK_READS = frozenset({"pop", "popf", "popfq", "ret", "leave", "iretq", "iret", "retf"})


def _decoded_access(code: bytes, pc: int) -> AccessKind | None:
    """READ or WRITE for the instruction's data access, from Capstone's operand access."""
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    cs.detail = True
    try:
        insn = next(cs.disasm(code, pc, 1), None)
    except CsError:
        return None
    if insn is None:
        return None
    writes = reads = False
    for op in insn.operands:
        if op.type == X86_OP_MEM:
            writes |= bool(op.access & CS_AC_WRITE)
            reads |= bool(op.access & CS_AC_READ)
    if not (writes or reads):
        if insn.mnemonic in _STACK_WRITES:
            return AccessKind.WRITE
        if insn.mnemonic in _STACK_READS:
            return AccessKind.READ
        return None
    # A read-modify-write walks for write (hardware reports W/R=1 for it).
    return AccessKind.WRITE if writes else AccessKind.READ


class _FaultView(Protocol):
    @property
    def paging_mode(self) -> PagingMode: ...
    def read_virtual(self, va: int, size: int) -> bytes: ...
    def translate(self, va: int, access: Access | None = None) -> WalkResult: ...
    @property
    def cpl(self) -> int: ...


def classify_fault_access(machine: _FaultView, pc: int, cr2: int) -> AccessKind | None:
    """Which access of the instruction at ``pc`` took the #PF at ``cr2`` (None: unknown).

    A fetch when CR2 lies within the instruction's 15 possible bytes and a fetch
    there faults; otherwise the instruction is decoded and its memory operands say
    read or write (see :func:`_decoded_access`). This is the default of
    :attr:`Runner.access_classifier`.
    """
    user = machine.cpl == 3
    if pc <= cr2 < pc + MAX_INSTRUCTION_LENGTH:
        if machine.translate(cr2, Access(AccessKind.FETCH, user)).fault is not None:
            return AccessKind.FETCH
    code = read_instruction_bytes(machine.read_virtual, pc)
    return _decoded_access(code, pc) if code else None


@dataclass
class _Pending:
    """What the hooks saw during one ``emu_start``."""

    vector: int | None = None
    hook_rip: int = 0
    invalid_opcode: bool = False
    syscall: bool = False
    until: bool = False
    hook_stop: bool = False
    unmapped: str = ""


class _MachineView(_FaultView, Protocol):
    def drop_translated_code(self, va: int, size: int) -> None: ...


class Runner:
    """Runs one Unicorn engine with exact counts; :class:`~.machine.Machine` owns one.

    :param machine: what the runner reads guest bytes and walks through.
    :param layout: from :func:`~.engine.probe_engine_layout`.
    """

    def __init__(self, uc: Uc, machine: _MachineView, layout: EngineLayout) -> None:
        self.uc = uc
        self._machine = machine
        self._layout = layout
        self._counter = InstructionCounter(uc, layout)
        self._pending = _Pending()
        self._stop = threading.Event()
        self._chunk = FIRST_CHUNK
        self.icount = 0
        disable_exits(uc)
        self.access_classifier: Callable[[int, int], AccessKind | None] = lambda pc, cr2: (
            classify_fault_access(machine, pc, cr2)
        )
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, x86.UC_X86_INS_SYSENTER)
        uc.hook_add(
            UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED,
            self._on_unmapped,
        )

    @property
    def exact_native(self) -> bool:
        """True when counts come from Unicorn's own counter (full speed)."""
        return self._counter.exact_native

    @property
    def resets_nested_faults(self) -> bool:
        return self._layout.old_exception_offset is not None

    # -- hooks (run inside emu_start) --------------------------------------------------

    def _on_interrupt(self, uc: Uc, vector: int, _data: object) -> None:
        self._pending.vector = vector
        self._pending.hook_rip = uc.reg_read(_RIP)
        uc.emu_stop()

    def _on_invalid(self, uc: Uc, _data: object) -> bool:
        self._pending.vector = Vector.UD
        self._pending.invalid_opcode = True
        self._pending.hook_rip = uc.reg_read(_RIP)
        uc.emu_stop()
        return True  # handled: no UC_ERR_INSN_INVALID

    def _on_syscall(self, uc: Uc, _data: object) -> None:
        self._pending.syscall = True
        self._pending.hook_rip = uc.reg_read(_RIP)
        uc.emu_stop()

    def _on_until(self, uc: Uc, _address: int, _size: int, _data: object) -> None:
        self._pending.until = True
        uc.emu_stop()

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, _v, _d) -> bool:
        verb = {UC_MEM_WRITE_UNMAPPED: "write", UC_MEM_FETCH_UNMAPPED: "fetch"}.get(access, "read")
        self._pending.unmapped = (
            f"{verb} of {size} bytes at physical {address:#x}, which the snapshot does not hold"
        )
        return False

    # -- public --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run in progress to stop at its next chunk boundary; thread-safe."""
        self._stop.set()

    def stop_after_instruction(self) -> None:
        """From inside a hook (e.g. a memory hook): end the run once the instruction in
        progress completes, with an exact count; the run ends as :attr:`StopKind.HOOK`
        (or as the fault, if that instruction faults after all)."""
        self._pending.hook_stop = True
        self._counter.stop_after_current()

    def reset_nested_faults(self) -> None:
        """Clear QEMU's in-flight exception so the next fault is not promoted to #DF."""
        clear_exception_in_flight(self.uc, self._layout)

    def run_private(self, begin: int, count: int) -> int | None:
        """Run the emulator's own code at ``begin``: not counted; the trap vector, if any."""
        self._pending = _Pending()
        self._counter.reset()
        try:
            self.uc.emu_start(begin, 0, count=count)
        except UcError as e:
            raise EmulatorError(f"the emulator's own code at {begin:#x} failed: {e}") from None
        vector = self._pending.vector
        self._pending = _Pending()
        if vector is not None:
            self.reset_nested_faults()
        return vector

    def run(
        self, until: int | None = None, count: int | None = None, timeout: float | None = None
    ) -> StopEvent:
        """Run from RIP; see :meth:`kctx_debug.emulator.machine.Machine.run`."""
        if count is not None and count < 0:
            raise EmulatorError(f"instruction count {count} is negative")
        if timeout is not None and timeout < 0:
            raise EmulatorError(f"timeout {timeout} is negative")
        self._stop.clear()
        deadline = None if timeout is None else time.monotonic() + timeout
        hook = None
        if until is not None:
            # A hook bounded to one address instruments only blocks holding it: drop the
            # cached ones first.
            self._machine.drop_translated_code(until, 1)
            hook = self.uc.hook_add(UC_HOOK_CODE, self._on_until, None, until, until)
        # Host-side engine calls (cache removal, register writes) can leave a silent fault
        # in flight; clear it so a real fault keeps its vector.
        self.reset_nested_faults()
        try:
            return self._run_chunks(until, count, deadline)
        finally:
            if hook is not None:
                self.uc.hook_del(hook)

    def _run_chunks(
        self, until: int | None, count: int | None, deadline: float | None
    ) -> StopEvent:
        executed = 0
        while True:
            if count is not None and executed >= count:
                return self._event(StopKind.BUDGET, executed)
            budget = self._chunk if count is None else min(self._chunk, count - executed)
            started_at = time.monotonic()
            event = self._run_chunk(until, budget, executed)
            if event is not None:
                return event
            executed += budget
            elapsed = time.monotonic() - started_at
            if elapsed < CHUNK_SECONDS[0]:
                self._chunk = min(self._chunk * 2, MAX_CHUNK)
            elif elapsed > CHUNK_SECONDS[1]:
                self._chunk = max(self._chunk // 2, MIN_CHUNK)
            if self._stop.is_set():
                return self._event(StopKind.USER_STOP, executed)
            if deadline is not None and time.monotonic() >= deadline:
                return self._event(StopKind.TIMEOUT, executed)

    # -- internals ------------------------------------------------------------------------

    def _event(self, kind: StopKind, executed: int, **fields) -> StopEvent:
        return StopEvent(kind, self.uc.reg_read(_RIP), self.icount, executed, **fields)

    def _run_chunk(self, until: int | None, budget: int, executed: int) -> StopEvent | None:
        """One ``emu_start``; an event if the run must end, None if the budget ran out."""
        self._pending = _Pending()
        self._counter.reset()
        error: UcError | None = None
        interrupted = False
        try:
            self.uc.emu_start(self.uc.reg_read(_RIP), 0, count=budget)
        except UcError as e:
            error = e
        except KeyboardInterrupt:
            interrupted = True
        started = self._counter.read()
        pending = self._pending
        if pending.vector is not None:
            return self._trap_event(pending, started, executed)
        if pending.syscall:
            self.icount += started
            return self._event(
                StopKind.SYSCALL, executed + started, pc=pending.hook_rip, software=True
            )
        if pending.until:
            # Counted by the (first) counting hook, stopped before it ran.
            retired = min(started - 1, budget)
            self.icount += retired
            return self._event(StopKind.UNTIL, executed + retired)
        if pending.hook_stop and error is None:
            # The counting hook counted the next instruction, whose start it prevented.
            retired = max(started - 1, 0)
            self.icount += retired
            return self._event(StopKind.HOOK, executed + retired)
        if error is not None:
            # A data access to unbacked memory started its instruction; a fetch did not.
            fetch = "fetch" in pending.unmapped or "FETCH" in str(error)
            retired = started if fetch else max(started - 1, 0)
            self.icount += retired
            rip = self.uc.reg_read(_RIP)
            return self._event(
                StopKind.ERROR, executed + retired, pc=rip, message=pending.unmapped or str(error)
            )
        # The native counter also counts the instruction its own stop prevented.
        spent = started > budget or (started == budget and not self._counter.exact_native)
        if spent or (started == budget and interrupted):
            self.icount += budget
            return self._event(StopKind.USER_STOP, executed + budget) if interrupted else None
        self.icount += started
        rip = self.uc.reg_read(_RIP)
        if interrupted:
            return self._event(StopKind.USER_STOP, executed + started)
        if self._byte_before(rip, 1) == bytes([HLT]):
            return self._event(StopKind.HALT, executed + started, pc=rip - 1)
        return self._event(
            StopKind.ERROR, executed + started, message="the engine stopped for no known reason"
        )

    def _byte_before(self, rip: int, n: int) -> bytes:
        try:
            return self._machine.read_virtual(rip - n, n)
        except KctxError:
            return b""

    def _trap_event(self, pending: _Pending, started: int, executed: int) -> StopEvent:
        vector, rip = pending.vector, pending.hook_rip
        assert vector is not None
        software, pc = False, rip
        if pending.invalid_opcode:
            pass
        elif vector == Vector.BP:
            software = True
            pc = rip - 1 if self._byte_before(rip, 1) == bytes([INT3]) else rip - 2
        elif vector == Vector.DB:
            software = True  # a trap: single-step, int1 or a data breakpoint
            pc = rip - 1 if self._byte_before(rip, 1) == bytes([INT1]) else None
        elif self._byte_before(rip, 2) == bytes([INT_IMM8, vector]) or vector >= 32:
            software, pc = True, rip - 2
        page_fault = None
        if vector == Vector.PF and not software:
            page_fault = self._page_fault(rip)
        # A faulting instruction was counted when it started and did not retire; one
        # whose fetch faulted (a #PF on its bytes, or QEMU's #GP at a non-canonical
        # target) was never translated, so never counted.
        fetch = (
            page_fault is not None
            and page_fault.access is not None
            and page_fault.access.kind is AccessKind.FETCH
        ) or (vector == Vector.GP and not self._machine.paging_mode.is_canonical(rip))
        retired = started if software or fetch else max(started - 1, 0)
        self.icount += retired
        if not software:
            self.reset_nested_faults()
        kind = StopKind.BREAKPOINT if vector == Vector.BP else StopKind.EXCEPTION
        return self._event(
            kind,
            executed + retired,
            vector=vector,
            pc=pc,
            software=software,
            page_fault=page_fault,
        )

    def _page_fault(self, pc: int) -> PageFaultInfo:
        cr2 = self.uc.reg_read(_CR2)
        kind = self.access_classifier(pc, cr2)
        if kind is None:
            return PageFaultInfo(cr2, None, None)
        access = Access(kind, user=self._machine.cpl == 3)
        return PageFaultInfo(cr2, access, self._machine.translate(cr2, access))
