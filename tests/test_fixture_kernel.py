"""The fixture kernel (fixtures/src/kernel.S) built, loaded and run at CPL0 with paging.

Independent truth: the checksum and every register the kernel leaves are recomputed
in Python from the ELF's own bytes (pyelftools, not the emulator); the instruction
count is the one the source's header derives by hand (841); the Accessed/Dirty bits
are the ones the SDM says a walk for each access sets (vol. 3A 4.8).

``kernel_context`` is also the fixture other emulator tests start from.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from kctx_debug.emulator.control import StopKind
from kctx_debug.emulator.machine import Machine
from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.pagetables.entry import PteFlag, paging_mode
from kctx_debug.physmem import PAGE_SIZE, PhysicalMemory
from kctx_debug.snapshot import CpuState, Segment, Snapshot, TableRegister

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KERNEL_ELF = FIXTURES / "bin" / "kernel.elf"
INSTRUCTIONS = 5 + 64 * 13 + 4  # fixtures/src/kernel.S header
MASK64 = (1 << 64) - 1

# Physical layout of the test snapshot (the kernel itself loads at 16 MiB).
RAM_SIZE = 0x200_0000
TABLE_AREA, TABLE_AREA_SIZE = 0x10_0000, 0x4_0000
GDT_PHYS, GDT_VA = 0x20_0000, 0xFFFF_FFFF_8200_0000
# Linux's GDT (arch/x86/include/asm/segment.h): kernel CS 0x10, DS 0x18, user DS 0x2b, CS 0x33.
GDT = (
    0,
    0x00CF_9B00_0000_FFFF,  # 0x08 kernel code32
    0x00AF_9B00_0000_FFFF,  # 0x10 kernel code64
    0x00CF_9300_0000_FFFF,  # 0x18 kernel data
    0x00CF_FB00_0000_FFFF,  # 0x23 user code32
    0x00CF_F300_0000_FFFF,  # 0x2b user data
    0x00AF_FB00_0000_FFFF,  # 0x33 user code64
)
# CR0 PE|MP|ET|NE|WP|AM|PG; CR4 PAE|PGE|OSFXSR|OSXMMEXCPT|SMEP; EFER SCE|LME|LMA|NXE.
CR0, CR4, EFER = 0x8005_0033, 0x10_06A0, 0xD01
STAR = 0x0023_0010_0000_0000  # SYSCALL CS 0x10, SYSRET base 0x23 (Linux)
KERNEL_CS_AR, KERNEL_SS_AR = 0xA09B, 0xC093  # VMCS access rights: code64 DPL0, data DPL0


@dataclass(frozen=True)
class LoadedKernel:
    ctx: KernelContext
    symbols: dict[str, int]
    segments: tuple[tuple[int, int, int, int], ...]  # (vaddr, paddr, memsz, p_flags)
    table: tuple[int, ...]


def load_segments(mem: PhysicalMemory, path: Path) -> tuple[dict[str, int], tuple, int]:
    """PT_LOAD segments into ``mem`` at p_paddr; (symbols, segments, entry)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            data = seg.data() + bytes(seg["p_memsz"] - seg["p_filesz"])
            mem.write(seg["p_paddr"], data)
            segments.append((seg["p_vaddr"], seg["p_paddr"], seg["p_memsz"], seg["p_flags"]))
        symbols = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
        return symbols, tuple(segments), elf.header["e_entry"]


def map_segments(tables: PageTableBuilder, segments) -> None:
    """Each segment's pages with its permissions: W -> RW, no X -> XD (SDM vol. 3A 4.6)."""
    for vaddr, paddr, memsz, flags in segments:
        size = -(-memsz // PAGE_SIZE) * PAGE_SIZE
        perms = PteFlag.G
        if flags & P_FLAGS.PF_W:
            perms |= PteFlag.RW
        if not flags & P_FLAGS.PF_X:
            perms |= PteFlag.XD
        tables.map(vaddr, paddr, size, PAGE_SIZE, perms)


def kernel_context(path: Path = KERNEL_ELF) -> LoadedKernel:
    """A CPL0 snapshot of the fixture kernel about to run ``_start`` (built in code)."""
    mem = PhysicalMemory()
    mem.add_zero(0, RAM_SIZE)
    symbols, segments, entry = load_segments(mem, path)
    tables = PageTableBuilder(mem, paging_mode(False), TABLE_AREA, TABLE_AREA_SIZE)
    map_segments(tables, segments)
    mem.write(GDT_PHYS, b"".join(struct.pack("<Q", d) for d in GDT))
    tables.map(GDT_VA, GDT_PHYS, PAGE_SIZE, PAGE_SIZE, PteFlag.RW | PteFlag.G | PteFlag.XD)
    cpu = CpuState(
        regs={"rip": entry, "rflags": 0x2},
        cr0=CR0,
        cr3=tables.root,
        cr4=CR4,
        msrs={"efer": EFER, "star": STAR},
        segments={
            "cs": Segment(0x10, 0, 0xFFFF_FFFF, KERNEL_CS_AR),
            "ss": Segment(0x18, 0, 0xFFFF_FFFF, KERNEL_SS_AR),
        },
        gdtr=TableRegister(GDT_VA, len(GDT) * 8 - 1),
    )
    table_phys = symbols["table"] - segments[1][0] + segments[1][1]
    table = struct.unpack("<64I", mem.read(table_phys, 256))
    return LoadedKernel(KernelContext(Snapshot(cpu, ()), mem), symbols, segments, table)


def mix(h: int, x: int) -> int:
    """kernel.S's mix, in Python."""
    h = (h * 31 + x) & MASK64
    return h ^ (h >> 7)


def reference_checksum(table: tuple[int, ...]) -> int:
    h = 0
    for x in table:
        h = mix(h, x)
    return h


# -- the build ---------------------------------------------------------------------


def test_table_is_the_documented_sequence():
    kernel = kernel_context()
    assert kernel.table == tuple((0x9E3779B9 * (i + 1)) & 0xFFFF_FFFF for i in range(64))


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="needs GNU as/ld")
def test_build_is_deterministic_and_matches_committed_elf(tmp_path):
    subprocess.run(["sh", str(FIXTURES / "build.sh"), str(tmp_path)], check=True)
    assert (tmp_path / "kernel.elf").read_bytes() == KERNEL_ELF.read_bytes()


