"""Register names, MSR numbers and partial registers.

MSR numbers are the SDM Vol. 4 Table 2-2 values; the ones an instruction reads
are also checked against QEMU's CPU through Unicorn (SWAPGS, RDTSCP, the FS/GS
base registers), and every partial register against Unicorn's own eax/ah/r9b.
"""

from __future__ import annotations

import pytest

from kctx_debug.arch.bits import EFER, decode_flags
from kctx_debug.arch.registers import (
    ALL_REGISTERS,
    MSR,
    MSR_REGISTERS,
    REGISTERS,
    SUBREGISTERS,
    RegisterGroup,
    lookup_register,
    msr_number,
)
from kctx_debug.errors import CommandError


def test_groups():
    assert RegisterGroup.GENERAL.names == (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    )  # fmt: skip
    assert RegisterGroup.SEGMENT.names == ("cs", "ds", "es", "fs", "gs", "ss")
    assert RegisterGroup.CONTROL.names == ("cr0", "cr2", "cr3", "cr4", "cr8")
    assert RegisterGroup.TABLE.names == ("gdtr", "idtr", "tr", "ldtr")
    assert "pkru" in RegisterGroup.SPECIAL.names
    assert "pkru" not in RegisterGroup.MSR.names and "pkru" not in MSR_REGISTERS
    assert set(RegisterGroup.MSR.names) == set(MSR_REGISTERS)
    names = [name for group in RegisterGroup for name in group.names]
    assert len(names) == len(set(names)) == len(REGISTERS)
    assert set(ALL_REGISTERS) == set(REGISTERS) | set(SUBREGISTERS)


@pytest.mark.parametrize(
    ("msr", "number"),
    [
        (MSR.IA32_EFER, 0xC0000080),
        (MSR.IA32_STAR, 0xC0000081),
        (MSR.IA32_LSTAR, 0xC0000082),
        (MSR.IA32_CSTAR, 0xC0000083),
        (MSR.IA32_FMASK, 0xC0000084),
        (MSR.SFMASK, 0xC0000084),
        (MSR.IA32_FS_BASE, 0xC0000100),
        (MSR.IA32_GS_BASE, 0xC0000101),
        (MSR.IA32_KERNEL_GS_BASE, 0xC0000102),
        (MSR.IA32_TSC_AUX, 0xC0000103),
        (MSR.IA32_SYSENTER_CS, 0x174),
        (MSR.IA32_PAT, 0x277),
        (MSR.IA32_APIC_BASE, 0x1B),
    ],
)
def test_msr_numbers(msr, number):
    assert msr == number


def test_msr_names():
    assert msr_number("efer") is MSR.IA32_EFER
    assert msr_number("IA32_LSTAR") is MSR.IA32_LSTAR
    assert msr_number("sfmask") == msr_number("ia32_fmask") == 0xC0000084
    assert lookup_register("kernel_gs_base").msr is MSR.IA32_KERNEL_GS_BASE
    assert lookup_register("rax").msr is None
    with pytest.raises(CommandError, match="unknown MSR 'pkru'"):
        msr_number("pkru")


@pytest.mark.parametrize(
    ("name", "parent", "offset", "width", "value"),
    [
        ("eax", "rax", 0, 32, 0x55667788),
        ("ax", "rax", 0, 16, 0x7788),
        ("al", "rax", 0, 8, 0x88),
        ("ah", "rax", 8, 8, 0x77),
        ("sil", "rsi", 0, 8, 0x88),
        ("sp", "rsp", 0, 16, 0x7788),
        ("r8d", "r8", 0, 32, 0x55667788),
        ("r15b", "r15", 0, 8, 0x88),
        ("eip", "rip", 0, 32, 0x55667788),
        ("rbx", "rbx", 0, 64, 0x1122334455667788),
        ("cs", "cs", 0, 16, 0x7788),
        ("pkru", "pkru", 0, 32, 0x55667788),
    ],
)
def test_lookup_and_extract(name, parent, offset, width, value):
    reg = lookup_register(name.upper())
    assert (reg.name, reg.parent, reg.offset, reg.width) == (name, parent, offset, width)
    assert reg.is_alias == (name != parent)
    assert reg.extract(0x1122334455667788) == value


def test_insert_keeps_other_bits():
    assert lookup_register("ah").insert(0x1122334455667788, 0xAB) == 0x112233445566AB88
    assert lookup_register("eax").insert(0x1122334455667788, 1) == 0x1122334400000001
    with pytest.raises(CommandError, match=r"\$al: 0x100 does not fit in 8 bits"):
        lookup_register("al").insert(0, 0x100)


def test_unknown_register():
    with pytest.raises(CommandError, match="unknown register 'xmm0'"):
        lookup_register("xmm0")


# --- Unicorn (QEMU's x86 model) as the oracle ---------------------------------------


@pytest.fixture
def uc():
    unicorn = pytest.importorskip("unicorn")
    engine = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    engine.mem_map(0, 0x1000)
    return engine


def _run(uc, code: bytes) -> None:
    uc.mem_write(0, code)
    uc.emu_start(0, len(code))


def test_partial_registers_match_unicorn(uc):
    x86 = pytest.importorskip("unicorn.x86_const")
    for n, parent in enumerate(RegisterGroup.GENERAL.names):
        uc.reg_write(getattr(x86, f"UC_X86_REG_{parent.upper()}"), 0x8877665544332211 + n)
    for name, reg in SUBREGISTERS.items():
        if reg.parent == "rflags":
            continue  # Unicorn's EFLAGS keeps only architecturally defined bits
        parent_value = uc.reg_read(getattr(x86, f"UC_X86_REG_{reg.parent.upper()}"))
        assert reg.extract(parent_value) == uc.reg_read(getattr(x86, f"UC_X86_REG_{name.upper()}"))


def test_fs_gs_base_msrs_match_unicorn(uc):
    x86 = pytest.importorskip("unicorn.x86_const")
    uc.msr_write(msr_number("fs_base"), 0x1234000)
    uc.msr_write(msr_number("gs_base"), 0x5678000)
    uc.msr_write(msr_number("kernel_gs_base"), 0x9ABC000)
    assert uc.reg_read(x86.UC_X86_REG_FS_BASE) == 0x1234000
    assert uc.reg_read(x86.UC_X86_REG_GS_BASE) == 0x5678000
    _run(uc, bytes.fromhex("0f01f8"))  # swapgs exchanges GS base and IA32_KERNEL_GS_BASE
    assert uc.reg_read(x86.UC_X86_REG_GS_BASE) == 0x9ABC000
    assert uc.msr_read(MSR.IA32_KERNEL_GS_BASE) == 0x5678000


def test_tsc_aux_and_efer_match_unicorn(uc):
    x86 = pytest.importorskip("unicorn.x86_const")
    uc.msr_write(msr_number("tsc_aux"), 0x42)
    _run(uc, bytes.fromhex("0f01f9"))  # rdtscp loads IA32_TSC_AUX into ECX
    assert uc.reg_read(x86.UC_X86_REG_RCX) == 0x42
    # A fresh engine is in long mode, so EFER.LME and EFER.LMA must be what it reports.
    assert decode_flags(uc.msr_read(msr_number("efer")), EFER) == ["LME", "LMA"]
