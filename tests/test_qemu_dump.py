"""QEMU ELF-core import on synthetic cores built here (tests/qemu/elfcore.py).

The expected values are hand-computed: VMCS access rights from the descriptor
high dwords (SDM vol. 3C 25.4.1), EFER bits from SDM vol. 3A 2.2.1, page tables
written entry by entry (SDM vol. 3A 4.5), IDT gates byte by byte (6.14.1).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from qemu.elfcore import CpuNote, Load, write_core

from kctx_debug.errors import SnapshotError, SymbolError
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.qemu_dump import (
    access_rights,
    import_qemu_dump,
    is_qemu_dump,
    kaslr_offset,
    parse_qemu_dump,
    read_qemu_dump,
)
from kctx_debug.snapshot import MemoryRange, RangeKind, Segment, SymbolSource, TableRegister
from kctx_debug.snapshot_io import load_snapshot
from kctx_debug.symbols import SymbolTable

# Paging-entry bits (SDM vol. 3A Table 4-19), spelled out for the fixture.
P, RW, XD = 1, 2, 1 << 63
TEXT_VA = 0xFFFFFFFF81000000  # PML4 511, PDPT 510, PD 8, PT 0
TABLES_VA = TEXT_VA + 0x2000  # PT 2: IDT at +0, GDT at +0x800, TSS at +0xC00
IDT_VA, GDT_VA, TSS_VA = TABLES_VA, TABLES_VA + 0x800, TABLES_VA + 0xC00
TEXT_BYTES = bytes(range(1, 33))
PF_HANDLER, DE_HANDLER = TEXT_VA + 0x100, TEXT_VA + 0x40
SLIDE = 0x1000000
RSP0, IST1 = TEXT_VA + 0x1FF8, TEXT_VA + 0x1FF0

CPU0_REGS = {name: 0x1000 + i for i, name in enumerate(
    ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}  # fmt: skip
CPU0_REGS.update(rip=TEXT_VA + 0x10, rflags=0x246)
CPU1_REGS = {**{k: v + 0x100 for k, v in CPU0_REGS.items()}, "rip": TEXT_VA + 0x20}


def _segments(**over: tuple[int, int, int, int]) -> dict[str, tuple[int, int, int, int]]:
    segs = {
        "cs": (0x10, 0xFFFFFFFF, 0x00AF9B00, 0),
        "ss": (0x18, 0xFFFFFFFF, 0x00CF9300, 0),
        "ds": (0, 0, 0, 0),
        # base 31:24 = 0xab, limit 19:16 = 0xf, base 23:16 = 0xcd must not leak into the rights
        "es": (0x2B, 0xFFFFFFFF, 0xABCFF3CD, 0),
        "fs": (0, 0xFFFFFFFF, 0, 0x7F0000001000),
        "gs": (0, 0xFFFFFFFF, 0, 0xFFFF888000100000),
        "ldt": (0, 0, 0x8200, 0),
        "tr": (0x40, 0x67, 0x8900, TSS_VA),  # QEMU's cached "available" type
        "gdt": (0, 0x4F, 0, GDT_VA),
        "idt": (0, 0xFF, 0, IDT_VA),
    }
    segs.update(over)
    return segs


CR = (0x80050033, 0, 0xDEADB000, 0x1000, 0xA0)  # CR4 = PAE|PGE


def _gate(handler: int, ist: int = 0) -> bytes:
    """A present DPL0 interrupt gate, selector 0x10 (SDM vol. 3A Figure 6-8)."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, ist, 0x8E,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)  # fmt: skip


