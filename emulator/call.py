"""Call a guest function from Python with the System V AMD64 calling convention.

>>> call(machine, module.symbols.address("crc32"), buffer_va, 4)       # doctest: +SKIP
3421780262

How a call is made (x86-64 psABI v1.0, 3.2): the first six integer arguments go in
``rdi rsi rdx rcx r8 r9``, the rest on the stack above the return address, and
``rsp + 8`` is a multiple of 16 at the function's first instruction. RFLAGS.DF is
cleared and ``al`` (the count of vector registers a variadic callee may read) is 0.

The return address is a *stop address*: by default the machine's current RIP, which is
mapped code in any snapshot taken while the kernel ran. The machine runs until RIP is
back there with the stack popped (``rsp`` one slot above the return address), so a
callee that passes through the caller's RIP itself does not end the call early.
Afterwards every general register, RIP and RFLAGS are restored; memory the callee
wrote (and the frame below the caller's stack pointer) stays written. The callee runs
at the machine's current privilege level and with its current CR3.

.. _call failures:

Failures
--------
:class:`CallError`, raised after the caller's registers are restored: an argument that is
not a 64-bit integer, a stack that cannot be written, or a callee that did not return
(a fault, a breakpoint, the instruction budget ran out). For the last case ``event`` is
the machine's stop event and ``registers`` the general registers at the stop.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..arch.bits import RFLAGS
from ..errors import KctxError
from ..snapshot import GENERAL_REGISTERS

__all__ = [
    "ARGUMENT_REGISTERS",
    "DEFAULT_MAX_INSTRUCTIONS",
    "STACK_ALIGNMENT",
    "CallError",
    "CallFrame",
    "call",
    "plan_call",
]

# psABI 3.2.3 "Parameter Passing": INTEGER class arguments, in order.
ARGUMENT_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
# psABI 3.2.2 "The Stack Frame": rsp + 8 is a multiple of 16 when control enters a function.
STACK_ALIGNMENT = 16
DEFAULT_MAX_INSTRUCTIONS = 50_000_000
_SLOT = 8
_U64 = (1 << 64) - 1
# A callee re-entering the caller's RIP (recursion through it) is stepped past; bound it.
_MAX_REENTRIES = 1000


class _Machine(Protocol):
    def reg_read(self, name: str) -> int: ...
    def reg_write(self, name: str, value: int) -> None: ...
    def write_virtual(self, va: int, data: bytes) -> None: ...
    def run(
        self, until: int | None = None, count: int | None = None, timeout: float | None = None
    ) -> object: ...


class CallError(KctxError):
    """A guest call could not be made or did not return; see the :ref:`call failures`."""

    def __init__(
        self,
        message: str,
        *,
        event: object | None = None,
        registers: Mapping[str, int] | None = None,
    ) -> None:
        self.event = event
        self.registers = dict(registers or {})
        super().__init__(message)


@dataclass(frozen=True)
class CallFrame:
    """Where a call's state goes: register values, the entry ``rsp`` and the stack bytes.

    ``stack`` is written at ``rsp``: the return address, then the stack arguments.
    """

    function: int
    return_address: int
    rsp: int
    registers: dict[str, int] = field(default_factory=dict)
    stack: bytes = b""


def _to_u64(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CallError(f"{what} must be an integer, got {type(value).__name__}")
    if not -(1 << 63) <= value <= _U64:
        raise CallError(f"{what} {value:#x} does not fit in 64 bits")
    return value & _U64


def plan_call(
    function: int, args: tuple[int, ...], *, stack_top: int, return_address: int
) -> CallFrame:
    """Lay out a System V AMD64 call without touching a machine (pure).

    :param stack_top: the lowest byte of the caller's stack still in use (its ``rsp``);
        the frame goes below it.
    :raises CallError: an argument or address is not a 64-bit integer, or the frame
        would wrap below address 0.
    """
    function = _to_u64(function, "function address")
    return_address = _to_u64(return_address, "return address")
    stack_top = _to_u64(stack_top, "stack")
    values = [_to_u64(a, f"argument {i + 1}") for i, a in enumerate(args)]
    in_registers = values[: len(ARGUMENT_REGISTERS)]
    on_stack = values[len(ARGUMENT_REGISTERS) :]
    # The stack arguments start on a 16-byte boundary; the return address sits just below.
    args_base = (stack_top - _SLOT * len(on_stack)) // STACK_ALIGNMENT * STACK_ALIGNMENT
    rsp = args_base - _SLOT
    if rsp < 0:
        raise CallError(f"stack at {stack_top:#x} is too low for a call frame")
    registers = dict(zip(ARGUMENT_REGISTERS, in_registers, strict=False))
    registers.update(rax=0, rsp=rsp, rip=function)
    stack = struct.pack(f"<{1 + len(on_stack)}Q", return_address, *on_stack)
    return CallFrame(function, return_address, rsp, registers, stack)


def call(
    machine: _Machine,
    function: int,
    *args: int,
    stack: int | None = None,
    return_address: int | None = None,
    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS,
    timeout: float | None = None,
) -> int:
    """Call ``function(*args)`` on ``machine`` and return ``rax``.

    :param machine: a :class:`~kctx_debug.emulator.machine.Machine` (anything with
        ``reg_read``, ``reg_write``, ``write_virtual`` and ``run(until, count, timeout)``).
    :param args: integer arguments; negative values are passed in two's complement.
    :param stack: the stack pointer to build the frame below (default: the current ``rsp``).
    :param return_address: where the callee returns to and the machine stops (default: the
        current RIP); it should be mapped code.
    :param max_instructions: instruction budget for the callee.
    :return: ``rax`` as an unsigned 64-bit value (mask it for narrower return types).
    :raises CallError: see the :ref:`call failures`.
    """
    saved = {name: machine.reg_read(name) for name in GENERAL_REGISTERS}
    frame = plan_call(
        function,
        args,
        stack_top=saved["rsp"] if stack is None else stack,
        return_address=saved["rip"] if return_address is None else return_address,
    )
    try:
        try:
            machine.write_virtual(frame.rsp, frame.stack)
        except KctxError as exc:
            raise CallError(f"cannot write the call frame at {frame.rsp:#x}: {exc}") from exc
        for name, value in frame.registers.items():
            machine.reg_write(name, value)
        machine.reg_write("rflags", saved["rflags"] & ~int(RFLAGS.DF))
        _run_until_return(machine, frame, max_instructions, timeout)
        return machine.reg_read("rax")
    finally:
        for name, value in saved.items():
            machine.reg_write(name, value)


def _run_until_return(
    machine: _Machine, frame: CallFrame, max_instructions: int, timeout: float | None
) -> None:
    popped = frame.rsp + _SLOT
    for _ in range(_MAX_REENTRIES):
        event = machine.run(until=frame.return_address, count=max_instructions, timeout=timeout)
        rip, rsp = machine.reg_read("rip"), machine.reg_read("rsp")
        if rip != frame.return_address:
            break
        if rsp == popped:
            return
        # The callee reached the stop address in a deeper frame: step over it and go on.
        event = machine.run(count=1, timeout=timeout)
    registers = {name: machine.reg_read(name) for name in GENERAL_REGISTERS}
    raise CallError(
        f"call to {frame.function:#x} did not return to {frame.return_address:#x}: "
        f"stopped at {registers['rip']:#x} ({event})",
        event=event,
        registers=registers,
    )
