"""Open QEMU ``dump-guest-memory`` ELF cores as snapshots, without copying guest memory.

A dump made with ``paging: false`` is an ELF64 core: one PT_NOTE segment holding a
"CORE" ``NT_PRSTATUS`` note per vCPU, then a "QEMU" note (``QEMUCPUState``) per
vCPU in the same order, and one PT_LOAD segment per guest RAM block whose
``p_paddr`` is the guest-physical base. Each PT_LOAD becomes a ``FILE`` memory
range that points into the ELF at ``p_offset``: nothing is read until used.

>>> snap = read_qemu_dump("guest.core", cpu=0)                    # doctest: +SKIP
>>> snap.memory[0].path, hex(snap.memory[0].offset), snap.source["inferred"]
('guest.core', '0x498', ['msrs.efer.LME', 'msrs.efer.LMA', 'msrs.efer.NXE'])

.. _qemu dump inference:

What the dump lacks
-------------------
No MSR is saved except KERNEL_GS_BASE (FS/GS bases are the segment bases). EFER
is inferred where the architecture forces it, and each inferred bit is listed in
``source["inferred"]``: LME and LMA when CR0.PG and CR4.PAE are set and CS.L=1
or GDTR/IDTR hold a base above 4 GiB (only LGDT/LIDT in 64-bit mode load one);
NXE when a present paging-structure entry reachable from CR3 has XD set (with
NXE=0 that bit is reserved and every walk through it would fault). SCE, STAR,
LSTAR, PAT and CR8 are never guessed: ``source["not_in_dump"]`` names them.

.. _qemu dump failures:

Failures
--------
:class:`~kctx_debug.errors.SnapshotError` with the file name as ``where``: not an
x86-64 ELF core, a header or segment past the end of the file, a note whose sizes
overrun its segment, no "QEMU" note, an unknown ``QEMUCPUState`` version or size,
a PT_LOAD not 4 KiB aligned or overlapping another, a ``cpu`` index out of range.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arch.bits import CR0, CR4, EFER, BitField
from .arch.vectors import Vector
from .elfcore import (  # ElfHeader, ElfNote, ProgramHeader stay importable from here
    ELF_MAGIC,
    NT_PRSTATUS,
    ElfHeader,
    ElfNote,
    ProgramHeader,
    is_elf_core,
    read_elf_core,
)
from .errors import KctxError, SnapshotError, SymbolError
from .pagetables.entry import ADDRESS_MASK, PteFlag, paging_mode
from .physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .snapshot import (
    GENERAL_REGISTERS,
    SEGMENT_REGISTERS,
    CpuState,
    MemoryRange,
    RangeKind,
    Segment,
    Snapshot,
    SymbolSource,
    TableRegister,
)
from .snapshot_io import save_snapshot
from .symbols import SymbolTable, load_symbols

if TYPE_CHECKING:
    from .pagetables.context import KernelContext

__all__ = [
    "ACCESS_RIGHTS_MOVES",
    "QEMU_CPU_STATE_SIZES",
    "ElfHeader",
    "ElfNote",
    "ProgramHeader",
    "QemuCpuState",
    "QemuDump",
    "QemuSegment",
    "access_rights",
    "import_qemu_dump",
    "is_qemu_dump",
    "kaslr_offset",
    "parse_qemu_dump",
    "read_qemu_dump",
]

TOOL_NAME = "qemu dump-guest-memory"

# -- QEMU's CPU state (QEMU target/i386/arch_dump.c, QEMUCPUState version 1) ----------------

_QEMU_NOTE_NAME = "QEMU"
_QEMU_VERSION = 1
_QEMU_GPRS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
_QEMU_SEGMENTS = (*SEGMENT_REGISTERS, "ldt", "tr", "gdt", "idt")
_QEMU_HEAD = struct.Struct("<II")  # version, size
# Registers, then per segment: selector, limit, flags, pad, base; then cr0..cr4.
_QEMU_BODY = struct.Struct("<" + "Q" * len(_QEMU_GPRS) + "IIIIQ" * len(_QEMU_SEGMENTS) + "5Q")
_KERNEL_GS_BASE = struct.Struct("<Q")
# Version 1 without and with kernel_gs_base (added in QEMU 5.2).
QEMU_CPU_STATE_SIZES = (_QEMU_HEAD.size + _QEMU_BODY.size, _QEMU_HEAD.size + _QEMU_BODY.size + 8)

# NT_PRSTATUS for x86-64 (Linux struct elf_prstatus): pr_pid at 32, pr_reg at 112.
_PRSTATUS_PID = struct.Struct("<I")
_PRSTATUS_PID_OFFSET = 32
_PRSTATUS_REGS_OFFSET = 112
_USER_REGS = (  # struct user_regs_struct (arch/x86/include/asm/user_64.h)
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base",
    "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip
_USER_REGS_LAYOUT = struct.Struct("<" + "Q" * len(_USER_REGS))
_PRSTATUS_CHECKED = ("rip", "rsp", "rax", "rflags")  # must agree with the QEMU note

# QEMU keeps a segment's descriptor high dword (SDM vol. 3A 3.4.5, Figure 3-8, bits 63:32)
# in SegmentCache.flags; snapshots use the VMCS access-rights layout (SDM vol. 3C 25.4.1,
# Table 25-2). Each row moves one field: (field in the high dword, field in access rights).
ACCESS_RIGHTS_MOVES = (
    (BitField("Type", 8, 4), BitField("Type", 0, 4)),
    (BitField("S", 12, 1), BitField("S", 4, 1)),
    (BitField("DPL", 13, 2), BitField("DPL", 5, 2)),
    (BitField("P", 15, 1), BitField("P", 7, 1)),
    (BitField("AVL", 20, 1), BitField("AVL", 12, 1)),
    (BitField("L", 21, 1), BitField("L", 13, 1)),
    (BitField("D/B", 22, 1), BitField("D/B", 14, 1)),
    (BitField("G", 23, 1), BitField("G", 15, 1)),
)
_AR_L = ACCESS_RIGHTS_MOVES[5][1]


def access_rights(flags: int) -> int:
    """VMCS access rights of a descriptor high dword (base and limit bits dropped).

    >>> hex(access_rights(0x00AF9B00))   # Linux __KERNEL_CS
    '0xa09b'
    """
    out = 0
    for source, target in ACCESS_RIGHTS_MOVES:
        out = target.insert(out, source.extract(flags))
    return out


@dataclass(frozen=True)
class QemuSegment:
    """A ``QEMUCPUSegment``: selector, limit, QEMU's flags (descriptor high dword), base."""

    selector: int
    limit: int
    flags: int
    base: int

    def to_segment(self) -> Segment:
        return Segment(self.selector & 0xFFFF, self.base, self.limit, access_rights(self.flags))


