"""Privilege changes keep every other register, and the trampoline's tables are reused.

The truth is the values written just before: ``enter_ring0`` restores a CPL0 context
and writes the rest back (kctx_debug.emulator.carry), so every register it does not
set (CS, SS, RIP, RSP) must read back exactly as written, through Unicorn's own
single-register reads.
"""

from __future__ import annotations

import pytest
from test_machine import (
    CR4,
    CR4_PKE,
    KDATA,
    KTEXT,
    KTEXT_PA,
    UDATA,
    UTEXT,
    asm,
    machine_for,
)
from unicorn import x86_const as x86

from kctx_debug.emulator import privilege
from kctx_debug.emulator.control import StopKind
from kctx_debug.physmem import PAGE_SIZE

# Distinct values each register keeps (no reserved bit set, so Unicorn stores them).
GENERAL = {
    **{name: 0x1111_0000_0000_0000 * (i + 1) + i for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", *(f"r{n}" for n in range(8, 16)))
    )},
    "cr2": 0xDEAD_B000,
    "cr8": 0x5,
    "star": 0x0023_0010_0000_0000, "lstar": 0xFFFF_FFFF_8100_0ABC,
    "cstar": 0xFFFF_FFFF_8100_0DEF, "sfmask": 0x4_7701,
    "kernel_gs_base": 0xFFFF_8880_1234_0000, "tsc_aux": 7,
    "fs_base": 0x7F00_0000_3000, "gs_base": 0x7F00_0000_4000,
}  # fmt: skip
# The carry flag, parity and direction flags on top of the reserved bit 1 and IF.
RFLAGS = 0x2 | 0x1 | 0x4 | 0x400 | 0x200
XMM = [getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)]
ST = [getattr(x86, f"UC_X86_REG_ST{i}") for i in range(8)]
PI_SIGNIFICAND = 0xC90F_DAA2_2168_C235
# fld1; fldpi (SDM vol. 2A FLD1/FLDPI), then nop.
X87_CODE = asm("d9e8 d9eb 90")
# Breakpoint addresses only: DR7 stays 0 so that none is armed.
DR = {getattr(x86, f"UC_X86_REG_DR{i}"): 0x1000 * (i + 1) for i in range(4)}


def _set_everything(machine) -> None:
    for name, value in GENERAL.items():
        machine.reg_write(name, value)
    machine.reg_write("rflags", RFLAGS)
    for i, reg in enumerate(XMM):
        machine.uc.reg_write(reg, (0x0123_4567_89AB_CDEF << 64 | i) + (i << 100))
    machine.uc.reg_write(x86.UC_X86_REG_FPCW, 0x27F)
    machine.uc.reg_write(x86.UC_X86_REG_MXCSR, 0x1F80 | 0x6000)  # round toward zero
    for reg, value in DR.items():
        machine.uc.reg_write(reg, value)


def _assert_everything(machine) -> None:
    for name, value in GENERAL.items():
        assert machine.reg_read(name) == value, name
    assert machine.reg_read("rflags") == RFLAGS
    for i, reg in enumerate(XMM):
        assert machine.uc.reg_read(reg) == (0x0123_4567_89AB_CDEF << 64 | i) + (i << 100)
    # fld1; fldpi: ST0 = pi and ST1 = 1.0, 64-bit significands (SDM vol. 1 8.3.3).
    assert [machine.uc.reg_read(reg) for reg in ST[:2]] == [PI_SIGNIFICAND, 1 << 63]
    assert machine.uc.reg_read(x86.UC_X86_REG_FPCW) == 0x27F
    assert machine.uc.reg_read(x86.UC_X86_REG_MXCSR) == 0x1F80 | 0x6000
    assert {reg: machine.uc.reg_read(reg) for reg in DR} == DR


def test_enter_ring0_and_back_keep_every_other_register():
    machine = machine_for(X87_CODE, cpl=3)
    assert machine.run(count=2).kind is StopKind.BUDGET
    _set_everything(machine)
    _assert_everything(machine)
    gdtr, idtr = machine.reg_read("gdtr"), machine.reg_read("idtr")
    cr0, cr3, cr4, efer = (machine.reg_read(n) for n in ("cr0", "cr3", "cr4", "efer"))
    for _ in range(2):  # the second time through reused trampoline tables
        machine.enter_ring0(KTEXT, KDATA + 0x800)
        assert (machine.cpl, machine.reg_read("rip"), machine.reg_read("rsp")) == (
            0, KTEXT, KDATA + 0x800,
        )  # fmt: skip
        _assert_everything(machine)
        assert (machine.reg_read("gdtr"), machine.reg_read("idtr")) == (gdtr, idtr)
        assert [machine.reg_read(n) for n in ("cr0", "cr3", "cr4", "efer")] == [
            cr0, cr3, cr4, efer,
        ]  # fmt: skip
        machine.enter_ring3(UTEXT, UDATA + 0x800)
        assert machine.cpl == 3
        _assert_everything(machine)


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts the trampoline's page-table builds (each one constructs a builder)."""
    made: list[int] = []
    real = privilege.PageTableBuilder

    def counting(*args, **kw):
        made.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(privilege, "PageTableBuilder", counting)
    return made


def test_trampoline_tables_are_rebuilt_only_when_the_target_mapping_changes(builds):
    machine = machine_for(asm("f4"), cpl=3)  # hlt
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    first = len(builds)
    machine.enter_ring3(UTEXT, UDATA + 0x800)
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    machine.enter_ring0(KTEXT + 0x10, KDATA + 0x800)  # same page: same tables
    # ring0 -> ring3 -> ring0 -> ring0: the user page once, the kernel page again.
    assert len(builds) == first + 2
    # Remap KTEXT's page to another frame holding other code: rebuilt, and it runs there.
    walk = machine.translate(KTEXT)
    other = KTEXT_PA + 0x10 * PAGE_SIZE  # free RAM: the tables are at TABLES
    machine.write_physical(other, asm("48c7c0 2a000000 f4"))  # mov rax, 42; hlt
    leaf = walk.leaf
    machine.write_physical(leaf.entry_phys, (leaf.raw & ~(KTEXT_PA) | other).to_bytes(8, "little"))
    machine.flush_tlb()
    before = len(builds)
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    assert len(builds) == before + 1
    assert machine.run(count=5).kind is StopKind.HALT
    assert machine.reg_read("rax") == 42


def test_pkru_reads_reuse_the_trampoline_tables(builds):
    machine = machine_for(asm("90"), cpl=3, cr4=CR4 | CR4_PKE, msrs={"pkru": 0x54})
    machine.enter_ring0(KTEXT, KDATA + 0x800)
    first = len(builds)
    # rdpkru before and after the template restore, wrpkru: no rebuild for any of them.
    for _ in range(3):
        machine.enter_ring3(UTEXT, UDATA + 0x800)
        machine.enter_ring0(KTEXT, KDATA + 0x800)
        assert machine.reg_read("pkru") == 0x54
    assert len(builds) == first + 6  # ring3 and ring0 targets alternate: rebuilt each time
