"""Injecting events and redirecting IDT gates.

:func:`injected_trap` turns a request (``inject VECTOR [--error N] [--cr2 A]``) into a
:class:`~.exceptions.Trap` at the current instruction boundary: vector 2 is an NMI,
0-31 an exception (with the error code its vector pushes, 0 unless given; CR2 for a
#PF), 32-255 a maskable external interrupt. A maskable interrupt waits in
:class:`PendingInterrupts` while RFLAGS.IF is clear (SDM vol. 3A 6.8.1), and for one
instruction after ``sti`` (the STI interrupt shadow, SDM vol. 2B STI).

:func:`redirect_gate` rewrites one gate of the guest's IDT in memory (``idt set VECTOR
HANDLER``), e.g. to send #BP to a debugger stub.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from kctx_debug.arch.descriptors import IdtGate, SystemDescriptorType
from kctx_debug.arch.vectors import FIRST_USER_VECTOR, NUM_VECTORS, Vector, pushes_error_code
from kctx_debug.emulator.privilege import star_selectors
from kctx_debug.errors import CommandError

from .delivery import TrapMachine, read_gate, write_gate
from .exceptions import Trap, TrapSource

__all__ = [
    "STI",
    "PendingInterrupts",
    "injected_trap",
    "redirect_gate",
]

STI = 0xFB  # SDM vol. 2B STI: interrupts are recognized after the *next* instruction
_ERROR_CODE_MAX = 0xFFFF_FFFF
_ADDRESS_MAX = (1 << 64) - 1


def injected_trap(
    vector: int, rip: int, error_code: int | None = None, cr2: int | None = None
) -> Trap:
    """The event ``inject`` delivers at ``rip``.

    :raises CommandError: a vector outside 0-255, an error code for a vector that
        pushes none (or out of range), or CR2 for anything but #PF.
    """
    if not isinstance(vector, int) or not 0 <= vector < NUM_VECTORS:
        raise CommandError(f"vector {vector!r} is outside 0-255")
    if cr2 is not None and (vector != Vector.PF or not 0 <= cr2 <= _ADDRESS_MAX):
        raise CommandError("--cr2 applies to #PF (vector 14) only, with a 64-bit address")
    if error_code is not None:
        if not pushes_error_code(vector):
            raise CommandError(f"vector {vector:#x} pushes no error code")
        if not 0 <= error_code <= _ERROR_CODE_MAX:
            raise CommandError(f"error code {error_code:#x} does not fit in 32 bits")
    if vector == Vector.NMI:
        return Trap(vector, TrapSource.NMI, rip)
    if vector >= FIRST_USER_VECTOR:
        return Trap(vector, TrapSource.EXTERNAL, rip)
    code = (error_code or 0) if pushes_error_code(vector) else None
    return Trap(vector, TrapSource.FAULT, rip, error_code=code, cr2=cr2)


class PendingInterrupts:
    """Maskable interrupts waiting for RFLAGS.IF, delivered first in, first out."""

    def __init__(self) -> None:
        self._queue: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def push(self, vector: int) -> None:
        self._queue.append(vector)

    def pop(self) -> int:
        return self._queue.popleft()

    def vectors(self) -> tuple[int, ...]:
        return tuple(self._queue)

    def clear(self) -> None:
        self._queue.clear()


def redirect_gate(
    machine: TrapMachine, vector: int, handler: int, *, selector: int | None = None
) -> IdtGate:
    """Point IDT gate ``vector`` at ``handler`` (in guest memory); the new gate.

    The gate keeps its type, DPL and IST; a gate that was not present or not a valid
    64-bit gate becomes a present interrupt gate. Its selector is ``selector`` if
    given, else the gate's own, else SYSCALL's kernel CS from IA32_STAR.

    :raises CommandError: the vector is outside the IDT or the handler is not canonical.
    """
    if not machine.paging_mode.is_canonical(handler):
        raise CommandError(f"handler {handler:#x} is not a canonical address")
    old = read_gate(machine, vector)
    gate = replace(old, offset=handler, p=True)
    if not old.is_valid_64bit_type:
        gate = replace(gate, type=SystemDescriptorType.INTERRUPT_GATE, reserved=0)
    if selector is None and not old.selector:
        selector = star_selectors(machine.reg_read("star")).kernel_cs
    if selector is not None:
        gate = replace(gate, selector=selector)
    write_gate(machine, vector, gate)
    return gate
