"""A Unicorn machine in kernel context, built from a snapshot.

>>> machine = Machine.from_context(ctx)                          # doctest: +SKIP
>>> machine.run(count=1000)                                     # doctest: +SKIP
StopEvent(kind=<StopKind.BUDGET: 'budget'>, rip=..., icount=1000, executed=1000, ...)

Building (:meth:`Machine.from_context`): the snapshot's physical memory is mapped
into Unicorn over the same host buffers (``mem_map_ptr``, no copy, largest first:
see :func:`.engine.map_host_ranges`; ranges above Unicorn's 40-bit limit are moved,
see :mod:`.relocate`), then CR3/CR4/EFER/CR0,
CR2, CR8, the MSRs, PKRU, GDTR/IDTR/TR/LDTR, the segment registers and the general
registers are loaded, paging on, so code runs at the snapshot's virtual addresses.

Privilege: writing CS with ``reg_write`` changes the selector, not the CPL. CS and
SS (with their hidden parts) are loaded by a real ``iretq`` run in a private
trampoline: a page of code, stack and GDT in private physical memory, reached
through private page tables that CR3 points to for that one instruction. The GDT
holds descriptors made from the snapshot's cached segment attributes. A context
saved at CPL0 right after building is the template :meth:`Machine.enter_ring0`
restores (iretq cannot raise the privilege level); :meth:`Machine.enter_ring3` is
an ``iretq``.

What Unicorn cannot represent is listed in :attr:`Machine.report` when the machine
is built (a register it does not keep, PKRU without CR4.PKE, counting without the
native counter …), never discovered later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_MEM_WRITE,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from ..arch.bits import CR0, CR4, EFER, RFLAGS
from ..arch.descriptors import SegmentDescriptor, Selector
from ..arch.registers import MSR, lookup_register
from ..errors import CommandError
from ..pagetables.context import KernelContext, TranslationFault
from ..pagetables.entry import ADDRESS_MASK, PagingMode, paging_mode
from ..pagetables.walk import Access, AccessKind, CpuPagingState, WalkResult, translate
from ..physmem import PAGE_SIZE
from ..snapshot import GENERAL_REGISTERS, Segment
from .carry import CarriedState
from .control import Runner, StopEvent
from .engine import EmulatorError, map_host_ranges, probe_engine_layout
from .privilege import (
    DATA_SEGMENTS,
    TRAMPOLINE_PAGES,
    PageReader,
    Trampoline,
    descriptor_from_attributes,
    flat_descriptor,
    guest_descriptor,
    star_selectors,
)
from .registers import (
    MSR_REGISTER,
    TABLE_REGISTERS,
    UC_REGISTER_IDS,
    read_register,
    segment_attributes,
    segment_flags,
    write_register,
)
from .relocate import (
    UNICORN_PHYS_BITS,
    AddressSpace,
    EntryChange,
    Relocations,
    TableWatch,
    build_address_space,
    describe_relocations,
)

__all__ = ["DEFAULT_CPU_MODEL", "Machine", "MachineReport", "MemoryCallback", "describe_report"]

MemoryCallback = Callable[[AccessKind, int, int, int, int], None]
"""``callback(kind, phys, size, value, pc)`` for :meth:`Machine.hook_memory`: READ or
WRITE, the machine-physical address and size, the value written (0 for a read, which
has not happened yet), and the RIP of the accessing instruction."""

# Skylake-Server: SMEP, SMAP and PKU in CPUID (tests/test_walk_unicorn_diff.py).
DEFAULT_CPU_MODEL = x86.UC_CPU_X86_SKYLAKE_SERVER
# A busy 64-bit TSS, present (SDM vol. 3A Table 3-2); an LDT, present.
_TR_DEFAULT_AR, _LDTR_DEFAULT_AR = 0x8B, 0x82
# MSRs a snapshot carries and Unicorn is given, besides EFER and the FS/GS bases.
_PLAIN_MSRS = ("star", "lstar", "cstar", "sfmask", "kernel_gs_base", "tsc_aux", "pat")


@dataclass(frozen=True)
class MachineReport:
    """How the snapshot was mapped into Unicorn and what could not be represented."""

    cpu_model: int
    windows: tuple[tuple[int, int, str], ...]  # machine-physical base, size, what
    relocations: Relocations
    native_counter: bool
    warnings: tuple[str, ...]
    notes: tuple[str, ...]

    def __str__(self) -> str:
        return describe_report(self)


def describe_report(report: MachineReport) -> str:
    """Several lines: memory windows, counting, relocations, notes and warnings."""
    lines = [f"{base:#014x}-{base + size:#014x} {what}" for base, size, what in report.windows]
    lines.append(
        "instruction counts: Unicorn's counter"
        if report.native_counter
        else "instruction counts: a Python hook per instruction (slow)"
    )
    if report.relocations:
        lines.append(describe_relocations(report.relocations))
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


class Machine:
    """A Unicorn engine running a snapshot's kernel context; build with :meth:`from_context`."""

    def __init__(
        self,
        ctx: KernelContext,
        uc: Uc,
        space: AddressSpace,
        keepalive: list,
    ) -> None:
        self.context = ctx
        self.uc = uc
        self.memory = space.memory
        self.relocations = space.relocations
        self._keepalive = keepalive
        self._mode = paging_mode(bool(ctx.cpu.cr4 & CR4.LA57))
        self._layout = probe_engine_layout()
        self._runner = Runner(uc, self, self._layout)
        self._trampoline = Trampoline(
            uc, self._runner, space.private, space.private_base, self._mode, self.translate
        )
        self._warnings: list[str] = []
        self._notes: list[str] = []
        self._pkru_shadow = 0
        self._selectors = star_selectors(ctx.cpu.msrs.get("star", 0))
        self._template0 = None
        self._carried = CarriedState(uc)
        self._watch: TableWatch | None = None
        self.report: MachineReport | None = None

    # -- building ----------------------------------------------------------------------

    @classmethod
    def from_context(cls, ctx: KernelContext, *, cpu_model: int = DEFAULT_CPU_MODEL) -> Machine:
        """Map the context's memory into a new engine and load its CPU state.

        :raises EmulatorError: the state cannot be loaded at all (e.g. CS cannot be entered).
        :raises PageTableError: a range above 2**40 has no room below it.
        """
        mode = paging_mode(bool(ctx.cpu.cr4 & CR4.LA57))
        space = build_address_space(ctx.mem, ctx.cpu.cr3, mode, TRAMPOLINE_PAGES)
        uc = Uc(UC_ARCH_X86, UC_MODE_64, cpu_model)
        keepalive = space.memory.host_ranges()
        map_host_ranges(uc, keepalive)
        machine = cls(ctx, uc, space, [keepalive])
        machine._load_state()
        machine.report = MachineReport(
            cpu_model,
            tuple((w.base, w.size, space.labels[w.base]) for w in space.memory.windows),
            space.relocations,
            machine._runner.exact_native,
            tuple(machine._warnings),
            tuple(machine._notes),
        )
        return machine

    def _warn(self, message: str) -> None:
        self._warnings.append(message)

    def _write_checked(self, name: str, value: int, keep_mask: int = (1 << 64) - 1) -> None:
        write_register(self.uc, name, value)
        got = read_register(self.uc, name)
        if (got ^ value) & keep_mask:
            self._warn(f"{name} = {value:#x} is not kept by Unicorn (reads back {got:#x})")

    def _load_state(self) -> None:
        cpu = self.context.cpu
        if self._runner.exact_native is False:
            self._warn("Unicorn's instruction counter was not found: counting with a Python hook")
        if not self._runner.resets_nested_faults:
            self._warn("a fault after a fault will be reported as #DF (cannot reset Unicorn)")
        cr4, efer, cr0 = cpu.cr4, cpu.efer, cpu.cr0
        for _reg, value, need, flag in (
            ("cr4", cr4, CR4.PAE, "CR4.PAE"),
            ("efer", efer, EFER.LME, "EFER.LME"),
            ("cr0", cr0, CR0.PG | CR0.PE, "CR0.PG/PE"),
        ):
            if value & need != need:
                self._warn(
                    f"{flag} clear in the snapshot: set (Unicorn runs in 64-bit paging mode)"
                )
        self.uc.reg_write(x86.UC_X86_REG_CR3, self.relocations.machine_cr3)
        self._write_checked("cr4", cr4 | CR4.PAE)
        self._write_checked("efer", efer | EFER.LME | EFER.LMA, ~int(EFER.LMA))
        self._write_checked("cr0", cr0 | CR0.PG | CR0.PE)
        self._write_checked("cr2", cpu.cr2)
        self._write_checked("cr8", cpu.cr8)
        for name in _PLAIN_MSRS:
            if name in cpu.msrs:
                self._write_checked(name, cpu.msrs[name])
        pkru = cpu.msrs.get("pkru", 0)
        if cr4 & CR4.PKE:
            self._set_pkru(pkru)
        elif pkru:
            self._warn(f"pkru = {pkru:#x} ignored: CR4.PKE is clear, so WRPKRU cannot set it")
        self.uc.reg_write(x86.UC_X86_REG_GDTR, (0, cpu.gdtr.base, cpu.gdtr.limit, 0))
        self.uc.reg_write(x86.UC_X86_REG_IDTR, (0, cpu.idtr.base, cpu.idtr.limit, 0))
        for name, seg, default in (
            ("tr", cpu.tr, _TR_DEFAULT_AR),
            ("ldtr", cpu.ldtr, _LDTR_DEFAULT_AR),
        ):
            self._load_system_segment(name, seg, default)
        self._load_code_and_stack()
        self._load_data_segments()
        for name in GENERAL_REGISTERS:
            if name not in ("rflags",):
                write_register(self.uc, name, cpu.regs.get(name, 0))
        if cpu.regs.get("rflags", 0) & RFLAGS.VM:
            self._warn("RFLAGS.VM (virtual-8086 mode) cannot be set in 64-bit mode: cleared")
        root = self.relocations.machine_cr3 & ADDRESS_MASK
        self._watch = TableWatch(self.memory, root, self._mode)
        if self._watch.missing:
            self._notes.append(
                "page tables not in the snapshot: "
                + ", ".join(f"{t:#x}" for t in self._watch.missing)
            )
        self._notes.append("syscall/sysenter are not executed by Unicorn: runs stop at them")

    def _load_system_segment(self, name: str, seg: Segment, default_ar: int) -> None:
        attributes = seg.attributes
        if attributes is None and seg.selector:
            attributes = default_ar
            self._notes.append(
                f"{name}: no cached attributes in the snapshot, using {default_ar:#x}"
            )
        self.set_table_register(name, Segment(seg.selector, seg.base, seg.limit, attributes))

    def _snapshot_descriptor(self, reg: str, selector: int, kind: str) -> SegmentDescriptor:
        seg = self.context.cpu.segments.get(reg)
        rpl = Selector.from_int(selector).rpl
        if seg is not None and seg.selector == selector:
            desc = descriptor_from_attributes(seg.attributes)
            if desc is not None:
                return desc
            self._notes.append(f"{reg}: no usable cached attributes, loaded a flat {kind} segment")
        return flat_descriptor(kind, rpl)

    def _load_code_and_stack(self) -> None:
        cpu = self.context.cpu
        kernel = self._selectors
        cs = cpu.segments.get("cs", Segment(kernel.kernel_cs)).selector
        ss = cpu.segments.get("ss", Segment(kernel.kernel_ss)).selector
        rip, rsp = cpu.regs.get("rip", 0), cpu.regs.get("rsp", 0)
        rflags = (cpu.regs.get("rflags", 0) | RFLAGS.FIXED) & ~RFLAGS.VM
        if cpu.cpl != 0:
            code, data = flat_descriptor("code64", 0), flat_descriptor("data", 0)
            self._trampoline.iret(rip, kernel.kernel_cs, rflags, rsp, kernel.kernel_ss, code, data)
            self._template0 = self.uc.context_save()
        cs_desc = self._snapshot_descriptor("cs", cs, "code64")
        ss_desc = self._snapshot_descriptor("ss", ss, "data")
        self._trampoline.iret(rip, cs, rflags, rsp, ss, cs_desc, ss_desc)
        if cpu.cpl == 0:
            self._template0 = self.uc.context_save()

    def _load_data_segments(self, values: dict[str, int] | None = None) -> None:
        cpu = self.context.cpu
        for name in DATA_SEGMENTS:
            seg = cpu.segments.get(name)
            selector = values.get(name, 0) if values is not None else (seg.selector if seg else 0)
            try:
                self.uc.reg_write(UC_REGISTER_IDS[name], selector)
            except UcError as e:
                self._warn(f"{name} = {selector:#x} cannot be loaded ({e}); left null")
                self.uc.reg_write(UC_REGISTER_IDS[name], 0)
        for name in ("fs_base", "gs_base"):
            seg = cpu.segments.get(name[:2])
            default = seg.base if seg is not None and seg.base is not None else 0
            value = values.get(name, 0) if values is not None else cpu.msrs.get(name, default)
            self._write_checked(name, value)

    def _set_pkru(self, value: int) -> None:
        self._trampoline.write_pkru(value)
        self._pkru_shadow = value

    def _get_pkru(self) -> int:
        """PKRU: RDPKRU when CR4.PKE is set (else the last value written, as WRPKRU #UDs)."""
        if not self.uc.reg_read(x86.UC_X86_REG_CR4) & CR4.PKE:
            return self._pkru_shadow
        return self._trampoline.read_pkru()

    # -- privilege --------------------------------------------------------------------------

    @property
    def cpl(self) -> int:
        """The current privilege level: CS.RPL, which this class keeps equal to it."""
        return self.uc.reg_read(x86.UC_X86_REG_CS) & 3

    def enter_ring0(
        self, rip: int, rsp: int, *, cs: int | None = None, ss: int | None = None,
        rflags: int | None = None,
    ) -> None:  # fmt: skip
        """Switch to CPL0 at ``cs:rip`` with ``ss:rsp``, keeping every other register.

        The CPL0 template saved when the machine was built is restored, the rest of the
        current state written back, and CS/SS/RIP/RSP/RFLAGS loaded by iretq. Default
        selectors: the template's.

        :raises EmulatorError: a selector with RPL != 0, or the iretq faults.
        """
        cs = self._template0.reg_read(x86.UC_X86_REG_CS) if cs is None else cs
        ss = self._template0.reg_read(x86.UC_X86_REG_SS) if ss is None else ss
        if cs & 3 or ss & 3:
            raise EmulatorError(f"enter_ring0: selectors {cs:#x}/{ss:#x} must have RPL 0")
        self._switch(rip, cs, rflags, rsp, ss, via_template=True)

    def enter_ring3(
        self, rip: int, rsp: int, *, cs: int | None = None, ss: int | None = None,
        rflags: int | None = None,
    ) -> None:  # fmt: skip
        """Switch to CPL3 at ``cs:rip`` with ``ss:rsp`` by iretq, keeping every other register.

        Default selectors: the snapshot's if it was taken at CPL3, else SYSRET's from
        IA32_STAR, else Linux's ``0x33``/``0x2b``.

        :raises EmulatorError: a selector with RPL != 3, or the iretq faults.
        """
        snap = self.context.cpu
        user_cs, user_ss = self._selectors.user_cs, self._selectors.user_ss
        if snap.cpl == 3:
            user_cs = snap.segments["cs"].selector
            user_ss = snap.segments.get("ss", Segment(user_ss)).selector
        cs = user_cs if cs is None else cs
        ss = user_ss if ss is None else ss
        if cs & 3 != 3 or ss & 3 != 3:
            raise EmulatorError(f"enter_ring3: selectors {cs:#x}/{ss:#x} must have RPL 3")
        self._switch(rip, cs, rflags, rsp, ss, via_template=self.cpl != 0)

    def _switch(
        self, rip: int, cs: int, rflags: int | None, rsp: int, ss: int, via_template: bool
    ) -> None:
        carried = self._carried
        carried.save()
        data_segments = carried.data_segments()
        rflags = carried["rflags"] if rflags is None else rflags
        pkru = self._get_pkru()
        if via_template:
            self.uc.context_restore(self._template0)
            carried.restore()
            if self._get_pkru() != pkru:
                self._set_pkru(pkru)
        gdtr = self.uc.reg_read(x86.UC_X86_REG_GDTR)
        read = PageReader(self.read_virtual)  # CS and SS: usually one GDT page, one walk
        cs_desc = guest_descriptor(read, gdtr, cs, "code64")
        ss_desc = guest_descriptor(read, gdtr, ss, "data")
        self._trampoline.iret(rip, cs, rflags | RFLAGS.FIXED, rsp, ss, cs_desc, ss_desc)
        self._load_data_segments(data_segments)

    # -- registers ----------------------------------------------------------------------

    def reg_read(self, name: str) -> int:
        """A register by name (``rax``, ``eax``, ``cr3``, ``lstar``, ``gdtr``, ``pkru`` …).

        :raises CommandError: unknown name or a register the emulator has no access to.
        """
        if name.lower() == "pkru":
            return self._get_pkru()
        return read_register(self.uc, name)

    def reg_write(self, name: str, value: int) -> None:
        """Write a register by name (partial registers keep the rest of their parent).

        CS and SS may only be written with the current privilege level as RPL: use
        :meth:`enter_ring0`/:meth:`enter_ring3` to change privilege.

        :raises CommandError: unknown name, bad value, a privilege-changing selector, or
            an MSR Unicorn does not keep (it ignores writes to those it does not model).
        """
        key = name.lower()
        if key == "pkru":
            if not 0 <= value <= 0xFFFF_FFFF:
                raise CommandError(f"$pkru: {value:#x} does not fit in 32 bits")
            if not self.uc.reg_read(x86.UC_X86_REG_CR4) & CR4.PKE:
                raise CommandError("$pkru cannot be written while CR4.PKE is clear")
            self._set_pkru(value)
            return
        if key in ("cs", "ss") and value & 3 != self.cpl:
            raise CommandError(
                f"${key} = {value:#x} would not change the privilege level "
                f"(CPL {self.cpl}); use enter_ring0/enter_ring3"
            )
        write_register(self.uc, key, value)
        reg = lookup_register(key)
        if reg.msr is not None and reg.msr != MSR.IA32_EFER:
            got = read_register(self.uc, key)
            if got != value:
                raise CommandError(f"${key} is not kept by Unicorn (reads back {got:#x})")

    def registers(self) -> dict[str, int]:
        """The general registers, RIP and RFLAGS by name."""
        return {name: read_register(self.uc, name) for name in GENERAL_REGISTERS}

    def table_register(self, name: str) -> Segment:
        """GDTR/IDTR/TR/LDTR as a Segment (selector, base, limit, VMCS access rights).

        :raises CommandError: not one of those names.
        """
        if name not in TABLE_REGISTERS:
            raise CommandError(f"${name} is not gdtr, idtr, tr or ldtr")
        selector, base, limit, flags = self.uc.reg_read(TABLE_REGISTERS[name])
        return Segment(selector, base, limit, segment_attributes(flags))

    def set_table_register(self, name: str, value: Segment) -> None:
        """Load GDTR/IDTR/TR/LDTR whole, hidden part included (no descriptor is read).

        :raises CommandError: not one of those names.
        """
        if name not in TABLE_REGISTERS:
            raise CommandError(f"${name} is not gdtr, idtr, tr or ldtr")
        flags = segment_flags(value.attributes or 0)
        self.uc.reg_write(
            TABLE_REGISTERS[name], (value.selector, value.base or 0, value.limit or 0, flags)
        )

    # -- memory ------------------------------------------------------------------------

    @property
    def paging(self) -> CpuPagingState:
        """The paging registers as they are now (MAXPHYADDR 40, as Unicorn's MMU)."""
        return self._paging_state(with_pkru=True)

    def _paging_state(self, with_pkru: bool) -> CpuPagingState:
        read = self.uc.reg_read
        return CpuPagingState.from_registers(
            cr0=read(x86.UC_X86_REG_CR0),
            cr3=read(x86.UC_X86_REG_CR3),
            cr4=read(x86.UC_X86_REG_CR4),
            efer=read(MSR_REGISTER, int(MSR.IA32_EFER)),
            rflags=read(x86.UC_X86_REG_RFLAGS),
            pkru=self._get_pkru() if with_pkru else 0,
            maxphyaddr=UNICORN_PHYS_BITS,
        )

    def translate(self, va: int, access: Access | None = None) -> WalkResult:
        """Walk the current page tables (machine-physical) for ``va``, checking ``access``."""
        # PKRU (read by running RDPKRU) only matters to data accesses.
        data = access is not None and access.kind is not AccessKind.FETCH
        return translate(self.memory, va, self._paging_state(data), access)

    def virt_to_phys(self, va: int, access: Access | None = None) -> int:
        """Machine-physical address of ``va``; raises TranslationFault when the walk faults."""
        result = self.translate(va, access)
        if not result.ok or result.fault is not None:
            raise TranslationFault(result)
        return result.phys

    def _pages(self, va: int, size: int) -> list[tuple[int, int, int]]:
        pieces, pos = [], 0
        while pos < size:
            n = min(size - pos, PAGE_SIZE - ((va + pos) & 0xFFF))
            pieces.append((self.virt_to_phys(va + pos), pos, n))
            pos += n
        return pieces

    def read_virtual(self, va: int, size: int) -> bytes:
        """Read through the current page tables (a debugger read: no U/S, SMAP or PKRU checks).

        :raises TranslationFault: a page is not mapped (``.result`` has the walk).
        """
        return b"".join(self.memory.read(phys, n) for phys, _pos, n in self._pages(va, size))

    def write_virtual(self, va: int, data: bytes) -> None:
        """Write through the page tables (every page checked first); drops translated code there."""
        for phys, pos, n in self._pages(va, len(data)):
            self.memory.write(phys, data[pos : pos + n])
        self.drop_translated_code(va, len(data))

    def drop_translated_code(self, va: int, size: int) -> None:
        """Make Unicorn retranslate code at ``[va, va+size)`` (after its bytes changed).

        Unicorn finds cached code through a fetch at the current privilege: where that
        fetch would fault (a supervisor page at CPL3, a user page under SMEP) the whole
        cache is dropped instead, since a failed lookup also leaves a fault in flight.
        Execute-disabled pages hold no code and are skipped (an executable alias of the
        same frame elsewhere is not looked for).
        """
        end = va + size
        user = self.cpl == 3
        page = va & ~0xFFF
        while page < end:
            walk = self.translate(page, Access(AccessKind.FETCH, user))
            if walk.fault is None:
                self.uc.ctl_remove_cache(max(va, page), min(end, page + PAGE_SIZE))
            elif not (walk.ok and not walk.executable):
                self.uc.ctl_flush_tb()
                return
            page += PAGE_SIZE

    def read_physical(self, address: int, size: int) -> bytes:
        """Read machine-physical memory (the snapshot's, as relocated)."""
        return self.memory.read(address, size)

    def write_physical(self, address: int, data: bytes) -> None:
        """Write machine-physical memory; all translated code is dropped (its VA is unknown)."""
        self.memory.write(address, data)
        self.uc.ctl_flush_tb()

    def flush_tlb(self) -> None:
        """Drop Unicorn's TLB: needed after page tables are changed behind its back."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    @property
    def paging_mode(self) -> PagingMode:
        """Four- or five-level paging, as CR4.LA57 says now."""
        return paging_mode(bool(self.uc.reg_read(x86.UC_X86_REG_CR4) & CR4.LA57))

    def page_table_changes(self) -> list[EntryChange]:
        """Paging entries (reachable from CR3 at build time) that differ from then: A/D bits …"""
        assert self._watch is not None
        return self._watch.changes()

    # -- running ------------------------------------------------------------------------

    @property
    def icount(self) -> int:
        """Instructions retired since the machine was built (exact; see :mod:`.control`)."""
        return self._runner.icount

    @property
    def runner(self) -> Runner:
        return self._runner

    def run(
        self, until: int | None = None, count: int | None = None, timeout: float | None = None
    ) -> StopEvent:
        """Run from RIP until an event, ``until`` (a VA, checked before executing it),
        ``count`` instructions, or ``timeout`` seconds (checked every few milliseconds).

        :raises EmulatorError: a negative count or timeout.
        """
        return self._runner.run(until, count, timeout)

    def step(self, n: int = 1) -> StopEvent:
        """Execute ``n`` instructions (fewer if something stops the run first)."""
        return self._runner.run(count=n)

    def hook_memory(
        self, begin: int, end: int, callback: MemoryCallback, *, read: bool = True,
        write: bool = True,
    ) -> int:  # fmt: skip
        """Call ``callback`` before each guest data access to machine-physical ``[begin, end]``.

        With paging on, Unicorn gives memory hooks *physical* addresses (measured), so
        the range is physical: a virtual range must be translated by the caller. The
        callback may call ``machine.runner.stop_after_instruction()``; it must not raise.
        Returns a handle for :meth:`unhook`.
        """
        if not (read or write):
            raise EmulatorError("hook_memory: neither reads nor writes asked for")
        types = (UC_HOOK_MEM_READ if read else 0) | (UC_HOOK_MEM_WRITE if write else 0)

        def on_access(uc: Uc, access: int, address: int, size: int, value: int, _d) -> None:
            kind = AccessKind.WRITE if access == UC_MEM_WRITE else AccessKind.READ
            callback(kind, address, size, value, uc.reg_read(x86.UC_X86_REG_RIP))

        handle = self.uc.hook_add(types, on_access, None, begin, end)
        # Loads only call read hooks from code translated while such a hook existed
        # (measured): retranslate everything.
        self.uc.ctl_flush_tb()
        return handle

    def unhook(self, handle: int) -> None:
        """Remove a hook :meth:`hook_memory` added."""
        self.uc.hook_del(handle)

    def stop(self) -> None:
        """Stop the run in progress at its next chunk boundary (thread-safe; for Ctrl-C).

        A request made while nothing runs is dropped when the next run starts.
        """
        self._runner.stop()

    def close(self) -> None:
        """Release the engine; the snapshot's memory stays with its context."""
        self.uc = None  # type: ignore[assignment]
        self._keepalive.clear()
