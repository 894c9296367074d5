"""ELF loading into a kernel context, checked against binutils output and hand-computed bytes.

Objects are built with GNU as/ld and gcc at test time. The truth for each check is
independent of the loader: instruction bytes assembled by hand from the SDM opcode
tables, section and symbol values from the ELF gABI rules, relocation values from the
x86-64 psABI formulas (``S + A`` and ``S + A - P``), and capstone's decoding of the
relocated code.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kctx_debug.emulator.disasm import disassemble
from kctx_debug.emulator.elfload import (
    ElfLoadError,
    RelocationOverflowError,
    UndefinedSymbolError,
    UnsupportedRelocationError,
    load_executable,
    load_relocatable,
)
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.physmem import PhysicalMemory
from kctx_debug.snapshot_io import parse_snapshot
from kctx_debug.symbols import SymbolTable

SRC = Path(__file__).resolve().parent.parent / "fixtures" / "src"
HAVE_BINUTILS = bool(shutil.which("as") and shutil.which("ld"))
HAVE_GCC = bool(shutil.which("gcc"))
needs_binutils = pytest.mark.skipif(not HAVE_BINUTILS, reason="GNU as/ld (binutils) not installed")
needs_gcc = pytest.mark.skipif(not HAVE_GCC, reason="gcc not installed")
KERNEL_FLAGS = (
    "-O2 -ffreestanding -fno-pic -mcmodel=kernel -mno-red-zone -fno-stack-protector "
    "-fno-asynchronous-unwind-tables -mgeneral-regs-only"
).split()

KERNEL_TEXT_VA = 0xFFFF_FFFF_8100_0000
KERNEL_TEXT_PA = 0x100_0000
MODULE_BASE = 0xFFFF_FFFF_C000_0000
LOW_BASE = 0x20_0000  # a low mapping, where R_X86_64_32 values fit
UNMAPPED_VA = 0x30_0000  # low, so the R_X86_64_32 in misc.o fits

# A tiny kernel image: _start loops on hlt; kernel_helper(x) returns 3 * x + 100.
KERNEL_S = """
    .text
    .globl _start, kernel_helper
_start:
    hlt
    jmp _start
    .type kernel_helper, @function
kernel_helper:
    lea 0x64(%rdi,%rdi,2), %rax
    ret
    .size kernel_helper, . - kernel_helper
    .data
    .globl kernel_counter
    .type kernel_counter, @object
kernel_counter:
    .quad 42
    .size kernel_counter, 8
    .bss
    .globl scratch
scratch:
    .skip 0x3000
"""
# Kernel-style layout: virtual at -2 GiB + 16 MiB, loaded at physical 16 MiB.
KERNEL_LD = """
ENTRY(_start)
SECTIONS
{
  . = 0xffffffff81000000;
  .text : AT(0x1000000) { *(.text) }
  . = ALIGN(0x1000);
  .data : AT(ADDR(.data) - 0xffffffff80000000) { *(.data) }
  .bss : AT(ADDR(.bss) - 0xffffffff80000000) { *(.bss) }
}
"""
# f4 hlt | eb fd jmp -3 | 48 8d 44 7f 64 lea rax, [rdi + rdi*2 + 0x64] | c3 ret
KERNEL_TEXT = bytes.fromhex("f4" "ebfd" "488d447f64" "c3")  # fmt: skip

# Data covering R_X86_64_64 (defined, weak undefined, COMMON) and R_X86_64_32.
MISC_S = """
    .text
    .globl entry
entry:
    ret
    .data
    .p2align 6
    .globl table
table:
    .quad entry
    .quad weakling
    .quad common_buf
    .long entry
    .weak weakling
    .comm common_buf, 24, 16
"""
# R_X86_64_GOTOFF64 needs a GOT base, which a kernel module never has.
GOTOFF_S = """
    .text
    .globl f
f:  ret
    .data
    .reloc ., R_X86_64_GOTOFF64, f
    .quad 0
"""
# call rel32 to a function nobody defines: R_X86_64_PLT32 at .text+1.
UNDEF_S = """
    .text
    .globl g
g:  call missing_fn
    ret