# -- running it ----------------------------------------------------------------------


def test_kernel_runs_to_hlt_with_reference_registers():
    kernel = kernel_context()
    machine = Machine.from_context(kernel.ctx)
    assert machine.report.warnings == ()
    event = machine.run(count=100_000)
    expected = reference_checksum(kernel.table)
    sym = kernel.symbols
    assert event.kind is StopKind.HALT
    assert event.pc == sym["halt"]
    assert event.rip == sym["halt"] + 1
    assert (event.executed, event.icount, machine.icount) == (INSTRUCTIONS,) * 3
    regs = machine.registers()
    assert regs["rax"] == regs["rbx"] == expected
    assert (regs["rcx"], regs["r8"], regs["rdx"]) == (64, 64, kernel.table[-1])
    assert regs["rsi"] == sym["table"]
    assert regs["rsp"] == sym["stack_top"]
    assert regs["rip"] == sym["halt"] + 1
    assert machine.cpl == 0
    assert machine.read_virtual(sym["result"], 8) == struct.pack("<Q", expected)
    # Unicorn wrote the snapshot's own buffer (mem_map_ptr: no copy).
    data_va, data_pa = kernel.segments[2][:2]
    assert kernel.ctx.mem.read_u64(sym["result"] - data_va + data_pa) == expected


def test_count_split_across_runs_is_exact():
    kernel = kernel_context()
    machine = Machine.from_context(kernel.ctx)
    first = machine.run(count=300)
    assert (first.kind, first.executed, machine.icount) == (StopKind.BUDGET, 300, 300)
    # 5 setup instructions, then 13 per element: 300 = 5 + 22 * 13 + 9, so 22 elements
    # are done and the 23rd has run mov, call and 7 of mix's 8: next is mix's `ret`,
    # 0x13 bytes in (push 1, imul 4, add 3, mov 3, shr 4, xor 3, pop 1).
    assert machine.reg_read("r8") == 22
    assert machine.reg_read("rip") == kernel.symbols["mix"] + 0x13
    rest = machine.run()
    assert (rest.kind, rest.executed, machine.icount) == (StopKind.HALT, INSTRUCTIONS - 300, 841)
    assert machine.reg_read("rax") == reference_checksum(kernel.table)


def test_accessed_and_dirty_bits_set_by_the_run():
    kernel = kernel_context()
    machine = Machine.from_context(kernel.ctx)
    assert machine.page_table_changes() == []
    machine.run(count=100_000)
    changes = {(c.level.name, c.new & ~c.old) for c in machine.page_table_changes()}
    a, d = int(PteFlag.A), int(PteFlag.D)
    # One path (PML4E, PDPTE, PDE) serves all three pages; text and rodata are read
    # (A), the data page is written (A and D).
    assert sorted(changes) == sorted(
        {("PML4E", a), ("PDPTE", a), ("PDE", a), ("PTE", a), ("PTE", a | d)}
    )
    gained = {c.address: c.new & ~c.old for c in machine.page_table_changes()}
    sym = kernel.symbols

    def pte(va: int) -> int:
        return kernel.ctx.translate(va).steps[-1].entry_phys

    # text and rodata read; `result` (data page 1) and the stack (page 2) written.
    assert gained[pte(sym["_start"])] == a
    assert gained[pte(sym["table"])] == a
    assert gained[pte(sym["result"])] == a | d
    assert gained[pte(sym["stack_top"] - 8)] == a | d
    assert pte(GDT_VA) not in gained  # the GDT was only read by the trampoline's copy
    assert all(c.old & ~c.new == 0 for c in machine.page_table_changes())
