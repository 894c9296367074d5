"""SYSCALL, executed as SDM vol. 2B "SYSCALL—Fast System Call" says.

Unicorn's ``syscall`` is a stub: it calls a hook and steps over the instruction (the
machine stops there as :attr:`~kctx_debug.emulator.control.StopKind.SYSCALL`). This
module does the rest:

- #UD unless IA32_EFER.SCE and IA32_EFER.LMA are set (and CS.L, always true here);
- RCX <- the next instruction's RIP, R11 <- RFLAGS, RFLAGS <- RFLAGS AND NOT(IA32_FMASK);
- CS <- IA32_STAR[47:32] AND FFFCH, SS <- IA32_STAR[47:32] + 8, CPL 0; RSP unchanged;
- RIP <- IA32_LSTAR.

The hardware loads fixed flat descriptors into the CS/SS caches; the machine loads the
guest's GDT descriptors for those selectors when they are flat 64-bit code and data
(a flat one otherwise), which is the same for any sane GDT. ``sysretq`` is executed
natively by Unicorn (QEMU's implementation), as is ``swapgs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kctx_debug.arch.bits import EFER, RFLAGS
from kctx_debug.arch.vectors import Vector
from kctx_debug.emulator.privilege import star_selectors
from kctx_debug.errors import KctxError

from .delivery import DeliveryError
from .exceptions import Trap, TrapSource

__all__ = ["SYSCALL_LENGTH", "SyscallEntry", "describe_syscall", "do_syscall"]

SYSCALL_LENGTH = 2  # 0F 05
_SYSENTER = bytes.fromhex("0f34")
_CS_SELECTOR_MASK = 0xFFFC  # "IA32_STAR[47:32] AND FFFCH": RPL forced to 0


@dataclass(frozen=True)
class SyscallEntry:
    """What one SYSCALL did."""

    pc: int  # the syscall instruction
    rcx: int  # the return RIP saved
    r11: int  # the RFLAGS saved
    handler: int  # IA32_LSTAR
    cs: int
    ss: int
    rflags: int  # after masking with IA32_FMASK
    cpl_before: int


class _MachineView(Protocol):
    @property
    def cpl(self) -> int: ...
    def read_virtual(self, va: int, size: int) -> bytes: ...
    def reg_read(self, name: str) -> int: ...
    def reg_write(self, name: str, value: int) -> None: ...
    def enter_ring0(self, rip: int, rsp: int, *, cs=None, ss=None, rflags=None) -> None: ...


def do_syscall(machine: _MachineView, pc: int) -> SyscallEntry | Trap:
    """Execute the SYSCALL at ``pc`` on ``machine``; a #UD :class:`Trap` if it faults.

    Nothing is changed when the result is a trap.

    :raises DeliveryError: the instruction is SYSENTER (not emulated) or CS/SS cannot
        be loaded (a STAR with RPL bits in the SS selector).
    """
    try:
        code = machine.read_virtual(pc, SYSCALL_LENGTH)
    except KctxError:
        code = b""
    if code == _SYSENTER:
        raise DeliveryError(f"sysenter at {pc:#x} is not emulated")
    efer = machine.reg_read("efer")
    if not (efer & EFER.SCE and efer & EFER.LMA):
        return Trap(Vector.UD, TrapSource.FAULT, pc, pc=pc)
    rflags = machine.reg_read("rflags")
    # IA32_STAR[47:32] (SDM vol. 3A 5.8.8); a zero STAR falls back to Linux's 0x10.
    selectors = star_selectors(machine.reg_read("star"))
    cs, ss = selectors.kernel_cs & _CS_SELECTOR_MASK, selectors.kernel_ss
    new_flags = int((rflags & ~machine.reg_read("sfmask")) | RFLAGS.FIXED)
    entry = SyscallEntry(
        pc=pc,
        rcx=pc + SYSCALL_LENGTH,
        r11=rflags,
        handler=machine.reg_read("lstar"),
        cs=cs,
        ss=ss,
        rflags=new_flags,
        cpl_before=machine.cpl,
    )
    if ss & 3:
        raise DeliveryError(f"IA32_STAR gives SYSCALL an SS selector {ss:#x} with RPL != 0")
    machine.reg_write("rcx", entry.rcx)
    machine.reg_write("r11", entry.r11)
    try:
        machine.enter_ring0(entry.handler, machine.reg_read("rsp"), cs=cs, ss=ss, rflags=new_flags)
    except KctxError as e:
        raise DeliveryError(f"syscall at {pc:#x}: {e}") from None
    return entry


def describe_syscall(entry: SyscallEntry) -> str:
    """``syscall at 0x401010 -> 0xffffffff81000040 (rcx=0x401012 r11=0x202)``."""
    return (
        f"syscall at {entry.pc:#x} -> {entry.handler:#x} "
        f"(rcx={entry.rcx:#x} r11={entry.r11:#x} cs={entry.cs:#x} ss={entry.ss:#x})"
    )
