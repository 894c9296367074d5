"""What the REPL inspects: the snapshot as loaded, or the machine once it has been built.

Both targets offer the same reads (registers by name, a :class:`~kctx_debug.snapshot.CpuState`
of the current state, virtual and physical memory, page walks) so inspection commands
need not care whether anything has run. Physical addresses of a :class:`MachineTarget`
are the machine's; they equal the snapshot's unless the machine report lists
relocations (ranges above 2**40).

Unicorn does not expose the hidden part (base, limit, attributes) of CS..GS, so a
machine's segment registers show the descriptor their selector names in the current
GDT, and FS/GS the base MSRs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from ..arch.descriptors import SegmentDescriptor, Selector
from ..arch.registers import RegisterGroup, lookup_register
from ..errors import CommandError, KctxError
from ..pagetables.context import KernelContext
from ..pagetables.entry import PagingMode
from ..pagetables.walk import Access, CpuPagingState, WalkResult
from ..qemu_dump import access_rights
from ..snapshot import KNOWN_MSRS, SEGMENT_REGISTERS, CpuState, Segment, TableRegister

if TYPE_CHECKING:
    from ..emulator.machine import Machine

__all__ = ["MachineTarget", "SnapshotTarget", "Target", "machine_cpu_state"]

# A descriptor's high dword holds the attribute bits QEMU keeps (type..P, AVL..G).
_HIGH_DWORD_SHIFT = 32
_SEGMENT_FLAG_BITS = 0x00F0FF00


class Target(Protocol):
    """The state commands read and write (see the module docstring)."""

    kind: str

    @property
    def cpu(self) -> CpuState: ...
    @property
    def mem(self) -> Any: ...
    @property
    def paging(self) -> CpuPagingState: ...
    @property
    def mode(self) -> PagingMode: ...
    @property
    def cpl(self) -> int: ...
    def reg(self, name: str) -> int: ...
    def translate(self, va: int, access: Access | None = None) -> WalkResult: ...
    def virt_to_phys(self, va: int, access: Access | None = None) -> int: ...
    def read_virtual(self, va: int, size: int) -> bytes: ...
    def write_virtual(self, va: int, data: bytes) -> None: ...
    def read_physical(self, address: int, size: int) -> bytes: ...
    def write_physical(self, address: int, data: bytes) -> None: ...


def _snapshot_reg(cpu: CpuState, name: str) -> int:
    reg = lookup_register(name)
    parent = reg.parent
    if parent in SEGMENT_REGISTERS:
        seg = cpu.segments.get(parent)
        return seg.selector if seg else 0
    if parent in ("gdtr", "idtr"):
        table = cpu.gdtr if parent == "gdtr" else cpu.idtr
        return table.limit | table.base << 16
    if parent in ("tr", "ldtr"):
        return getattr(cpu, parent).selector
    if reg.group is RegisterGroup.SPECIAL and parent != "pkru":
        raise CommandError(f"${name} is not recorded in a snapshot")
    return reg.extract(cpu.reg(parent))


class SnapshotTarget:
    """The snapshot's state: registers as recorded, memory with the build section applied."""

    kind = "snapshot"

    def __init__(self, ctx: KernelContext) -> None:
        self.context = ctx

    @property
    def cpu(self) -> CpuState:
        return self.context.cpu

    @property
    def mem(self) -> Any:
        return self.context.mem

    @property
    def paging(self) -> CpuPagingState:
        return self.context.paging

    @property
    def mode(self) -> PagingMode:
        return self.context.mode

    @property
    def cpl(self) -> int:
        return self.context.cpu.cpl

    def reg(self, name: str) -> int:
        """A register by name, partial ones included.

        :raises CommandError: unknown name, or one a snapshot does not record (xcr0).
        """
        return _snapshot_reg(self.context.cpu, name)

    def translate(self, va: int, access: Access | None = None) -> WalkResult:
        return self.context.translate(va, access)

    def virt_to_phys(self, va: int, access: Access | None = None) -> int:
        return self.context.virt_to_phys(va, access)

    def read_virtual(self, va: int, size: int) -> bytes:
        return self.context.read_virtual(va, size)

    def write_virtual(self, va: int, data: bytes) -> None:
        self.context.write_virtual(va, data)

    def read_physical(self, address: int, size: int) -> bytes:
        return self.context.mem.read(address, size)

    def write_physical(self, address: int, data: bytes) -> None:
        self.context.mem.write(address, data)


