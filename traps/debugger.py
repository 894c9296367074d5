"""The debugger: breakpoints, watchpoints, trap policy and delivery over one Machine.

>>> dbg = Debugger(Machine.from_context(open_context("demo.json")))  # doctest: +SKIP
>>> dbg.break_at(dbg.symbols.address("bp_handler"))                  # doctest: +SKIP
>>> dbg.cont()                                                       # doctest: +SKIP
TrapEvent(seq=1, kind=<TrapKind.BREAKPOINT: 'breakpoint'>, name='breakpoint 1', ...)

Every command (:meth:`Debugger.cont`, :meth:`~Debugger.stepi`, :meth:`~Debugger.nexti`,
:meth:`~Debugger.finish`, :meth:`~Debugger.until`) runs the machine in native runs,
handling what stops them, and returns the :class:`~.events.TrapEvent` it stopped with
(kind ``stop`` for budget, until, timeout, user stop, halt and errors). Every event
on the way is appended to :attr:`Debugger.trap_log` and passed to each callback in
:attr:`Debugger.on_event`:

- a breakpoint hit (condition true) stops, with RIP at the breakpoint; resuming steps
  the original instruction once with the int3 lifted, then re-arms it. Our int3 is not
  a guest instruction: the instruction count does not include it.
- a trap the guest raises (an exception, ``int n``, the guest's own int3) is an
  ``exception`` event; with the vector's policy ``deliver`` it is delivered through the
  IDT (:mod:`.delivery`) and the event names the handler, with ``stop`` the command
  stops and the trap is left :attr:`~Debugger.pending_trap`: the next command delivers
  it first, unless :meth:`~Debugger.discard_pending` dropped it; for ``stepi`` the
  delivery is the step (it stops at the handler's first instruction). Escalations during
  delivery (#DF) are always delivered; a triple fault stops the machine for good.
- ``syscall`` is executed (:mod:`.syscall`) and logged, and the run goes on.
- a watchpoint hit stops after the accessing instruction.

The instruction budget (``count``) counts guest instructions only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kctx_debug.arch.bits import RFLAGS
from kctx_debug.arch.descriptors import IdtGate
from kctx_debug.emulator.control import StopEvent, StopKind
from kctx_debug.emulator.disasm import Disassembly, disassemble
from kctx_debug.emulator.machine import Machine
from kctx_debug.errors import CommandError, KctxError

from .breakpoints import Breakpoint, BreakpointTable
from .delivery import Delivery, DeliveryError, TrapFrame, TripleFault, deliver
from .events import EVENT_REGISTERS, TrapEvent, TrapKind
from .exceptions import PolicyTable, Trap, TrapPolicy, TrapSource, trap_from_stop
from .inject import STI, PendingInterrupts, injected_trap, redirect_gate
from .syscall import SyscallEntry, do_syscall
from .watchpoints import WatchHit, WatchKind, Watchpoint, WatchTable, describe_watch_hit

__all__ = ["Debugger", "DebuggerEnv"]

_QWORD = 8


class DebuggerEnv:
    """The :class:`~.expr.ExprEnv` of a debugger: its registers, symbols and memory."""

    def __init__(self, debugger: Debugger) -> None:
        self._dbg = debugger

    def register(self, name: str) -> int:
        return self._dbg.machine.reg_read(name)

    def symbol(self, name: str) -> int:
        return self._dbg.symbols.address(name)

    def read(self, address: int, size: int) -> bytes:
        return self._dbg.read_virtual(address, size)


class Debugger:
    """Drives one :class:`~kctx_debug.emulator.machine.Machine`; see the module docstring."""

    def __init__(self, machine: Machine, *, symbols=None) -> None:
        self.machine = machine
        self.symbols = symbols if symbols is not None else machine.context.symbols
        self.breakpoints = BreakpointTable(machine)
        self.watchpoints = WatchTable(machine, machine.runner.stop_after_instruction)
        self.policy = PolicyTable()
        self.trap_log: list[TrapEvent] = []
        self.on_event: list[Callable[[TrapEvent], None]] = []
        self.pending_trap: Trap | None = None
        self.pending_interrupts = PendingInterrupts()
        self.shutdown: TripleFault | None = None
        self.last_delivery: Delivery | None = None
        self.last_syscall: SyscallEntry | None = None
        self.last_stop: StopEvent | None = None
        self.watch_hits: list[WatchHit] = []
        self.message = ""  # why the last command stopped, when there is more to say
        self.env = DebuggerEnv(self)
        self._stop_requested = threading.Event()
        self._shadow = False  # the instruction after STI: interrupts still inhibited
        self._resume_at: int | None = None  # step over a breakpoint here, once

    # -- memory --------------------------------------------------------------------------

    def read_virtual(self, va: int, size: int) -> bytes:
        """Guest memory as the guest wrote it: breakpoint bytes show their originals."""
        data = self.machine.read_virtual(va, size)
        return self.breakpoints.unpatch(va, data, self.machine.virt_to_phys)

    def write_virtual(self, va: int, data: bytes) -> None:
        """Write guest memory; bytes written under a breakpoint become its original."""
        self.machine.write_virtual(va, data)
        self.breakpoints.repatch(va, len(data), self.machine.virt_to_phys)

    def disassemble(self, address: int, count: int = 1, syntax: str = "intel") -> Disassembly:
        """Disassemble the original code (without our int3 bytes), with symbols."""
        return disassemble(self.read_virtual, address, count, self.symbols, syntax)

    def read_trap_frame(self, rsp: int | None = None, *, error_code: bool = False) -> TrapFrame:
        """The trap frame at ``rsp`` (default: RSP now, as at a handler's first instruction)."""
        rsp = self.machine.reg_read("rsp") if rsp is None else rsp
        count = 6 if error_code else 5
        return TrapFrame.from_bytes(self.read_virtual(rsp, count * _QWORD), error_code=error_code)

    # -- breakpoints, watchpoints, policy -------------------------------------------------

    def break_at(self, address: int, condition: str | None = None) -> Breakpoint:
        return self.breakpoints.add(address, condition=condition)

    def tbreak(self, address: int, condition: str | None = None) -> Breakpoint:
        """A breakpoint deleted when it stops."""
        return self.breakpoints.add(address, temporary=True, condition=condition)

    def delete(self, number: int) -> Breakpoint:
        return self.breakpoints.delete(number)

    def enable(self, number: int) -> Breakpoint:
        return self.breakpoints.enable(number)

    def disable(self, number: int) -> Breakpoint:
        return self.breakpoints.disable(number)

    def condition(self, number: int, text: str | None) -> Breakpoint:
        return self.breakpoints.set_condition(number, text)

    def watch(self, address: int, size: int = _QWORD) -> Watchpoint:
        return self.watchpoints.add(address, size, WatchKind.WRITE)

    def rwatch(self, address: int, size: int = _QWORD) -> Watchpoint:
        return self.watchpoints.add(address, size, WatchKind.READ)

    def awatch(self, address: int, size: int = _QWORD) -> Watchpoint:
        return self.watchpoints.add(address, size, WatchKind.ACCESS)

    def set_policy(self, vector: int, policy: TrapPolicy | str) -> None:
        self.policy.set(vector, policy)

    def discard_pending(self) -> Trap | None:
        """Drop the trap a stop left pending (e.g. after fixing what faulted)."""
        trap, self.pending_trap = self.pending_trap, None
        return trap

    # -- injection -----------------------------------------------------------------------

    def inject(
        self, vector: int, error_code: int | None = None, cr2: int | None = None,
        force: bool = False,
    ) -> TrapEvent | None:  # fmt: skip
        """Deliver an interrupt or exception now, at the current instruction boundary.

        A maskable interrupt (vector >= 32) waits while RFLAGS.IF is clear (or others
        wait before it) unless ``force``: it is then queued in
        :attr:`pending_interrupts`, None is returned, and a later command delivers it
        once IF is set. Otherwise the delivery's event is returned (a ``stop`` event if
        delivery could not be done).

        :raises CommandError: see :func:`~.inject.injected_trap`; the machine is shut down.
        """
        self._check_alive()
        trap = injected_trap(vector, self.machine.reg_read("rip"), error_code, cr2)
        if trap.source is TrapSource.EXTERNAL and not force:
            if self.pending_interrupts or not self._interrupts_enabled():
                self.pending_interrupts.push(vector)
                self.message = f"irq {vector:#x} pending until RFLAGS.IF is set"
                return None
        count = len(self.trap_log)
        stop = self._deliver(trap, announced=False)
        return stop if stop is not None else self.trap_log[count:][-1]

    def idt_set(self, vector: int, handler: int, *, selector: int | None = None) -> IdtGate:
        """Redirect IDT gate ``vector`` to ``handler`` in guest memory; the new gate."""
        return redirect_gate(self.machine, vector, handler, selector=selector)

    # -- running -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the command in progress to stop (thread-safe)."""
        self._stop_requested.set()
        self.machine.stop()

    def cont(self, timeout: float | None = None, count: int | None = None) -> TrapEvent:
        """Run until something stops it (a breakpoint, a stop-policy trap, a watchpoint,
        ``count`` guest instructions, ``timeout`` seconds, :meth:`stop`)."""
        return self._run(count=count, timeout=timeout)

    def stepi(self, n: int = 1) -> TrapEvent:
        """Execute ``n`` instructions (stopping early at a breakpoint or trap).

        A pending trap's delivery is the first step, as a hardware single-step: it
        stops at the handler's first instruction without executing it.
        """
        if n < 1:
            raise CommandError(f"cannot step {n} instructions")
        return self._run(count=n, delivery_steps=True)

    def until(
        self, address: int, timeout: float | None = None, count: int | None = None
    ) -> TrapEvent:
        """Run until RIP is ``address`` (at once if it already is), or for at most
        ``count`` guest instructions (then a ``budget`` stop)."""
        return self._run(until=address, timeout=timeout, count=count)

    def nexti(self) -> TrapEvent:
        """Step one instruction, stepping over a call (until it returns to this frame)."""
        rip = self.machine.reg_read("rip")
        listing = self.disassemble(rip, 1)
        if not listing or not listing[0].is_call:
            return self.stepi(1)
        frame = self.machine.reg_read("rsp")
        return self._run(until=listing[0].next_address, arrived=self._above(frame))

    def finish(self, *, frame_pointer: bool | None = None, count: int | None = None) -> TrapEvent:
        """Run until the current function returns to its caller.

        In the handler of the last delivery (see :meth:`trap_frame`) that is the
        ``iretq`` back to the interrupted context: the run stops once RIP, CS and RSP
        are the trap frame's. Elsewhere the return address is the quadword at RSP
        when RIP is a symbol's first byte (function entry, before any push), else at
        RBP+8 (a frame-pointer prologue, ``push rbp; mov rbp, rsp``);
        ``frame_pointer`` forces either. The run stops at the return address once RSP
        is above the return slot, so a recursive call returning to the same address
        does not stop it; ``count`` bounds the run (a ``budget`` stop).
        """
        rip = self.machine.reg_read("rip")
        if frame_pointer is None:
            trap_frame = self.trap_frame()
            if trap_frame is not None:
                return self._run(
                    until=trap_frame.rip, arrived=self._returned_to(trap_frame), count=count
                )
            hit = self.symbols.lookup(rip)
            frame_pointer = not (hit is not None and hit.offset == 0)
        slot = self.machine.reg_read("rbp" if frame_pointer else "rsp") + (
            _QWORD if frame_pointer else 0
        )
        try:
            ret = int.from_bytes(self.read_virtual(slot, _QWORD), "little")
        except KctxError as e:
            raise CommandError(f"cannot read the return address at {slot:#x}: {e}") from None
        if ret == 0 or self.fetch_fault(ret) is not None:
            # No caller to return to: GDB's words for the same case.
            raise CommandError('"finish" not meaningful in the outermost frame.')
        return self._run(until=ret, arrived=self._above(slot + _QWORD), count=count)

    def fetch_fault(self, address: int) -> str | None:
        """Why no privilege level could fetch an instruction at ``address`` (None: one can)."""
        from ..pagetables.walk import Access, AccessKind

        reason = None
        for user in (False, True):
            result = self.machine.translate(address, Access(AccessKind.FETCH, user=user))
            if result.ok and result.fault is None:
                return None
            if reason is None:
                reason = result.fault.reason if result.fault is not None else "not mapped"
        return reason

    def trap_frame(self) -> TrapFrame | None:
        """The frame the last delivery pushed, if RIP is still in its handler.

        "In its handler": at the CPL it entered, RSP at or below the frame, and RIP
        the handler's entry or inside the symbol that starts there. The frame is read
        from the stack now (a handler may have edited it); None otherwise.
        """
        delivery = self.last_delivery
        machine = self.machine
        if delivery is None or machine.cpl != delivery.cpl_after:
            return None
        rip = machine.reg_read("rip")
        hit = self.symbols.lookup(rip)
        if rip != delivery.handler and (hit is None or rip - hit.offset != delivery.handler):
            return None
        if machine.reg_read("rsp") > delivery.frame_address:
            return None
        try:
            return self.read_trap_frame(
                delivery.frame_address, error_code=delivery.frame.error_code is not None
            )
        except KctxError:
            return None

    def _above(self, frame: int) -> Callable[[], bool]:
        """At the until address: arrived unless a deeper frame (RSP below ``frame``) got there."""
        return lambda: self.machine.reg_read("rsp") >= frame

    def _returned_to(self, frame: TrapFrame) -> Callable[[], bool]:
        """At the frame's RIP: arrived once ``iretq`` restored its CS and RSP."""
        machine = self.machine
        return lambda: machine.reg_read("cs") == frame.cs and machine.reg_read("rsp") == frame.rsp

    # -- the loop --------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.shutdown is not None:
            raise CommandError(f"the machine is shut down: {self.shutdown}")

    def _interrupts_enabled(self) -> bool:
        return bool(self.machine.reg_read("rflags") & RFLAGS.IF)

    def _run(
        self, *, count: int | None = None, timeout: float | None = None,
        until: int | None = None, arrived: Callable[[], bool] | None = None,
        delivery_steps: bool = False,
    ) -> TrapEvent:  # fmt: skip
        """The loop of every command. ``arrived`` tells whether reaching ``until`` ends
        the run; ``delivery_steps``: delivering a pending trap uses one of ``count``."""
        self._check_alive()
        if count is not None and count < 0:
            raise CommandError(f"instruction count {count} is negative")
        self._stop_requested.clear()
        self.message = ""
        machine = self.machine
        start, deadline = machine.icount, None if timeout is None else time.monotonic() + timeout
        must_step = False
        # A breakpoint under RIP where the command starts is stepped over (the user is
        # resuming from it); one reached while running (a jump, a delivery) is a hit.
        self._resume_at = machine.reg_read("rip")
        if self.pending_trap is not None:
            trap, self.pending_trap = self.pending_trap, None
            stopped = self._deliver(trap, announced=True)
            if stopped is not None:
                return stopped
            if delivery_steps and count is not None:
                count -= 1
            start = machine.icount  # a faulting int n's delivery un-retires it
        while True:
            done = machine.icount - start
            if count is not None and done >= count:
                return self._stop(StopKind.BUDGET)
            if self._stop_requested.is_set():
                return self._stop(StopKind.USER_STOP)
            remaining_time = None if deadline is None else deadline - time.monotonic()
            if remaining_time is not None and remaining_time <= 0:
                return self._stop(StopKind.TIMEOUT)
            budget = None if count is None else count - done
            rip = machine.reg_read("rip")
            stepping = must_step or bool(self.pending_interrupts)
            if self.pending_interrupts and self._interrupts_enabled() and not self._shadow:
                trap = Trap(self.pending_interrupts.pop(), TrapSource.EXTERNAL, rip)
                stopped = self._deliver(trap, announced=False)
                if stopped is not None:
                    return stopped
                continue
            if stepping and until is not None and rip == until and not must_step:
                if arrived is None or arrived():
                    return self._stop(StopKind.UNTIL)
                must_step = True  # a deeper frame reached the address: keep going
            phys = self.breakpoints.phys_at(rip) if rip == self._resume_at else None
            self._resume_at = None
            if stepping or phys is not None:
                self._shadow = bool(self.pending_interrupts) and self._at_sti(rip)
                event = self._step(rip, phys)
                must_step = False
            else:
                phys, self._shadow = None, False
                event = machine.run(until=until, count=budget, timeout=remaining_time)
            self.last_stop = event
            if event.kind is StopKind.UNTIL and arrived is not None:
                if not arrived():
                    must_step = True  # a deeper frame reached the address: keep going
                    continue
            stopped = self._handle(event, lifted=phys)
            if stopped is not None:
                return stopped

    def _at_sti(self, rip: int) -> bool:
        try:
            return self.read_virtual(rip, 1) == bytes([STI]) and not self._interrupts_enabled()
        except KctxError:
            return False

    def _step(self, rip: int, phys: int | None) -> StopEvent:
        """One instruction; a breakpoint under RIP is lifted for it and re-armed after."""
        if phys is None:
            return self.machine.step(1)
        self.breakpoints.lift(phys, rip)
        try:
            return self.machine.step(1)
        finally:
            self.breakpoints.rearm(phys, rip)

    def _handle(self, event: StopEvent, lifted: int | None = None) -> TrapEvent | None:
        """The event to stop with, or None to keep running.

        ``lifted``: the breakpoint byte the event's instruction ran with its original
        byte (an int3 of the guest's own under our breakpoint traps as the guest's).
        """
        kind = event.kind
        hits = self.watchpoints.take_hits()
        if kind is StopKind.HOOK:
            return self._watch_stop(hits)
        if kind is StopKind.BREAKPOINT and event.pc is not None:
            phys = self.breakpoints.phys_at(event.pc)
            if phys is not None and phys != lifted:
                return self._breakpoint(event.pc, phys)
        if kind in (StopKind.BREAKPOINT, StopKind.EXCEPTION):
            return self._raise(trap_from_stop(self.machine, event))
        if kind is StopKind.SYSCALL:
            return self._syscall(event)
        if kind is StopKind.BUDGET:
            return None  # the loop decides: the budget may be ours or a chunk's
        if kind is StopKind.HALT and self.pending_interrupts and self._interrupts_enabled():
            return None  # the interrupt wakes the processor (SDM vol. 2A HLT)
        if kind is StopKind.ERROR:
            self.message = event.message
        return self._stop(kind)

    def _breakpoint(self, pc: int, phys: int) -> TrapEvent | None:
        # Our int3 retired as an instruction: it is not the guest's. RIP back on it.
        self.machine.runner.icount -= 1
        self.machine.reg_write("rip", pc)
        stopping: list[Breakpoint] = []
        for bp in self.breakpoints.at(phys):
            try:
                holds = bp.condition_holds(self.env)
            except CommandError as e:
                self.message = f"breakpoint {bp.number}: condition failed: {e}"
                holds = True
            if holds:
                bp.hits += 1
                stopping.append(bp)
        if not stopping:
            self._resume_at = pc  # the condition was false: go on from here
            return None
        first = stopping[0]
        event = self._emit(TrapKind.BREAKPOINT, name=f"breakpoint {first.number}", rip=pc)
        for bp in stopping:
            if bp.temporary:
                self.breakpoints.delete(bp.number)
        return event

    def _watch_stop(self, hits: list[WatchHit]) -> TrapEvent | None:
        self.watch_hits = hits
        if not hits:
            return None
        events = []
        for hit in hits:
            self.watchpoints.get(hit.watchpoint).hits += 1
            events.append(self._emit(TrapKind.WATCHPOINT, name=describe_watch_hit(hit), rip=hit.pc))
        return events[0]

    def _raise(self, trap: Trap) -> TrapEvent | None:
        """A trap the guest raised: stop with it pending, or deliver it."""
        if self.policy.get(trap.vector) is TrapPolicy.STOP:
            self.pending_trap = trap
            self.message = f"{trap.name} pending: the next command delivers it"
            return self._trap_event(trap, self._capture(), None)
        return self._deliver(trap, announced=False)

    def _syscall(self, event: StopEvent) -> TrapEvent | None:
        pc = event.pc if event.pc is not None else event.rip
        self.machine.reg_write("rip", pc)  # Unicorn stepped over it; the state is at it
        before = self._capture()
        try:
            result = do_syscall(self.machine, pc)
        except DeliveryError as e:
            self.message = str(e)
            return self._stop(StopKind.ERROR)
        if isinstance(result, Trap):
            self.machine.runner.icount -= 1  # a faulting syscall did not retire
            return self._raise(result)
        self.last_syscall = result
        self._emit(TrapKind.SYSCALL, name="syscall", rip=pc, handler=result.handler, ctx=before)
        return None

    def _deliver(self, trap: Trap, *, announced: bool) -> TrapEvent | None:
        """Deliver through the IDT; a stop event if that ended the run."""
        before = self._capture()
        try:
            result = deliver(self.machine, trap)
        except DeliveryError as e:
            self.message = f"cannot deliver {trap.name}: {e}"
            return self._stop(StopKind.ERROR)
        chain = result.chain
        if trap.source is TrapSource.SOFTWARE and len(chain) > 1:
            # int n / int3 whose delivery faulted is itself a fault: it did not retire.
            self.machine.runner.icount -= 1
        undelivered = chain if isinstance(result, TripleFault) else chain[:-1]
        for raised in undelivered[1 if announced else 0 :]:
            self._trap_event(raised, before, None)
        if isinstance(result, TripleFault):
            self.shutdown = result
            self.message = str(result)
            return self._emit(TrapKind.STOP, name="triple fault", rip=trap.fault_rip, ctx=before)
        self.last_delivery = result
        self._trap_event(result.trap, before, result.handler)
        return None

    # -- events ----------------------------------------------------------------------------

    def _capture(self) -> tuple[dict[str, int], int, int]:
        machine = self.machine
        regs = {name: machine.reg_read(name) for name in EVENT_REGISTERS}
        return regs, machine.reg_read("cs"), machine.cpl

    def _trap_event(
        self, trap: Trap, ctx: tuple[dict[str, int], int, int], handler: int | None
    ) -> TrapEvent:
        kind = (
            TrapKind.INTERRUPT
            if trap.source in (TrapSource.EXTERNAL, TrapSource.NMI)
            else TrapKind.EXCEPTION
        )
        return self._emit(
            kind, vector=trap.vector, name=trap.name, error_code=trap.error_code,
            cr2=trap.cr2, rip=trap.fault_rip, handler=handler, ctx=ctx,
        )  # fmt: skip

    def _stop(self, kind: StopKind) -> TrapEvent:
        return self._emit(TrapKind.STOP, name=kind.value)

    def _symbol(self, address: int | None) -> str | None:
        if address is None:
            return None
        hit = self.symbols.lookup(address)
        return str(hit) if hit is not None else None

    def _emit(
        self, kind: TrapKind, *, name: str, rip: int | None = None, vector: int | None = None,
        error_code: int | None = None, cr2: int | None = None, handler: int | None = None,
        ctx: tuple[dict[str, int], int, int] | None = None,
    ) -> TrapEvent:  # fmt: skip
        regs, cs, cpl = ctx if ctx is not None else self._capture()
        event = TrapEvent(
            seq=len(self.trap_log),
            icount=self.machine.icount,
            kind=kind,
            vector=vector,
            name=name,
            error_code=error_code,
            cr2=cr2,
            rip=regs["rip"] if rip is None else rip,
            cs=cs,
            cpl=cpl,
            handler=handler,
            handler_symbol=self._symbol(handler),
            regs=regs,
        )
        self.trap_log.append(event)
        for callback in self.on_event:
            callback(event)
        return event