"""


def run(*argv: str | Path, cwd: Path) -> None:
    subprocess.run([str(a) for a in argv], cwd=cwd, check=True, capture_output=True)


def assemble(folder: Path, name: str, source: str) -> Path:
    (folder / f"{name}.S").write_text(source)
    run("as", "--64", f"{name}.S", "-o", f"{name}.o", cwd=folder)
    return folder / f"{name}.o"


def compile_kernel_c(folder: Path, source: Path, *extra: str) -> Path:
    out = folder / (source.stem + ".o")
    run("gcc", *KERNEL_FLAGS, *extra, "-c", source, "-o", out, cwd=folder)
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    if not HAVE_BINUTILS:
        pytest.skip("GNU as/ld (binutils) not installed")
    folder = tmp_path_factory.mktemp("elfload")
    assemble(folder, "kernel", KERNEL_S)
    (folder / "kernel.ld").write_text(KERNEL_LD)
    run("ld", "-m", "elf_x86_64", "-T", "kernel.ld", "-nostdlib", "-z", "max-page-size=0x1000",
        "-z", "noexecstack", "-o", "kernel.elf", "kernel.o", cwd=folder)  # fmt: skip
    assemble(folder, "misc", MISC_S)
    assemble(folder, "gotoff", GOTOFF_S)
    assemble(folder, "undef", UNDEF_S)
    if HAVE_GCC:
        compile_kernel_c(folder, SRC / "module.c")
        compile_kernel_c(folder, SRC / "cfuncs.c")
    return folder


def kernel_context() -> KernelContext:
    """32 MiB of RAM; kernel text (2 MiB pages), modules, a low window and a direct map."""
    mappings = [
        (KERNEL_TEXT_VA, KERNEL_TEXT_PA, 0x20_0000, "2M", ["RW", "G"]),
        (MODULE_BASE, 0x40_0000, 0x10_0000, "4K", ["RW"]),
        (LOW_BASE, 0x80_0000, 0x1_0000, "4K", ["RW"]),
        (0xFFFF_8880_0000_0000, 0, 0x200_0000, "2M", ["RW", "XD"]),
    ]
    doc = {
        "format": "kctx-snapshot",
        "version": 1,
        "cpu": {
            "regs": {"rip": hex(KERNEL_TEXT_VA), "rsp": "0xffff888000f00000"},
            "cr0": "0x80050033",
            "cr3": "0x100000",
            "cr4": "0x6a0",
            "msrs": {"efer": "0xd00"},
        },
        "memory": [{"base": "0x0", "size": "0x2000000", "kind": "zero"}],
        "build": {
            "page_tables": {
                "levels": 4,
                "tables": {"base": "0x100000", "size": "0x40000"},
                "mappings": [
                    {"va": hex(va), "pa": hex(pa), "size": hex(size), "page_size": ps, "flags": fl}
                    for va, pa, size, ps, fl in mappings
                ],
            }
        },
    }
    return KernelContext.from_snapshot(parse_snapshot(doc))


def u64s(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


# -- executables ---------------------------------------------------------------------------------


def test_load_executable_places_segments_at_physical_addresses(build):
    ctx = kernel_context()
    # Poison the .data/.bss pages: the loader must zero exactly p_memsz - p_filesz bytes.
    ctx.mem.write(0x100_1000, b"\xaa" * 0x5000)
    image = load_executable(ctx, build / "kernel.elf")
    assert image.entry == KERNEL_TEXT_VA
    assert [(s.paddr, s.vaddr, s.filesz, s.memsz) for s in image.segments] == [
        (0x100_0000, 0xFFFF_FFFF_8100_0000, 9, 9),
        (0x100_1000, 0xFFFF_FFFF_8100_1000, 8, 0x3008),
    ]
    assert ctx.mem.read(0x100_0000, 9) == KERNEL_TEXT
    assert ctx.mem.read(0x100_1000, 8) == (42).to_bytes(8, "little")
    assert ctx.mem.read(0x100_1008, 0x3000) == bytes(0x3000)
    assert ctx.mem.read(0x100_4008, 8) == b"\xaa" * 8  # past p_memsz: untouched
    # The same bytes through the page tables at the link-time virtual address.
    assert ctx.read_virtual(KERNEL_TEXT_VA + 3, 6) == KERNEL_TEXT[3:]
    helper = image.symbols.get("kernel_helper")
    assert (helper.address, helper.size, helper.type) == (KERNEL_TEXT_VA + 3, 6, "T")
    assert image.symbols.get("kernel_counter").type == "D"
    assert image.symbols.address("scratch") == KERNEL_TEXT_VA + 0x1008


def test_load_executable_into_bare_physical_memory(build):
    mem = PhysicalMemory()
    mem.add_zero(0x100_0000, 0x10_0000)
    load_executable(mem, build / "kernel.elf")
    assert mem.read(0x100_0000, 9) == KERNEL_TEXT


def test_load_executable_unbacked_segment_is_named_and_nothing_written(build):
    mem = PhysicalMemory()
    mem.add_zero(0x100_0000, 0x1000)  # text page only: segment 1 (.data/.bss) has no RAM
    with pytest.raises(
        ElfLoadError, match=r"PT_LOAD segment 1 .*unbacked physical memory at 0x1001000"
    ):
        load_executable(mem, build / "kernel.elf")
    assert mem.read(0x100_0000, 9) == bytes(9)


def test_load_executable_rejects_other_files(build, tmp_path):
    with pytest.raises(ElfLoadError, match=r"is ET_REL, expected ET_EXEC \(use load_relocatable\)"):
        load_executable(PhysicalMemory(), build / "misc.o")
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(ElfLoadError, match=r"junk\.elf: malformed ELF file"):
        load_executable(PhysicalMemory(), junk)
    with pytest.raises(ElfLoadError, match="cannot read"):
        load_executable(PhysicalMemory(), tmp_path / "missing.elf")


# -- relocatable objects -------------------------------------------------------------------------


def test_relocatable_layout_and_data_relocations(build):
    ctx = kernel_context()
    module = load_relocatable(ctx, build / "misc.o", LOW_BASE)
    # .text (1 byte) at the base; .data aligned to 64; empty .bss; COMMON aligned to 16.
    assert module.section(".text").address == LOW_BASE
    assert module.section(".data").address == LOW_BASE + 0x40
    common = module.symbols.get("common_buf")
    assert (common.address, common.size, common.type) == (LOW_BASE + 0x60, 24, "B")
    assert module.size == 0x60 + 24
    table = ctx.read_virtual(LOW_BASE + 0x40, 28)
    # R_X86_64_64: entry; weak undefined: 0; COMMON; R_X86_64_32: entry (fits below 4 GiB).
    assert u64s(table[:24]) == [LOW_BASE, 0, LOW_BASE + 0x60]
    assert table[24:] == LOW_BASE.to_bytes(4, "little")
    assert ctx.read_virtual(LOW_BASE, 1) == b"\xc3"
    assert [r.type_name for r in module.relocations] == ["R_X86_64_64"] * 3 + ["R_X86_64_32"]


@needs_gcc
def test_module_resolves_kernel_symbols(build):
    ctx = kernel_context()
    image = load_executable(ctx, build / "kernel.elf")
    module = load_relocatable(ctx, build / "module.o", MODULE_BASE, symbols=image.symbols)
    entry = module.symbols.get("module_entry")
    assert (entry.address, entry.type, entry.module) == (MODULE_BASE, "T", "module")
    assert module.section(".modinfo").address > module.section(".text").address
    assert ctx.read_virtual(module.section(".modinfo").address, 12) == b"license=GPL\0"
    # Each applied value is S + A - P with A = -4 (rel32 measured from the next byte).
    by_symbol = {r.symbol: r for r in module.relocations}
    helper = by_symbol["kernel_helper"]
    assert helper.type_name == "R_X86_64_PLT32"
    assert helper.value == (KERNEL_TEXT_VA + 3 - 4 - helper.address) % (1 << 32)
    assert ctx.read_virtual(helper.address, 4) == helper.value.to_bytes(4, "little")
    # Capstone, reading the relocated code, finds the kernel's function and variable.
    symbols = SymbolTable.combine([image.symbols, module.symbols])
    texts = [i.text for i in disassemble(ctx.read_virtual, MODULE_BASE, 6, symbols)]
    assert "call 0xffffffff81000003 <kernel_helper>" in texts
    assert any(t.endswith("# 0xffffffff81001000 <kernel_counter>") for t in texts)


@needs_gcc
def test_function_pointer_table_holds_relocated_addresses(build):
    ctx = kernel_context()
    module = load_relocatable(ctx, build / "cfuncs.o", MODULE_BASE)
    ops = module.symbols.get("ops")
    names = ["op_square", "op_negate", "op_twice", "op_shift"]  # the C initializer's order
    assert u64s(ctx.read_virtual(ops.address, 32)) == [module.symbols.address(n) for n in names]
    assert all(module.symbols.address(n) >> 32 == 0xFFFF_FFFF for n in names)


def test_undefined_symbol(build):
    with pytest.raises(UndefinedSymbolError) as info:
        load_relocatable(kernel_context(), build / "undef.o", MODULE_BASE, symbols={"other": 1})
    assert isinstance(info.value, ElfLoadError)
    assert str(info.value) == (
        f"{build / 'undef.o'}: undefined symbol 'missing_fn' (relocation at .text+0x1)"
    )


@needs_gcc
def test_undefined_kernel_symbol_names_symbol_and_section(build):
    kernel_only = {"kernel_counter": 0xFFFF_FFFF_8100_1000}
    with pytest.raises(UndefinedSymbolError) as info:
        load_relocatable(kernel_context(), build / "module.o", MODULE_BASE, symbols=kernel_only)
    assert (info.value.symbol, info.value.section) == ("kernel_helper", ".text")
    assert "undefined symbol 'kernel_helper' (relocation at .text+0x" in str(info.value)


def test_unsupported_relocation_type(build):
    with pytest.raises(UnsupportedRelocationError) as info:
        load_relocatable(kernel_context(), build / "gotoff.o", MODULE_BASE)
    assert info.value.type_name == "R_X86_64_GOTOFF64"
    assert str(info.value).endswith("unsupported relocation R_X86_64_GOTOFF64 at .data+0x0")


def test_relocation_32_overflow_at_kernel_address(build):
    ctx = kernel_context()
    with pytest.raises(RelocationOverflowError) as info:
        load_relocatable(ctx, build / "misc.o", MODULE_BASE)
    err = info.value
    assert (err.type_name, err.symbol, err.section, err.offset) == (
        "R_X86_64_32", "entry", ".data", 0x18,
    )  # fmt: skip
    assert err.value == MODULE_BASE
    assert ctx.read_virtual(MODULE_BASE, 1) == b"\0"  # nothing written


@needs_gcc
def test_relocation_pc32_overflow_far_symbol(build):
    # The direct map is ~127 TiB below the module: no rel32 reaches it (even modulo 2**64).
    far = {"kernel_helper": 0xFFFF_8880_0000_1000, "kernel_counter": 0xFFFF_8880_0000_2000}
    with pytest.raises(RelocationOverflowError, match=r"R_X86_64_PLT32 against 'kernel_helper'"):
        load_relocatable(kernel_context(), build / "module.o", MODULE_BASE, symbols=far)


@needs_gcc
def test_relocation_32s_overflow_outside_top_2gib(build):
    # -mcmodel=kernel code addresses its data as sign-extended 32-bit absolutes.
    with pytest.raises(RelocationOverflowError, match="R_X86_64_32S"):
        load_relocatable(kernel_context(), build / "cfuncs.o", 0x1_0000_0000)


def test_unwritable_target_names_section(build):
    with pytest.raises(ElfLoadError, match=r"cannot write section \.text at 0x300000: "):
        load_relocatable(kernel_context(), build / "misc.o", UNMAPPED_VA)


def test_relocatable_rejects_executable(build):
    with pytest.raises(ElfLoadError, match=r"is ET_EXEC, expected ET_REL \(use load_executable\)"):
        load_relocatable(kernel_context(), build / "kernel.elf", MODULE_BASE)


@needs_gcc
def test_module_function_called_returns_kernel_result(build):
    from kctx_debug.emulator.call import call
    from kctx_debug.emulator.machine import Machine

    ctx = kernel_context()
    image = load_executable(ctx, build / "kernel.elf")
    module = load_relocatable(ctx, build / "module.o", MODULE_BASE, symbols=image.symbols)
    machine = Machine.from_context(ctx)
    entry = module.symbols.address("module_entry")
    # module_entry(x) = kernel_helper(x) + kernel_counter = (3 * x + 100) + 42
    assert call(machine, entry, 5) == 157
    assert call(machine, entry, -50) == (3 * -50 + 142) % (1 << 64)
    assert machine.reg_read("rip") == KERNEL_TEXT_VA  # the snapshot's RIP, restored