@dataclass(frozen=True)
class QemuCpuState:
    """One decoded ``QEMUCPUState``; ``kernel_gs_base`` is None in the 0x1B0-byte variant."""

    version: int
    size: int
    regs: dict[str, int]
    segments: dict[str, QemuSegment]  # cs ds es fs gs ss ldt tr gdt idt
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int | None

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "QEMU note") -> QemuCpuState:
        """Decode by the structure's own size field; ``where`` names the note in errors."""
        if len(data) < _QEMU_HEAD.size:
            raise SnapshotError(where, f"{len(data)} bytes, too short for a QEMUCPUState")
        version, size = _QEMU_HEAD.unpack_from(data)
        if version != _QEMU_VERSION:
            raise SnapshotError(where, f"QEMUCPUState version {version}, this tool reads 1")
        if size not in QEMU_CPU_STATE_SIZES:
            known = " or ".join(f"{s:#x}" for s in QEMU_CPU_STATE_SIZES)
            raise SnapshotError(where, f"QEMUCPUState size {size:#x}, expected {known}")
        if size > len(data):
            raise SnapshotError(
                where, f"QEMUCPUState size {size:#x} exceeds the note's {len(data):#x}"
            )
        values = _QEMU_BODY.unpack_from(data, _QEMU_HEAD.size)
        regs = dict(zip(_QEMU_GPRS, values, strict=False))
        pos = len(_QEMU_GPRS)
        segments = {}
        for name in _QEMU_SEGMENTS:
            selector, limit, flags, _pad, base = values[pos : pos + 5]
            segments[name] = QemuSegment(selector, limit, flags, base)
            pos += 5
        cr = tuple(values[pos : pos + 5])
        kgs = None
        if size == QEMU_CPU_STATE_SIZES[1]:
            (kgs,) = _KERNEL_GS_BASE.unpack_from(data, QEMU_CPU_STATE_SIZES[0])
        return cls(version, size, regs, segments, cr, kgs)  # type: ignore[arg-type]

    def to_cpu_state(self, efer: int | None) -> CpuState:
        seg = self.segments
        msrs = {"fs_base": seg["fs"].base, "gs_base": seg["gs"].base}
        if self.kernel_gs_base is not None:
            msrs["kernel_gs_base"] = self.kernel_gs_base
        if efer is not None:
            msrs["efer"] = efer
        return CpuState(
            regs={name: self.regs[name] for name in GENERAL_REGISTERS},
            cr0=self.cr[0],
            cr2=self.cr[2],
            cr3=self.cr[3],
            cr4=self.cr[4],
            msrs=msrs,
            segments={name: seg[name].to_segment() for name in SEGMENT_REGISTERS},
            gdtr=TableRegister(seg["gdt"].base, seg["gdt"].limit & 0xFFFF),
            idtr=TableRegister(seg["idt"].base, seg["idt"].limit & 0xFFFF),
            tr=seg["tr"].to_segment(),
            ldtr=seg["ldt"].to_segment(),
        )