def _low_memory(xd: bool) -> bytes:
    """0x0-0x8000: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000, IDT/GDT/TSS page 0x5000."""
    mem = bytearray(0x8000)
    nx = XD if xd else 0
    struct.pack_into("<Q", mem, 0x1000 + 511 * 8, 0x2000 | P | RW)
    struct.pack_into("<Q", mem, 0x2000 + 510 * 8, 0x3000 | P | RW)
    struct.pack_into("<Q", mem, 0x3000 + 8 * 8, 0x4000 | P | RW)
    struct.pack_into("<Q", mem, 0x4000 + 0 * 8, 0x100000 | P | RW)
    struct.pack_into("<Q", mem, 0x4000 + 1 * 8, 0x101000 | P | RW | nx)
    struct.pack_into("<Q", mem, 0x4000 + 2 * 8, 0x5000 | P | RW | nx)
    mem[0x5000:0x5010] = _gate(DE_HANDLER)
    mem[0x5000 + 14 * 16 : 0x5000 + 15 * 16] = _gate(PF_HANDLER)
    gdt = 0x5800
    struct.pack_into("<Q", mem, gdt + 0x10, 0x00AF9B000000FFFF)
    struct.pack_into("<Q", mem, gdt + 0x18, 0x00CF93000000FFFF)
    # Busy 64-bit TSS at 0x40 (type 0xB), base TSS_VA, limit 0x67 (SDM vol. 3A Figure 7-4).
    low = 0x67 | (TSS_VA & 0xFFFFFF) << 16 | 0x8B << 40 | ((TSS_VA >> 24) & 0xFF) << 56
    struct.pack_into("<QQ", mem, gdt + 0x40, low, TSS_VA >> 32)
    struct.pack_into("<IQQQ", mem, 0x5C00, 0, RSP0, 0, 0)  # reserved, RSP0-2
    struct.pack_into("<Q", mem, 0x5C00 + 0x24, IST1)
    return bytes(mem)


def _cpus(**kw) -> list[CpuNote]:
    kw0 = {"kernel_gs_base": 0xFFFF888007A00000, **kw}
    return [
        CpuNote(CPU0_REGS, _segments(), CR, **kw0),
        CpuNote(CPU1_REGS, _segments(), (*CR[:2], 0x1234000, *CR[3:]), **kw),
    ]


def _loads(xd: bool = True) -> list[Load]:
    text = TEXT_BYTES + bytes(0x2000 - len(TEXT_BYTES))
    return [
        Load(0x0, _low_memory(xd)),
        Load(0x100000, text),
        Load(0x200000, b"\xaa" * 0x1000, memsz=0x3000),  # 8 KiB of zeros past p_filesz
    ]


@pytest.fixture
def core(tmp_path: Path) -> Path:
    path = tmp_path / "guest.core"
    write_core(path, _cpus(), _loads())
    return path


# -- parsing ----------------------------------------------------------------------------------