class MachineTarget:
    """The machine's current state; reads go through ``read_virtual`` (the debugger's,
    which shows the original bytes under breakpoints) when one is given, and physical
    reads show ``originals()`` (patched physical byte -> the guest's byte)."""

    kind = "machine"

    def __init__(
        self,
        machine: Machine,
        read_virtual: Callable[[int, int], bytes] | None = None,
        originals: Callable[[], dict[int, int]] | None = None,
    ) -> None:
        self.machine = machine
        self._read_virtual = read_virtual or machine.read_virtual
        self._originals = originals

    @property
    def cpu(self) -> CpuState:
        return machine_cpu_state(self.machine, self._read_virtual)

    @property
    def mem(self) -> Any:
        return self.machine.memory

    @property
    def paging(self) -> CpuPagingState:
        return self.machine.paging

    @property
    def mode(self) -> PagingMode:
        return self.machine.paging_mode

    @property
    def cpl(self) -> int:
        return self.machine.cpl

    def reg(self, name: str) -> int:
        return self.machine.reg_read(name)

    def translate(self, va: int, access: Access | None = None) -> WalkResult:
        return self.machine.translate(va, access)

    def virt_to_phys(self, va: int, access: Access | None = None) -> int:
        return self.machine.virt_to_phys(va, access)

    def read_virtual(self, va: int, size: int) -> bytes:
        return self._read_virtual(va, size)

    def write_virtual(self, va: int, data: bytes) -> None:
        self.machine.write_virtual(va, data)

    def read_physical(self, address: int, size: int) -> bytes:
        """Machine-physical bytes, breakpoints' int3 replaced by the guest's own bytes."""
        data = self.machine.read_physical(address, size)
        patched = self._originals() if self._originals is not None else {}
        if not any(address <= phys < address + size for phys in patched):
            return data
        out = bytearray(data)
        for phys, byte in patched.items():
            if address <= phys < address + size:
                out[phys - address] = byte
        return bytes(out)

    def write_physical(self, address: int, data: bytes) -> None:
        self.machine.write_physical(address, data)


def _hidden_part(
    read_virtual: Callable[[int, int], bytes], gdtr: TableRegister, selector: int
) -> Segment:
    """The segment a selector loads from the GDT (selector only when it cannot be read)."""
    sel = Selector.from_int(selector)
    if sel.is_null or sel.ti or sel.table_offset + 7 > gdtr.limit:
        return Segment(selector)
    try:
        desc = SegmentDescriptor.from_bytes(read_virtual(gdtr.base + sel.table_offset, 8))
    except KctxError:
        return Segment(selector)
    flags = (desc.raw >> _HIGH_DWORD_SHIFT) & _SEGMENT_FLAG_BITS
    return Segment(selector, desc.base, desc.effective_limit, access_rights(flags))


def machine_cpu_state(
    machine: Machine, read_virtual: Callable[[int, int], bytes] | None = None
) -> CpuState:
    """The machine's registers as a snapshot :class:`CpuState` (what ``save`` writes).

    MSRs the snapshot recorded or that are non-zero are kept; segment registers get
    their hidden part from the current GDT (FS/GS bases from the MSRs).
    """
    read = machine.reg_read
    snap = machine.context.cpu
    regs = machine.registers()
    msrs: dict[str, int] = {}
    for name in KNOWN_MSRS:
        try:
            value = read(name)
        except KctxError:
            continue
        if value or name in snap.msrs:
            msrs[name] = value
    gdt = machine.table_register("gdtr")
    idt = machine.table_register("idtr")
    gdtr = TableRegister(gdt.base or 0, gdt.limit or 0)
    reader = read_virtual or machine.read_virtual
    segments: dict[str, Segment] = {}
    for name in SEGMENT_REGISTERS:
        seg = _hidden_part(reader, gdtr, read(name))
        if name in ("fs", "gs"):
            seg = replace(seg, base=msrs.get(f"{name}_base", 0))
        segments[name] = seg
    return CpuState(
        regs=regs,
        cr0=read("cr0"),
        cr3=read("cr3"),
        cr4=read("cr4"),
        cr2=read("cr2"),
        cr8=read("cr8"),
        msrs=msrs,
        segments=segments,
        gdtr=gdtr,
        idtr=TableRegister(idt.base or 0, idt.limit or 0),
        tr=machine.table_register("tr"),
        ldtr=machine.table_register("ldtr"),
    )