@dataclass(frozen=True)
class QemuDump:
    """The parsed structure of a dump: headers, loads and per-CPU notes (no memory read)."""

    path: Path
    file_size: int
    header: ElfHeader
    loads: tuple[ProgramHeader, ...]
    cpus: tuple[QemuCpuState, ...]
    prstatus: tuple[dict[str, int], ...]  # user_regs_struct of each NT_PRSTATUS, plus "pid"

    def memory_ranges(self, name: str) -> tuple[MemoryRange, ...]:
        """FILE ranges into the ELF (``name`` relative to its folder); ZERO past p_filesz."""
        where = str(self.path)
        ranges = []
        for i, ph in enumerate(self.loads):
            if ph.p_memsz == 0:
                continue
            what = f"PT_LOAD {i} (paddr {ph.p_paddr:#x}, memsz {ph.p_memsz:#x})"
            if ph.p_paddr % PAGE_SIZE or ph.p_memsz % PAGE_SIZE or ph.p_filesz % PAGE_SIZE:
                raise SnapshotError(where, f"{what} is not 4 KiB aligned in address or size")
            if ph.p_paddr + ph.p_memsz > 1 << MAX_PHYS_BITS:
                raise SnapshotError(where, f"{what} ends beyond {MAX_PHYS_BITS}-bit physical")
            if ph.p_filesz:
                ranges.append(
                    MemoryRange(ph.p_paddr, ph.p_filesz, RangeKind.FILE, path=name,
                                offset=ph.p_offset)
                )  # fmt: skip
            if ph.p_memsz > ph.p_filesz:
                ranges.append(
                    MemoryRange(ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz, RangeKind.ZERO)
                )
        ranges.sort(key=lambda r: r.base)
        for a, b in itertools.pairwise(ranges):
            if b.base < a.end:
                raise SnapshotError(where, f"PT_LOAD ranges overlap at physical {b.base:#x}")
        return tuple(ranges)


# -- parsing ---------------------------------------------------------------------------------