def test_is_qemu_dump(core: Path, tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_text("{}")
    exe = tmp_path / "exe"
    write_core(exe, _cpus(), _loads(), e_type=2)
    assert is_qemu_dump(core)
    assert not is_qemu_dump(tmp_path / "doc.json")
    assert not is_qemu_dump(exe)
    assert not is_qemu_dump(tmp_path / "missing")


def test_memory_ranges_point_into_the_elf_unaligned(core: Path, tmp_path: Path) -> None:
    layout = write_core(core, _cpus(), _loads())
    snap = read_qemu_dump(core)
    assert snap.memory == (
        MemoryRange(0x0, 0x8000, RangeKind.FILE, path="guest.core", offset=layout.load_offsets[0]),
        MemoryRange(0x100000, 0x2000, RangeKind.FILE, path="guest.core",
                    offset=layout.load_offsets[1]),
        MemoryRange(0x200000, 0x1000, RangeKind.FILE, path="guest.core",
                    offset=layout.load_offsets[2]),
        MemoryRange(0x201000, 0x2000, RangeKind.ZERO),
    )  # fmt: skip
    assert all(offset % 0x1000 for offset in layout.load_offsets)
    assert snap.origin == core.absolute()
    mem = snap.open_memory()
    try:
        assert mem.read(0x100000, 32) == TEXT_BYTES
        assert mem.read(0x200FFF, 2) == b"\xaa\x00"
        assert mem.read_u64(0x1000 + 511 * 8) == 0x2000 | P | RW
    finally:
        mem.close()


def test_cpu0_every_field(core: Path) -> None:
    cpu = read_qemu_dump(core).cpu
    assert cpu.regs == CPU0_REGS
    assert (cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.cr8) == (0x80050033, 0xDEADB000, 0x1000,
                                                              0xA0, 0)  # fmt: skip
    assert cpu.segments == {
        "cs": Segment(0x10, 0, 0xFFFFFFFF, 0xA09B),  # G D/B=0 L P DPL0 S type B
        "ss": Segment(0x18, 0, 0xFFFFFFFF, 0xC093),
        "ds": Segment(0, 0, 0, 0),
        "es": Segment(0x2B, 0, 0xFFFFFFFF, 0xC0F3),
        "fs": Segment(0, 0x7F0000001000, 0xFFFFFFFF, 0),
        "gs": Segment(0, 0xFFFF888000100000, 0xFFFFFFFF, 0),
    }
    assert cpu.ldtr == Segment(0, 0, 0, 0x82)
    assert cpu.tr == Segment(0x40, TSS_VA, 0x67, 0x89)  # kept "available", not "fixed"
    assert cpu.gdtr == TableRegister(GDT_VA, 0x4F)
    assert cpu.idtr == TableRegister(IDT_VA, 0xFF)
    # LME (bit 8) | LMA (bit 10) | NXE (bit 11) = 0xd00
    assert cpu.msrs == {
        "fs_base": 0x7F0000001000,
        "gs_base": 0xFFFF888000100000,
        "kernel_gs_base": 0xFFFF888007A00000,
        "efer": 0xD00,
    }


def test_source_records_inferred_and_missing(core: Path) -> None:
    source = read_qemu_dump(core).source
    assert source == {
        "tool": "qemu dump-guest-memory",
        "file": "guest.core",
        "cpu": 0,
        "cpus": 2,
        "qemu_cpu_state_size": 0x1B8,
        "inferred": ["msrs.efer.LME", "msrs.efer.LMA", "msrs.efer.NXE"],
        "not_in_dump": ["msrs.efer.SCE", "cr8", "msrs.star", "msrs.lstar", "msrs.cstar",
                        "msrs.sfmask", "msrs.pat", "msrs.tsc_aux", "msrs.pkru"],
    }  # fmt: skip


def test_cpu_selection(core: Path) -> None:
    cpu = read_qemu_dump(core, cpu=1).cpu
    assert cpu.regs == CPU1_REGS
    assert cpu.cr2 == 0x1234000
    assert read_qemu_dump(core, cpu=1).source["cpu"] == 1
    for bad in (2, -1):
        with pytest.raises(SnapshotError, match=r"no CPU -?\d: the dump has 2 \(0\.\.1\)"):
            read_qemu_dump(core, cpu=bad)


def test_short_qemu_state_has_no_kernel_gs_base(tmp_path: Path) -> None:
    path = tmp_path / "old.core"
    write_core(path, _cpus(kernel_gs_base=None), _loads())
    snap = read_qemu_dump(path)
    assert "kernel_gs_base" not in snap.cpu.msrs
    assert snap.source["qemu_cpu_state_size"] == 0x1B0
    assert parse_qemu_dump(path).cpus[1].kernel_gs_base is None


def test_prstatus_notes_are_read(core: Path) -> None:
    dump = parse_qemu_dump(core)
    assert [p["pid"] for p in dump.prstatus] == [1, 2]
    assert dump.prstatus[1]["rip"] == TEXT_VA + 0x20
    assert dump.prstatus[0]["gs_base"] == 0xFFFF888000100000
    assert dump.header.e_ehsize == 8


def test_access_rights_drop_base_and_limit_bits() -> None:
    assert access_rights(0x00AF9B00) == 0xA09B
    assert access_rights(0xFFFFFFFF) == 0xF0FF  # VMCS bits 11:8 stay reserved (zero)
    assert access_rights(0x000F0000 | 0xFF0000FF) == 0


# -- inference ----------------------------------------------------------------------------------


def test_translation_needs_the_inferred_nxe(core: Path) -> None:
    ctx = KernelContext.from_snapshot(read_qemu_dump(core))
    try:
        assert ctx.read_virtual(TEXT_VA, 32) == TEXT_BYTES
        assert ctx.virt_to_phys(TEXT_VA + 0x1234) == 0x101234
        result = ctx.translate(TEXT_VA + 0x1000)
        assert (result.phys, result.executable, result.writable) == (0x101000, False, True)
    finally:
        ctx.close()


def test_no_xd_bits_no_nxe(tmp_path: Path) -> None:
    path = tmp_path / "noxd.core"
    write_core(path, _cpus(), _loads(xd=False))
    snap = read_qemu_dump(path)
    assert snap.cpu.msrs["efer"] == 0x500
    assert snap.source["inferred"] == ["msrs.efer.LME", "msrs.efer.LMA"]


def test_wide_idt_base_means_long_mode_without_cs_l(tmp_path: Path) -> None:
    path = tmp_path / "compat.core"
    compat_cs = (0x23, 0xFFFFFFFF, 0x00CFFB00, 0)  # 32-bit user code: L=0
    cpus = [CpuNote(CPU0_REGS, _segments(cs=compat_cs), CR)]
    write_core(path, cpus, _loads())
    snap = read_qemu_dump(path)
    assert snap.cpu.segments["cs"].attributes == 0xC0FB
    assert snap.cpu.msrs["efer"] == 0xD00


def test_legacy_paging_infers_nothing(tmp_path: Path) -> None:
    path = tmp_path / "legacy.core"
    low = {"cs": (0x08, 0xFFFFFFFF, 0x00CF9B00, 0), "gdt": (0, 0x4F, 0, 0x5800),
           "idt": (0, 0xFF, 0, 0x5000)}  # fmt: skip
    write_core(path, [CpuNote(CPU0_REGS, _segments(**low), CR)], _loads())
    snap = read_qemu_dump(path)
    assert "efer" not in snap.cpu.msrs
    assert snap.source["inferred"] == []
    assert snap.source["not_in_dump"][0] == "msrs.efer"


# -- symbols and KASLR ------------------------------------------------------------------------


def _system_map(tmp_path: Path, de_offset: int = 0x40) -> Path:
    path = tmp_path / "System.map"
    base = TEXT_VA - SLIDE
    path.write_text(
        f"{base:016x} T _text\n"
        f"{base + de_offset:016x} T asm_exc_divide_error\n"
        f"{base + 0x100:016x} T asm_exc_page_fault\n"
    )
    return path


def test_kaslr_offset_from_idt(core: Path, tmp_path: Path) -> None:
    ctx = KernelContext.from_snapshot(read_qemu_dump(core))
    try:
        table = SymbolTable.from_system_map(_system_map(tmp_path))
        assert kaslr_offset(ctx, table) == SLIDE
        assert kaslr_offset(ctx, table.relocated(SLIDE)) == 0
        with pytest.raises(SymbolError, match="disagrees with"):
            kaslr_offset(ctx, SymbolTable.from_system_map(_system_map(tmp_path, 0x60)))
        with pytest.raises(SymbolError, match="unknown symbol 'asm_exc_page_fault'"):
            kaslr_offset(ctx, SymbolTable.from_kallsyms("ffffffff81000000 T _text\n"))
    finally:
        ctx.close()


def test_symbols_recorded_with_slide(core: Path, tmp_path: Path) -> None:
    snap = read_qemu_dump(core, symbols=_system_map(tmp_path))
    assert snap.symbols == (SymbolSource("system.map", path="System.map", offset=SLIDE),)
    assert snap.source["kaslr"] == {"offset": hex(SLIDE), "method": "IDT #PF and #DE handlers"}
    ctx = KernelContext.from_snapshot(snap)
    try:
        assert ctx.symbols.address("asm_exc_page_fault") == PF_HANDLER
    finally:
        ctx.close()


def test_symbols_that_do_not_fit_are_recorded_unslid(core: Path, tmp_path: Path) -> None:
    snap = read_qemu_dump(core, symbols=_system_map(tmp_path, 0x60))
    assert snap.symbols[0].offset == 0
    assert "disagrees with" in snap.source["kaslr"]["error"]


# -- import -----------------------------------------------------------------------------------


def test_import_next_to_the_dump(core: Path) -> None:
    out = core.with_name("guest.json")
    saved = import_qemu_dump(core, out)
    assert saved.source["needs_allow_outside_paths"] is False
    loaded = load_snapshot(out)
    assert loaded.cpu == read_qemu_dump(core).cpu
    assert loaded.memory[0].path == "guest.core"
    ctx = KernelContext.from_snapshot(loaded)
    try:
        assert ctx.read_virtual(TEXT_VA, 32) == TEXT_BYTES
    finally:
        ctx.close()


def test_import_elsewhere_needs_allow_outside(core: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "guest.json"
    out.parent.mkdir()
    import_qemu_dump(core, out, cpu=1, symbols=_system_map(tmp_path))
    with pytest.raises(SnapshotError, match="leaves the snapshot's folder"):
        KernelContext.from_snapshot(load_snapshot(out))
    loaded = load_snapshot(out, allow_outside=True)
    assert loaded.source["needs_allow_outside_paths"] is True
    assert loaded.source["cpu"] == 1
    assert loaded.memory[1].path == "../guest.core"
    assert loaded.symbols == (SymbolSource("system.map", "../System.map", offset=SLIDE),)
    ctx = KernelContext.from_snapshot(loaded)
    try:
        assert ctx.read_virtual(TEXT_VA, 32) == TEXT_BYTES
        assert ctx.symbols.address("asm_exc_divide_error") == DE_HANDLER
    finally:
        ctx.close()


# -- malformed input: each error names the file and the problem -------------------------------


def _patched(path: Path, offset: int, data: bytes) -> Path:
    blob = bytearray(path.read_bytes())
    blob[offset : offset + len(data)] = data
    path.write_bytes(bytes(blob))
    return path


def _expect(path: Path, pattern: str) -> None:
    with pytest.raises(SnapshotError, match=pattern) as info:
        read_qemu_dump(path)
    assert info.value.where.startswith(str(path))


def test_truncated_load(tmp_path: Path) -> None:
    path = tmp_path / "cut.core"
    layout = write_core(path, _cpus(), _loads())
    with open(path, "r+b") as f:
        f.truncate(layout.load_offsets[2] + 0x10)
    _expect(path, r"PT_LOAD 2 \(offset 0x[0-9a-f]+, filesz 0x1000\) is past the end")


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "stub.core"
    path.write_bytes(b"\x7fELF\x02\x01\x01")
    _expect(path, r"ELF header at offset 0x0 \(\+0x40\) is past the end \(0x7\)")


def test_truncated_program_headers(tmp_path: Path) -> None:
    path = tmp_path / "ph.core"
    layout = write_core(path, _cpus(), _loads())
    with open(path, "r+b") as f:
        f.truncate(layout.phoff + 100)
    _expect(path, "program header table at offset 0x40")


def test_bad_note_sizes(core: Path, tmp_path: Path) -> None:
    layout = write_core(core, _cpus(), _loads())
    _patched(core, layout.note_offset + 4, struct.pack("<I", 0xFFFFFF00))
    _expect(core, r"note at offset 0x[0-9a-f]+ has bad sizes \(namesz 0x5, descsz 0xffffff00\)")


def test_no_qemu_note(tmp_path: Path) -> None:
    path = tmp_path / "noqemu.core"
    write_core(path, _cpus(), _loads(), qemu_name="QEMX")
    _expect(path, 'no "QEMU" CPU-state note')


def test_unknown_qemu_state_version_and_size(tmp_path: Path) -> None:
    path = tmp_path / "v2.core"
    write_core(path, _cpus(version=2), _loads())
    _expect(path, "QEMUCPUState version 2, this tool reads 1")
    write_core(path, _cpus(size=0x1C0), _loads())
    _expect(path, r"QEMUCPUState size 0x1c0, expected 0x1b0 or 0x1b8")


def test_prstatus_disagreeing_with_qemu_note(core: Path) -> None:
    layout = write_core(core, _cpus(), _loads())
    rip_at = layout.note_offset + 12 + 8 + 112 + 16 * 8  # header, "CORE\0" padded, pr_reg.rip
    _patched(core, rip_at, struct.pack("<Q", 0x1234))
    _expect(core, r"CPU 0: NT_PRSTATUS rip=0x1234 disagrees")


def test_unaligned_and_overlapping_loads(tmp_path: Path) -> None:
    path = tmp_path / "odd.core"
    write_core(path, _cpus(), [Load(0x800, b"\1" * 0x1000)])
    _expect(path, r"PT_LOAD 0 \(paddr 0x800, memsz 0x1000\) is not 4 KiB aligned")
    write_core(path, _cpus(), [*_loads(), Load(0x7000, b"\1" * 0x1000)])
    _expect(path, "PT_LOAD ranges overlap at physical 0x7000")


def test_not_a_core(core: Path, tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_bytes(b"hello world, this is no ELF file at all" * 2)
    _expect(text, "not an ELF file")
    _patched(core, 16, struct.pack("<H", 2))
    _expect(core, r"not an x86-64 core \(e_type 2, e_machine 62\)")
    _expect(tmp_path / "missing.core", "cannot read")


def test_zero_program_headers(core: Path) -> None:
    _patched(core, 56, struct.pack("<H", 0))
    _expect(core, "0 program headers")
