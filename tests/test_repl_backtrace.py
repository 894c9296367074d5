"""bt: CFI from an ELF's .eh_frame where frame pointers cannot unwind, prologues, traps.

The kernel below is assembled at test time (GNU as turns the .cfi directives into
.eh_frame): ``outer`` keeps a garbage RBP and moves RSP by 24, so only its CFI knows
where its return address is.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_fixture_kernel import CR0, CR4, EFER, GDT, GDT_PHYS, GDT_VA, load_segments, map_segments

from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.pagetables.entry import PteFlag, paging_mode
from kctx_debug.physmem import PAGE_SIZE, PhysicalMemory
from kctx_debug.repl.backtrace import DWARF_RSP, CfiRow, CfiTable
from kctx_debug.repl.commands import default_registry
from kctx_debug.repl.dispatch import Dispatcher
from kctx_debug.repl.session import Session
from kctx_debug.snapshot import CpuState, Segment, Snapshot, SymbolSource, TableRegister

SOURCE = """
        .intel_syntax noprefix
        .text
        .globl _start, outer, inner
_start:
        .cfi_startproc
        .cfi_undefined rip
        lea     rsp, [rip + stack_top]
        call    outer
after_outer:
        hlt
        .cfi_endproc
outer:
        .cfi_startproc
        sub     rsp, 24
        .cfi_adjust_cfa_offset 24
        movabs  rbp, 0x1234567
        call    inner
after_inner:
        add     rsp, 24
        .cfi_adjust_cfa_offset -24
        ret
        .cfi_endproc
inner:
        .cfi_startproc
        push    rbx
        .cfi_adjust_cfa_offset 8
        .cfi_offset rbx, -16
        sub     rsp, 8
        .cfi_adjust_cfa_offset 8
        mov     eax, 1
        xor     ebx, ebx
.Lhere:                                 /* inner + 12 */
        test    eax, eax
        jz      .Lhere
        add     rsp, 8
        .cfi_adjust_cfa_offset -8
        pop     rbx
        .cfi_adjust_cfa_offset -8
        ret
        .cfi_endproc

        .data
        .balign 16
        .space  4096
stack_top:
"""
KERNEL_VA, KERNEL_PA = 0xFFFFFFFF81000000, 0x1000000
# push rbx (1 byte), sub rsp, 8 (4), mov eax, 1 (5), xor ebx, ebx (2).
HERE = 12

pytestmark = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None, reason="needs GNU as and ld"
)


@pytest.fixture(scope="module")
def elf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cfi")
    (folder / "k.S").write_text(SOURCE)
    subprocess.run(["as", "--64", "-o", folder / "k.o", folder / "k.S"], check=True)
    script = (
        f"SECTIONS {{ . = {KERNEL_VA:#x}; .text : AT({KERNEL_PA:#x}) {{ *(.text) }} "
        ". = ALIGN(4096); .eh_frame : { *(.eh_frame) } "
        ". = ALIGN(4096); .data : { *(.data) } }"
    )
    (folder / "k.ld").write_text(script)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "--build-id=none", "-nostdlib", "-static", "-T",
         folder / "k.ld", "-o", folder / "k.elf", folder / "k.o"],
        check=True,
    )  # fmt: skip
    return folder / "k.elf"


def _session(elf: Path) -> Session:
    mem = PhysicalMemory()
    mem.add_zero(0, 0x2000000)
    _symbols, segments, entry = load_segments(mem, elf)
    tables = PageTableBuilder(mem, paging_mode(False), 0x100000, 0x40000)
    map_segments(tables, segments)
    mem.write(GDT_PHYS, b"".join(d.to_bytes(8, "little") for d in GDT))
    tables.map(GDT_VA, GDT_PHYS, PAGE_SIZE, PAGE_SIZE, PteFlag.RW | PteFlag.G | PteFlag.XD)
    cpu = CpuState(
        regs={"rip": entry, "rflags": 0x2},
        cr0=CR0, cr3=tables.root, cr4=CR4, msrs={"efer": EFER},
        segments={"cs": Segment(0x10, 0, 0xFFFFFFFF, 0xA09B),
                  "ss": Segment(0x18, 0, 0xFFFFFFFF, 0xC093)},
        gdtr=TableRegister(GDT_VA, len(GDT) * 8 - 1),
    )  # fmt: skip
    snap = Snapshot(
        cpu, (), symbols=(SymbolSource("elf", path=elf.name),), origin=elf.with_name("k.json")
    )
    session = Session(KernelContext(snap, mem))
    session.registry = default_registry()
    return session


def test_eh_frame_rows_follow_the_directives(elf):
    table = CfiTable.from_elf(elf)
    assert table is not None and len(table) == 3
    session = _session(elf)
    inner = session.symbols.address("inner")
    # At entry the CFA is RSP + 8 with RA at CFA - 8 (System V psABI); after push rbx
    # and sub rsp, 8 the CFA is RSP + 24.
    assert table.row(inner) == CfiRow(DWARF_RSP, 8, -8, None)
    assert table.row(inner + HERE) == CfiRow(DWARF_RSP, 24, -8, None)
    assert table.row(session.symbols.address("outer") + 4) == CfiRow(DWARF_RSP, 32, -8, None)
    assert table.row(0x1000) is None
    session.close()


def test_bt_unwinds_through_a_function_without_a_frame_pointer(elf):
    session = _session(elf)
    repl = Dispatcher(session.registry, session)
    repl.run("set context off")
    repl.run(f"until inner + {HERE}")
    sym = session.symbols.address
    frames = [line.split()[1:3] for line in str(repl.run("bt")).splitlines()]
    assert frames == [
        [f"{sym('inner') + HERE:#018x}", f"<inner+{HERE:#x}>"],
        [f"{sym('after_inner'):#018x}", "<after_inner>"],
        [f"{sym('after_outer'):#018x}", "<after_outer>"],
    ]
    assert str(repl.run("bt")).splitlines()[2].endswith("(cfi)")
    # Without the CFI: inner's prologue (push, sub) still finds its caller, but outer's
    # garbage RBP ends the walk there.
    session._cfi = []
    lines = str(repl.run("bt")).splitlines()
    assert len(lines) == 2 and lines[1].endswith("(prologue)")
    session.close()


def test_elf_without_eh_frame_has_no_table():
    from test_fixture_kernel import KERNEL_ELF

    assert CfiTable.from_elf(KERNEL_ELF) is None