def is_qemu_dump(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` starts like a 64-bit little-endian ELF core (False if unreadable)."""
    return is_elf_core(path)


def _prstatus_regs(note: ElfNote, where: str) -> dict[str, int]:
    end = _PRSTATUS_REGS_OFFSET + _USER_REGS_LAYOUT.size
    if len(note.desc) < end:
        raise SnapshotError(
            where, f"NT_PRSTATUS note at {note.offset:#x} is {len(note.desc)} bytes, expected {end}"
        )
    regs = dict(zip(_USER_REGS, _USER_REGS_LAYOUT.unpack_from(note.desc, _PRSTATUS_REGS_OFFSET),
                    strict=True))  # fmt: skip
    regs["pid"] = _PRSTATUS_PID.unpack_from(note.desc, _PRSTATUS_PID_OFFSET)[0]
    return regs


def parse_qemu_dump(path: str | os.PathLike[str]) -> QemuDump:
    """Read the headers and notes of a QEMU ELF core; see the :ref:`qemu dump failures`."""
    path = Path(path)
    where = str(path)
    core = read_elf_core(path)
    notes = core.notes
    cpus = tuple(
        QemuCpuState.from_bytes(n.desc, f"{where}: QEMU note at offset {n.offset:#x}")
        for n in notes
        if n.name == _QEMU_NOTE_NAME
    )  # ``where`` starts with the file name, then says which note
    if not cpus:
        raise SnapshotError(where, 'no "QEMU" CPU-state note: not a QEMU dump-guest-memory core')
    prstatus = tuple(
        _prstatus_regs(n, where) for n in notes if n.name == "CORE" and n.type == NT_PRSTATUS
    )
    if len(prstatus) == len(cpus):
        for index, (state, regs) in enumerate(zip(cpus, prstatus, strict=True)):
            for name in _PRSTATUS_CHECKED:
                if state.regs[name] != regs[name]:
                    raise SnapshotError(
                        where,
                        f"CPU {index}: NT_PRSTATUS {name}={regs[name]:#x} disagrees with "
                        f"the QEMU note's {state.regs[name]:#x}",
                    )
    return QemuDump(path, core.file_size, core.header, core.loads, cpus, prstatus)


# -- inference -------------------------------------------------------------------------------

_XD_SAMPLE_TABLES = 64  # tables read depth-first from CR3 when looking for XD bits
_CANONICAL_32 = 1 << 32


def _uses_xd(mem: PhysicalMemory, cr3: int, la57: bool) -> bool:
    """Whether a present entry in the first tables reachable from CR3 has XD (bit 63) set.

    Depth-first, lowest index first: leaves (where Linux puts XD) come after a few
    reads, while breadth-first order would spend the budget on the empty tables the
    kernel preallocates for vmalloc.
    """
    levels = paging_mode(la57).levels
    todo = [((cr3 & ADDRESS_MASK) // PAGE_SIZE, 0)]
    seen = 0
    while todo and seen < _XD_SAMPLE_TABLES:
        pfn, depth = todo.pop()
        if not mem.frame_backed(pfn):
            continue
        seen += 1
        table = mem.frame(pfn)
        present = table[(table & np.uint64(PteFlag.P)) != 0]
        if (present & np.uint64(PteFlag.XD)).any():
            return True
        if depth + 1 == len(levels):
            continue
        if levels[depth].large_pages:
            present = present[(present & np.uint64(PteFlag.PS)) == 0]
        todo.extend(
            ((e & ADDRESS_MASK) // PAGE_SIZE, depth + 1) for e in reversed(present.tolist())
        )
    return False


def _infer_efer(state: QemuCpuState, mem: PhysicalMemory) -> tuple[int | None, list[str]]:
    """EFER bits the architecture forces (see :ref:`qemu dump inference`), and their names."""
    cr0, cr4 = state.cr[0], state.cr[4]
    if not (cr0 & CR0.PG and cr4 & CR4.PAE):
        return None, []
    long_code = _AR_L.extract(access_rights(state.segments["cs"].flags))
    wide = any(state.segments[t].base >= _CANONICAL_32 for t in ("gdt", "idt"))
    if not (long_code or wide):
        return None, []
    efer = EFER.LME | EFER.LMA
    inferred = ["msrs.efer.LME", "msrs.efer.LMA"]
    if _uses_xd(mem, state.cr[3], bool(cr4 & CR4.LA57)):
        efer |= EFER.NXE
        inferred.append("msrs.efer.NXE")
    return int(efer), inferred


# Never guessed: recorded in source["not_in_dump"] so nobody mistakes a 0 for a reading.
_NOT_IN_DUMP = ("cr8", "msrs.star", "msrs.lstar", "msrs.cstar", "msrs.sfmask", "msrs.pat",
                "msrs.tsc_aux", "msrs.pkru")  # fmt: skip


# -- snapshots -------------------------------------------------------------------------------

# KASLR probes: (vector, entry symbol) pairs whose IDT gate must point at the symbol.
_KASLR_PROBES = ((Vector.PF, "asm_exc_page_fault"), (Vector.DE, "asm_exc_divide_error"))


def kaslr_offset(ctx: KernelContext, symbols: SymbolTable) -> int:
    """The KASLR slide: IDT #PF handler minus ``asm_exc_page_fault``, checked with #DE.

    Returns 0 for symbols of the running kernel (its kallsyms), the slide for
    link-time symbols (System.map, vmlinux); a negative value means the symbols
    are from another boot.

    :raises SymbolError: a probe symbol is missing, a gate is not present, or the two
        vectors imply different slides (the symbols are not this kernel's).
    :raises SnapshotError: the IDT is not readable through the page tables.
    """
    from .tables import decode_idt

    gates = {e.vector: e.gate for e in decode_idt(ctx.mem, ctx.cpu, ctx.virt_to_phys)}
    slides = []
    for vector, name in _KASLR_PROBES:
        gate = gates.get(vector)
        if gate is None or not gate.p:
            raise SymbolError(f"IDT vector {int(vector)} has no present gate: cannot find KASLR")
        slides.append((int(vector), name, gate.offset - symbols.address(name)))
    _, _, slide = slides[0]
    for vector, name, other in slides[1:]:
        if other != slide:
            raise SymbolError(
                f"KASLR slide {slide:#x} from vector {int(_KASLR_PROBES[0][0])} disagrees with "
                f"{other:#x} from vector {vector} ({name}): symbols are not this kernel's"
            )
    return slide


def _symbol_kind(path: Path) -> str:
    with open(path, "rb") as f:
        if f.read(4) == ELF_MAGIC:
            return "elf"
    return "system.map" if "system.map" in path.name.lower() else "kallsyms"


def _attach_symbols(snap: Snapshot, symbols: Path) -> Snapshot:
    """Add ``symbols`` as a source, relocated by the KASLR slide found through the IDT."""
    from .pagetables.context import KernelContext

    try:
        kind = _symbol_kind(symbols)
    except OSError as e:
        raise SymbolError(f"{symbols}: cannot read symbol file: {e.strerror or e}") from None
    table = load_symbols(symbols)
    ctx = KernelContext.from_snapshot(snap)
    try:
        slide = kaslr_offset(ctx, table)
        kaslr: dict[str, Any] = {"offset": hex(slide), "method": "IDT #PF and #DE handlers"}
        if slide < 0:
            kaslr = {"error": f"negative slide {slide:#x}: symbols from another boot"}
            slide = 0
    except KctxError as e:
        kaslr, slide = {"error": str(e)}, 0
    finally:
        ctx.close()
    rel = os.path.relpath(symbols.absolute(), snap.folder)
    source = dict(snap.source, kaslr=kaslr)
    return replace(snap, symbols=(SymbolSource(kind, path=rel, offset=slide),), source=source)


def read_qemu_dump(
    path: str | os.PathLike[str], cpu: int = 0, symbols: str | os.PathLike[str] | None = None
) -> Snapshot:
    """The snapshot of one vCPU of a QEMU ELF core; memory stays in the ELF, mapped lazily.

    The snapshot's ``origin`` is the ELF itself, so memory paths are relative to its
    folder; paths the caller named may leave it (``allow_outside`` is set).

    :param cpu: the vCPU index, in note order (QEMU's cpu_index).
    :param symbols: System.map, kallsyms or vmlinux; recorded with its KASLR slide.
    :raises SnapshotError: see the :ref:`qemu dump failures`.
    :raises SymbolError: the symbol file cannot be read.
    """
    origin = Path(path).absolute()
    dump = parse_qemu_dump(origin)
    if not 0 <= cpu < len(dump.cpus):
        raise SnapshotError(
            str(path), f"no CPU {cpu}: the dump has {len(dump.cpus)} (0..{len(dump.cpus) - 1})"
        )
    state = dump.cpus[cpu]
    memory = dump.memory_ranges(origin.name)
    source: dict[str, Any] = {
        "tool": TOOL_NAME,
        "file": origin.name,
        "cpu": cpu,
        "cpus": len(dump.cpus),
        "qemu_cpu_state_size": state.size,
    }
    snap = Snapshot(state.to_cpu_state(None), memory, source, origin=origin, allow_outside=True)
    mem = snap.open_memory()
    try:
        efer, inferred = _infer_efer(state, mem)
    finally:
        mem.close()
    source["inferred"] = inferred
    source["not_in_dump"] = ["msrs.efer.SCE" if efer is not None else "msrs.efer", *_NOT_IN_DUMP]
    snap = replace(snap, cpu=state.to_cpu_state(efer), source=source)
    if symbols is not None:
        snap = _attach_symbols(snap, Path(symbols))
    return snap


def import_qemu_dump(
    elf_path: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    cpu: int = 0,
    symbols: str | os.PathLike[str] | None = None,
) -> Snapshot:
    """Write a snapshot document for one vCPU of a dump; memory references the ELF in place.

    Paths in the document are relative to its folder. When the ELF or the symbol file
    is outside that folder, ``source["needs_allow_outside_paths"]`` is true and loading
    needs ``allow_outside=True`` (``--allow-outside-paths``).

    :return: the snapshot as saved (``origin`` is the document).
    :raises SnapshotError: see the :ref:`qemu dump failures`, or the document cannot be written.
    """
    out = Path(out_json).absolute()
    snap = read_qemu_dump(elf_path, cpu=cpu, symbols=symbols)
    folder = out.parent.resolve()
    named = [snap.resolve(r.path, "memory") for r in snap.memory if r.kind is RangeKind.FILE]
    moved = []
    for s in snap.symbols:
        target = snap.resolve(s.path, "symbols")
        named.append(target)
        moved.append(replace(s, path=os.path.relpath(target, folder)))
    outside = any(not p.is_relative_to(folder) for p in named)
    source = dict(snap.source, needs_allow_outside_paths=outside)
    return save_snapshot(replace(snap, symbols=tuple(moved), source=source), out)
