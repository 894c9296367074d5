"""Building a Machine from a snapshot: memory, registers, privilege, relocation.

Snapshots are built in code (``make_context``): a few pages of kernel and user
memory behind 4-level tables, Linux's GDT, and CPU state like a real CPL0 or CPL3
capture. Expected values come from the SDM (error codes, CPL rules) and from the
bytes the tests put there, never from the emulator itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import pytest

from kctx_debug.emulator.control import StopKind
from kctx_debug.emulator.engine import EmulatorError
from kctx_debug.emulator.machine import Machine
from kctx_debug.emulator.relocate import PHYS_LIMIT
from kctx_debug.errors import CommandError
from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.context import KernelContext, TranslationFault
from kctx_debug.pagetables.entry import PteFlag, paging_mode
from kctx_debug.physmem import PAGE_SIZE, PhysicalMemory
from kctx_debug.snapshot import CpuState, Segment, Snapshot, TableRegister

# Virtual layout.
KTEXT = 0xFFFF_FFFF_8100_0000  # kernel code, RX
KDATA = KTEXT + 0x1000  # kernel data and stack, RW NX
KRO = KTEXT + 0x2000  # kernel read-only data, NX
GDT_VA = KTEXT + 0x3000
KMISSING = KTEXT + 0x4000  # mapped to physical memory the snapshot does not hold
UTEXT, UDATA = 0x40_0000, 0x40_1000  # user code (RX) and data (RW NX)
UNMAPPED = 0x1234_5000
# Physical layout.
RAM = 0x40_0000
TABLES, TABLES_SIZE = 0x10_0000, 0x4_0000
KTEXT_PA, KDATA_PA, KRO_PA, GDT_PA = 0x20_0000, 0x20_1000, 0x20_2000, 0x20_3000
UTEXT_PA, UDATA_PA = 0x30_0000, 0x30_1000
MISSING_PA = 0x8000_0000
GDT = (0, 0x00CF9B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF,
       0x00CFFB000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF)  # fmt: skip
KERNEL_CS, KERNEL_SS, USER_CS, USER_SS = 0x10, 0x18, 0x33, 0x2B
# VMCS access rights (SDM vol. 3C 25.4.1) for those segments.
AR = {KERNEL_CS: 0xA09B, KERNEL_SS: 0xC093, USER_CS: 0xA0FB, USER_SS: 0xC0F3}
CR0 = 0x8005_0033  # PE MP ET NE WP AM PG
CR4 = 0x10_06A0  # PAE PGE OSFXSR OSXMMEXCPT SMEP
CR4_PKE, CR4_LA57 = 1 << 22, 1 << 12
EFER = 0xD01  # SCE LME LMA NXE
MSRS = {
    "efer": EFER,
    "star": 0x0023_0010_0000_0000,
    "lstar": 0xFFFF_FFFF_8100_0800,
    "cstar": 0xFFFF_FFFF_8100_0900,
    "sfmask": 0x4_7700,
    "kernel_gs_base": 0xFFFF_8880_0000_0000,
    "tsc_aux": 3,
    "pat": 0x0407_0500_0007_0106,
}
P, RW, US, XD = int(PteFlag.P), int(PteFlag.RW), int(PteFlag.US), 1 << 63


@dataclass
class Built:
    ctx: KernelContext
    tables: PageTableBuilder
    extra: dict = field(default_factory=dict)


def make_context(
    code: bytes = b"\xf4",
    *,
    cpl: int = 0,
    cr4: int = CR4,
    msrs: dict | None = None,
    regs: dict | None = None,
    la57: bool = False,
    segments: dict | None = None,
) -> Built:
    """A snapshot about to run ``code`` (at KTEXT for CPL0, UTEXT for CPL3)."""
    mem = PhysicalMemory()
    mem.add_zero(0, RAM)
    tables = PageTableBuilder(mem, paging_mode(la57), TABLES, TABLES_SIZE)
    g = PteFlag.G
    tables.map(KTEXT, KTEXT_PA, PAGE_SIZE, PAGE_SIZE, g)
    tables.map(KDATA, KDATA_PA, PAGE_SIZE, PAGE_SIZE, g | PteFlag.RW | PteFlag.XD)
    tables.map(KRO, KRO_PA, PAGE_SIZE, PAGE_SIZE, g | PteFlag.XD)
    tables.map(GDT_VA, GDT_PA, PAGE_SIZE, PAGE_SIZE, g | PteFlag.RW | PteFlag.XD)
    tables.map(KMISSING, MISSING_PA, PAGE_SIZE, PAGE_SIZE, g | PteFlag.RW | PteFlag.XD)
    tables.map(UTEXT, UTEXT_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.US)
    tables.map(UDATA, UDATA_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.US | PteFlag.RW | PteFlag.XD)
    mem.write(GDT_PA, b"".join(struct.pack("<Q", d) for d in GDT))
    mem.write(UTEXT_PA if cpl == 3 else KTEXT_PA, code)
    cs, ss = (USER_CS, USER_SS) if cpl == 3 else (KERNEL_CS, KERNEL_SS)
    base_regs = {"rip": UTEXT if cpl == 3 else KTEXT, "rflags": 0x202}
    base_regs["rsp"] = UDATA + 0xFF0 if cpl == 3 else KDATA + 0xFF0
    cpu = CpuState(
        regs={**base_regs, **(regs or {})},
        cr0=CR0,
        cr3=tables.root,
        cr4=cr4 | (CR4_LA57 if la57 else 0),
        msrs={**MSRS, **(msrs or {})},
        segments=segments
        if segments is not None
        else {
            "cs": Segment(cs, 0, 0xFFFF_FFFF, AR[cs]),
            "ss": Segment(ss, 0, 0xFFFF_FFFF, AR[ss]),
        },
        gdtr=TableRegister(GDT_VA, len(GDT) * 8 - 1),
        idtr=TableRegister(KRO, 0xFFF),
    )
    return Built(KernelContext(Snapshot(cpu, ()), mem), tables)


def machine_for(code: bytes = b"\xf4", **kw) -> Machine:
    return Machine.from_context(make_context(code, **kw).ctx)


def asm(hex_bytes: str) -> bytes:
    return bytes.fromhex(hex_bytes.replace(" ", ""))


# mov rax, [abs32] / mov [abs32], rax with a sign-extended 32-bit address (SDM vol. 2A).
def load_abs(va: int) -> bytes:
    return asm("488b0425") + struct.pack("<i", va - (1 << 64) if va >> 63 else va)


def store_abs(va: int) -> bytes:
    return asm("48890425") + struct.pack("<i", va - (1 << 64) if va >> 63 else va)


# -- building ------------------------------------------------------------------------


def test_memory_is_mapped_without_relocation_and_report_is_clean():
    machine = machine_for()
    report = machine.report
    assert report.warnings == ()
    assert not machine.relocations
    assert report.native_counter
    assert report.windows[0] == (0, RAM, "snapshot")
    assert report.windows[1][0] >= RAM and report.windows[1][0] + report.windows[1][1] <= PHYS_LIMIT
    assert "syscall/sysenter" in str(report)


def test_control_registers_and_msrs_are_loaded():
    machine = machine_for()
    built_cr3 = machine.context.cpu.cr3
    assert machine.reg_read("cr0") == CR0
    assert machine.reg_read("cr3") == built_cr3
    assert machine.reg_read("cr4") == CR4
    assert machine.reg_read("efer") == EFER
    for name, value in MSRS.items():
        assert machine.reg_read(name) == value, name
    assert machine.reg_read("gdtr") == (len(GDT) * 8 - 1) | GDT_VA << 16
    assert machine.table_register("idtr").base == KRO
    assert (machine.reg_read("cs"), machine.reg_read("ss"), machine.cpl) == (
        KERNEL_CS,
        KERNEL_SS,
        0,
    )
    assert machine.reg_read("rflags") == 0x202
    assert machine.reg_read("rsp") == KDATA + 0xFF0


def test_fs_gs_bases_and_general_registers():
    regs = {f"r{n}": 0x1111 * n for n in range(8, 16)} | {"rbx": 0xB, "rbp": 0xBB}
    machine = machine_for(regs=regs, msrs={"fs_base": 0x7F00_0000_1000, "gs_base": KDATA})
    for name, value in regs.items():
        assert machine.reg_read(name) == value
    assert machine.reg_read("fs_base") == 0x7F00_0000_1000
    assert machine.reg_read("gs_base") == KDATA


def test_pkru_is_loaded_with_wrpkru_and_read_back():
    machine = machine_for(cr4=CR4 | CR4_PKE, msrs={"pkru": 0x5555_5554})
    assert machine.report.warnings == ()
    assert machine.reg_read("pkru") == 0x5555_5554
    machine.reg_write("pkru", 0xC)
    assert machine.reg_read("pkru") == 0xC
    assert machine.reg_read("rip") == KTEXT  # the private run left the guest's RIP alone


def test_pkru_survives_privilege_changes():
    machine = machine_for(asm("90"), cpl=3, cr4=CR4 | CR4_PKE, msrs={"pkru": 0x54})
    assert (machine.cpl, machine.reg_read("pkru")) == (3, 0x54)
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    assert (machine.cpl, machine.reg_read("pkru")) == (0, 0x54)
    machine.reg_write("pkru", 0x10)
    machine.enter_ring3(UTEXT, UDATA + 0x800)
    assert (machine.cpl, machine.reg_read("pkru")) == (3, 0x10)


def test_unrepresentable_state_is_reported_at_build_time():
    machine = machine_for(msrs={"pkru": 0x4})  # CR4.PKE clear: WRPKRU would #UD
    assert any("pkru" in w for w in machine.report.warnings)
    with pytest.raises(CommandError):
        machine.reg_write("pkru", 0)


def test_five_level_paging_runs_57_bit_addresses():
    va = 0xFF11_0000_0000_0000  # Linux's 5-level direct map: needs PML5 index 0x1E2
    # mov rax, va; mov qword [rax], 0x55; mov rbx, [rax]; hlt
    built = make_context(asm("48b8") + struct.pack("<Q", va) + asm("48c70055000000 488b18 f4"),
                         la57=True)  # fmt: skip
    built.tables.map(va, KDATA_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.RW)
    machine = Machine.from_context(built.ctx)
    assert machine.report.warnings == ()
    assert machine.run(count=10).kind is StopKind.HALT
    assert machine.reg_read("rbx") == 0x55 == built.ctx.mem.read_u64(KDATA_PA)


def test_segments_without_cached_attributes_load_flat_ones():
    built = make_context(asm("90 f4"), segments={"cs": Segment(0x10), "ss": Segment(0x18)})
    machine = Machine.from_context(built.ctx)
    assert machine.report.warnings == ()
    assert any(n.startswith("cs: no usable cached attributes") for n in machine.report.notes)
    assert (machine.cpl, machine.reg_read("cs"), machine.reg_read("ss")) == (0, 0x10, 0x18)
    assert machine.run().kind is StopKind.HALT


def test_task_register_is_loaded_with_its_attributes():
    built = make_context()
    cpu = built.ctx.cpu
    tss = Segment(0x40, KDATA + 0x100, 0x67, 0x8B)  # busy 64-bit TSS (SDM vol. 3A Table 3-2)
    snapshot = Snapshot(
        CpuState(cpu.regs, cpu.cr0, cpu.cr3, cpu.cr4, msrs=cpu.msrs, segments=cpu.segments,
                 gdtr=cpu.gdtr, idtr=cpu.idtr, tr=tss),
        (),
    )  # fmt: skip
    machine = Machine.from_context(KernelContext(snapshot, built.ctx.mem))
    assert machine.table_register("tr") == tss
    assert machine.reg_read("tr") == 0x40
    ldt = Segment(0x50, KRO, 0xFFF, 0x82)  # an LDT, present
    machine.set_table_register("ldtr", ldt)
    assert machine.table_register("ldtr") == ldt
    with pytest.raises(CommandError, match="set_table_register"):
        machine.reg_write("ldtr", 0x50)


# -- registers -----------------------------------------------------------------------


def test_partial_register_write_keeps_the_rest():
    machine = machine_for(regs={"rax": 0x1122_3344_5566_7788})
    machine.reg_write("ah", 0xAB)
    assert machine.reg_read("rax") == 0x1122_3344_5566_AB88
    assert machine.reg_read("eax") == 0x5566_AB88
    with pytest.raises(CommandError):
        machine.reg_write("al", 0x100)


def test_privilege_changing_selector_write_is_refused():
    machine = machine_for()
    with pytest.raises(CommandError, match="enter_ring"):
        machine.reg_write("cs", USER_CS)
    machine.reg_write("cs", KERNEL_CS)  # same RPL: allowed
    assert machine.cpl == 0


# -- memory --------------------------------------------------------------------------


def test_virtual_and_physical_access_share_the_snapshot_buffers():
    built = make_context()
    machine = Machine.from_context(built.ctx)
    machine.write_virtual(KDATA + 0xFFC, b"abcdefgh"[:4])
    assert built.ctx.mem.read(KDATA_PA + 0xFFC, 4) == b"abcd"
    built.ctx.mem.write(KRO_PA, b"\x99" * 8)
    assert machine.read_virtual(KRO, 8) == b"\x99" * 8
    assert machine.read_physical(KRO_PA, 8) == b"\x99" * 8
    assert machine.virt_to_phys(KRO + 5) == KRO_PA + 5
    with pytest.raises(TranslationFault) as info:
        machine.read_virtual(UNMAPPED, 1)
    assert info.value.result.fault.reason == "not present"


def test_write_virtual_drops_translated_code():
    # mov eax, 1; hlt -- run, patch the immediate, run again: the new code runs.
    machine = machine_for(asm("b801000000 f4"))
    machine.run()
    assert machine.reg_read("rax") == 1
    machine.write_virtual(KTEXT + 1, struct.pack("<I", 2))
    machine.reg_write("rip", KTEXT)
    machine.run()
    assert machine.reg_read("rax") == 2


def test_write_physical_drops_translated_code():
    machine = machine_for(asm("b801000000 f4"))
    machine.run()
    machine.write_physical(KTEXT_PA + 1, struct.pack("<I", 3))
    machine.reg_write("rip", KTEXT)
    machine.run()
    assert machine.reg_read("rax") == 3


# -- privilege -----------------------------------------------------------------------


def test_ring3_snapshot_runs_at_cpl3_and_faults_on_supervisor_pages():
    # mov rax, [UDATA]; mov rax, [KDATA] -- the second is a user read of a supervisor page.
    built = make_context(load_abs(UDATA) + load_abs(KDATA), cpl=3)
    built.ctx.mem.write_u64(UDATA_PA, 0x5A5A)
    machine = Machine.from_context(built.ctx)
    assert machine.report.warnings == ()
    assert (machine.cpl, machine.reg_read("cs"), machine.reg_read("ss")) == (3, USER_CS, USER_SS)
    event = machine.run(count=10)
    assert machine.reg_read("rax") == 0x5A5A
    assert (event.kind, event.vector, event.pc, event.executed) == (
        StopKind.EXCEPTION,
        14,
        UTEXT + 8,
        1,
    )
    # SDM vol. 3A 4.7: P=1 (protection), W/R=0, U/S=1.
    assert event.error_code == 0b101
    assert event.page_fault.address == KDATA


def test_enter_ring0_from_ring3_reads_supervisor_memory():
    built = make_context(load_abs(KDATA) + b"\xf4", cpl=3, regs={"rbx": 0xBB, "r12": 0x12})
    built.ctx.mem.write_u64(KDATA_PA, 0xC0DE)
    built.ctx.mem.write(KTEXT_PA, load_abs(KDATA) + b"\xf4")
    machine = Machine.from_context(built.ctx)
    machine.uc.reg_write(__import__("unicorn").x86_const.UC_X86_REG_XMM3, 0x1234_5678 << 64)
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    assert (machine.cpl, machine.reg_read("cs"), machine.reg_read("ss")) == (
        0,
        KERNEL_CS,
        KERNEL_SS,
    )
    assert (machine.reg_read("rbx"), machine.reg_read("r12")) == (0xBB, 0x12)
    assert machine.reg_read("rsp") == KDATA + 0x800
    assert machine.reg_read("cr3") == built.ctx.cpu.cr3
    xmm3 = __import__("unicorn").x86_const.UC_X86_REG_XMM3
    assert machine.uc.reg_read(xmm3) == 0x1234_5678 << 64
    event = machine.run(count=10)
    assert event.kind is StopKind.HALT
    assert machine.reg_read("rax") == 0xC0DE


def test_enter_ring3_then_supervisor_access_faults():
    machine = machine_for(regs={"rbx": 7}, msrs={"fs_base": 0x7F00_0000_2000})
    machine.write_virtual(UTEXT, load_abs(KDATA))
    machine.enter_ring3(UTEXT, UDATA + 0x800)
    assert (machine.cpl, machine.reg_read("cs"), machine.reg_read("ss")) == (3, USER_CS, USER_SS)
    assert machine.reg_read("rbx") == 7
    assert machine.reg_read("fs_base") == 0x7F00_0000_2000
    assert machine.reg_read("rflags") & 0x200  # IF kept
    event = machine.run(count=5)
    assert (event.vector, event.error_code, event.page_fault.address) == (14, 0b101, KDATA)
    # And back: the same instruction at CPL0 succeeds.
    machine.write_virtual(KTEXT, load_abs(KDATA) + b"\xf4")
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    assert machine.run(count=5).kind is StopKind.HALT


def test_enter_ring_checks_selector_rpl():
    machine = machine_for()
    with pytest.raises(EmulatorError):
        machine.enter_ring3(UTEXT, UDATA, cs=KERNEL_CS)
    with pytest.raises(EmulatorError):
        machine.enter_ring0(KTEXT, KDATA, cs=USER_CS)


# -- relocation ----------------------------------------------------------------------

HIGH = 0x200_0000_0000  # 2 TiB: above Unicorn's 40-bit physical limit
KHIGH = KTEXT + 0x20_0000  # its own PDE, so its page table can live high too


def high_context(code: bytes) -> Built:
    built = make_context(code)
    mem = built.ctx.mem
    mem.add_zero(HIGH, 0x2000)
    high_pt, high_page = HIGH, HIGH + 0x1000
    pd_entry = built.ctx.translate(KTEXT).steps[2].table_phys + 8 * ((KHIGH >> 21) & 0x1FF)
    mem.write_u64(pd_entry, high_pt | P | RW)
    mem.write_u64(high_pt, high_page | P | RW | XD)
    mem.write_u64(high_page, 0xFEED_FACE)
    built.extra.update(high_pt=high_pt, high_page=high_page)
    return built


def test_frames_above_40_bits_are_relocated_in_private_table_copies():
    # mov rax, [KHIGH]; mov [KHIGH + 8], rax; hlt
    code = load_abs(KHIGH) + asm("48890425") + struct.pack("<i", KHIGH + 8 - (1 << 64)) + b"\xf4"
    built = high_context(code)
    mem = built.ctx.mem
    root = built.ctx.cpu.cr3
    snapshot_tables = {t: mem.read(t, PAGE_SIZE) for t in (root, built.extra["high_pt"])}
    machine = Machine.from_context(built.ctx)
    relocs = machine.relocations
    assert [(m.snapshot_base, m.size) for m in relocs.moves] == [(HIGH, 0x2000)]
    moved = relocs.moves[0].machine_base
    assert moved < PHYS_LIMIT and moved % (1 << 30) == HIGH % (1 << 30)
    # Every table from CR3 down to the high page table is copied; CR3 points at the copy.
    assert [c.level for c in relocs.copies] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert machine.reg_read("cr3") == relocs.machine_cr3 != root
    assert "above 2^40" in str(machine.report)
    event = machine.run(count=10)
    assert event.kind is StopKind.HALT
    assert machine.reg_read("rax") == 0xFEED_FACE
    # The emulator wrote the snapshot's high buffer; its tables kept their bytes.
    assert mem.read_u64(built.extra["high_page"] + 8) == 0xFEED_FACE
    for table, data in snapshot_tables.items():
        assert mem.read(table, PAGE_SIZE) == data
    assert machine.read_physical(moved + 0x1008, 8) == struct.pack("<Q", 0xFEED_FACE)
    assert relocs.to_snapshot(moved + 0x1008) == HIGH + 0x1008
    assert relocs.to_machine(HIGH + 4) == moved + 4


def test_table_copies_rewrite_only_pointers():
    built = high_context(b"\xf4")
    machine = Machine.from_context(built.ctx)
    copies = {c.level: c for c in machine.relocations.copies}
    pt = copies["PTE"]
    original = np.frombuffer(built.ctx.mem.read(pt.snapshot_table, PAGE_SIZE), "<u8")
    copy = np.frombuffer(machine.read_physical(pt.machine_table, PAGE_SIZE), "<u8")
    moved = machine.relocations.moves[0].machine_base
    assert int(copy[0]) == (moved + 0x1000) | P | RW | XD
    assert int(original[0]) == HIGH + 0x1000 | P | RW | XD
    assert np.array_equal(copy[1:], original[1:])
    assert pt.rewritten == 1 and copies["PML4E"].rewritten == 1


def test_large_page_above_40_bits_keeps_alignment_and_pat():
    high, khigh = 0x300_0020_0000, KTEXT + 0x40_0000  # a 2 MiB page, its own PDE
    built = make_context(load_abs(khigh + 0x1_2340) + b"\xf4")
    mem = built.ctx.mem
    mem.add_zero(high, 0x20_0000)
    mem.write_u64(high + 0x1_2340, 0x1234)
    pd = built.ctx.translate(KTEXT).steps[2].table_phys
    pat, ps = 1 << 12, int(PteFlag.PS)  # PAT of a 2 MiB page is bit 12 (SDM vol. 3A Table 4-18)
    mem.write_u64(pd + 8 * ((khigh >> 21) & 0x1FF), high | P | RW | ps | pat | XD)
    machine = Machine.from_context(built.ctx)
    moved = machine.relocations.moves[0].machine_base
    assert moved % (1 << 30) == high % (1 << 30)
    pd_copy = next(c for c in machine.relocations.copies if c.level == "PDE")
    entry = machine.read_physical(pd_copy.machine_table + 8 * ((khigh >> 21) & 0x1FF), 8)
    assert int.from_bytes(entry, "little") == moved | P | RW | ps | pat | XD
    assert machine.run(count=5).kind is StopKind.HALT
    assert machine.reg_read("rax") == 0x1234


def test_msr_writes_unicorn_ignores_are_refused():
    machine = machine_for()
    machine.reg_write("lstar", KTEXT + 0x10)
    assert machine.reg_read("lstar") == KTEXT + 0x10
    with pytest.raises(CommandError, match="not kept"):
        machine.reg_write("tsc", 5)  # QEMU's TSC is not an MSR Unicorn stores
