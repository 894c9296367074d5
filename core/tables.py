"""Descriptor tables of a snapshot: decode the GDT, IDT and TSS, or build them.

Decoding reads through a translation function (VA -> PA), since GDTR, IDTR and
the TSS base hold linear addresses; the page-table walker supplies it, and any
callable does (identity for a flat fixture). Materializing writes the
snapshot's ``build`` section (GDT entries, IDT gates, TSS fields) into
physical memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .arch.address import is_canonical
from .arch.descriptors import (
    IdtGate,
    SegmentDescriptor,
    Selector,
    SystemDescriptor,
    SystemDescriptorType,
    Tss64,
)
from .buildspec import BuildSpec, GdtEntrySpec
from .errors import KctxError, MemoryAccessError, SnapshotError
from .physmem import PAGE_SIZE, PhysicalMemory
from .snapshot import CpuState

__all__ = [
    "GdtEntry",
    "IdtEntry",
    "Translate",
    "decode_gdt",
    "decode_idt",
    "decode_tss",
    "encode_gdt_entry",
    "materialize_descriptors",
    "read_linear",
]

Translate = Callable[[int], int]
"""VA -> PA for a supervisor read; raises a KctxError when the page is not mapped."""

# SDM vol. 3A 3.5.1: descriptors are 8 bytes; 16-byte system descriptors take two slots.
DESCRIPTOR_SIZE = 8
GATE_SIZE = 16  # SDM vol. 3A 6.14.1
# SDM vol. 3A Table 3-1 type bits for the segments the build section names.
_CODE_TYPE = 0xB  # execute/read, accessed
_DATA_TYPE = 0x3  # read/write, accessed


@dataclass(frozen=True)
class GdtEntry:
    """One decoded GDT slot; ``descriptor`` is None for the upper half of a 16-byte one."""

    index: int
    descriptor: SegmentDescriptor | SystemDescriptor | None

    @property
    def selector(self) -> int:
        return self.index * DESCRIPTOR_SIZE


@dataclass(frozen=True)
class IdtEntry:
    vector: int
    gate: IdtGate


def read_linear(mem: PhysicalMemory, translate: Translate, va: int, size: int) -> bytes:
    """Read ``size`` bytes at linear address ``va``, translating page by page."""
    out = bytearray()
    end = va + size
    while va < end:
        n = min(end, (va | (PAGE_SIZE - 1)) + 1) - va
        out += mem.read(translate(va), n)
        va += n
    return bytes(out)


def _read_table(
    mem: PhysicalMemory, translate: Translate, base: int, limit: int, what: str
) -> bytes:
    try:
        return read_linear(mem, translate, base, limit + 1)
    except KctxError as e:
        raise SnapshotError(
            what, f"table at {base:#x} (limit {limit:#x}) is unreadable: {e}"
        ) from None


def decode_gdt(mem: PhysicalMemory, cpu: CpuState, translate: Translate) -> list[GdtEntry]:
    """Every slot the GDTR limit covers, 16-byte system descriptors decoded whole."""
    data = _read_table(mem, translate, cpu.gdtr.base, cpu.gdtr.limit, "cpu.gdtr")
    entries: list[GdtEntry] = []
    index = 0
    while (index + 1) * DESCRIPTOR_SIZE <= len(data):
        chunk = data[index * DESCRIPTOR_SIZE : (index + 1) * DESCRIPTOR_SIZE]
        desc = SegmentDescriptor.from_bytes(chunk)
        wide = data[index * DESCRIPTOR_SIZE : (index + 2) * DESCRIPTOR_SIZE]
        if desc.spans_two_slots and len(wide) == 2 * DESCRIPTOR_SIZE:
            try:
                entries.append(GdtEntry(index, SystemDescriptor.from_bytes(wide)))
                entries.append(GdtEntry(index + 1, None))
                index += 2
                continue
            except KctxError:
                pass  # upper half malformed: show the low half as it is
        entries.append(GdtEntry(index, desc))
        index += 1
    return entries


def decode_idt(mem: PhysicalMemory, cpu: CpuState, translate: Translate) -> list[IdtEntry]:
    """Every gate the IDTR limit covers (at most 256)."""
    data = _read_table(mem, translate, cpu.idtr.base, cpu.idtr.limit, "cpu.idtr")
    count = min(len(data) // GATE_SIZE, 256)
    return [
        IdtEntry(v, IdtGate.from_bytes(data[v * GATE_SIZE : (v + 1) * GATE_SIZE]))
        for v in range(count)
    ]


def decode_tss(mem: PhysicalMemory, cpu: CpuState, translate: Translate) -> Tss64:
    """The TSS that TR selects: the cached base when the snapshot has it, else the GDT's."""
    base, limit = cpu.tr.base, cpu.tr.limit
    if base is None or limit is None:
        sel = Selector.from_int(cpu.tr.selector)
        if sel.is_null:
            raise SnapshotError("cpu.tr", "TR is null and has no cached base")
        entries = {e.index: e for e in decode_gdt(mem, cpu, translate)}
        entry = entries.get(sel.index)
        if entry is None or not isinstance(entry.descriptor, SystemDescriptor):
            raise SnapshotError("cpu.tr", f"GDT[{sel.index}] is not a TSS descriptor")
        base, limit = entry.descriptor.base, entry.descriptor.effective_limit
    size = min(limit + 1, 0x10000)
    if size < 104:
        raise SnapshotError("cpu.tr.limit", f"{limit:#x} is below the 64-bit TSS's 0x67")
    return Tss64.from_bytes(_read_table(mem, translate, base, 103, "cpu.tr"))


# -- building ---------------------------------------------------------------------


def encode_gdt_entry(spec: GdtEntrySpec) -> bytes:
    """The 8 or 16 bytes one build-section GDT entry stands for."""
    if spec.kind == "raw":
        return spec.raw
    if spec.kind == "null":
        return bytes(DESCRIPTOR_SIZE)
    if spec.kind in ("tss", "ldt"):
        kind = (
            SystemDescriptorType.TSS_AVAILABLE if spec.kind == "tss" else SystemDescriptorType.LDT
        )
        desc = SystemDescriptor(base=spec.base, limit=spec.limit, type=kind, dpl=spec.dpl, p=True)
        return desc.to_bytes()
    code = spec.kind.startswith("code")
    return SegmentDescriptor(
        base=spec.base,
        limit=spec.limit,
        type=_CODE_TYPE if code else _DATA_TYPE,
        s=True,
        dpl=spec.dpl,
        p=True,
        l=spec.kind == "code64",
        db=spec.kind in ("code32", "data"),
        g=True,
    ).to_bytes()


def materialize_descriptors(mem: PhysicalMemory, build: BuildSpec, cpu: CpuState) -> None:
    """Write the build section's GDT, IDT and TSS into physical memory.

    :raises SnapshotError: naming the build entry (bad field, non-canonical
        handler, table not backed) or the CPU register whose limit the built
        table cannot satisfy.
    """
    writes: list[tuple[int, bytes, str]] = []
    if build.gdt is not None:
        for e in build.gdt.entries:
            try:
                data = encode_gdt_entry(e)
            except KctxError as err:
                raise SnapshotError(e.where, str(err)) from None
            writes.append((build.gdt.phys + e.index * DESCRIPTOR_SIZE, data, e.where))
        _check_limit(mem, build.gdt.phys, cpu.gdtr.limit, "cpu.gdtr.limit")
    if build.idt is not None:
        for g in build.idt.gates:
            if not is_canonical(g.handler):
                raise SnapshotError(g.where + ".handler", f"{g.handler:#x} is not canonical")
            kind = (
                SystemDescriptorType.INTERRUPT_GATE
                if g.gate_type == "interrupt"
                else SystemDescriptorType.TRAP_GATE
            )
            gate = IdtGate(g.handler, g.selector, g.ist, kind, g.dpl, g.present)
            writes.append((build.idt.phys + g.vector * GATE_SIZE, gate.to_bytes(), g.where))
        _check_limit(mem, build.idt.phys, cpu.idtr.limit, "cpu.idtr.limit")
    if build.tss is not None:
        t = build.tss
        try:
            tss = Tss64(rsp0=t.rsp[0], rsp1=t.rsp[1], rsp2=t.rsp[2], ist=t.ist,
                        iomap_base=t.iomap_base)  # fmt: skip
        except KctxError as err:
            raise SnapshotError("build.tss", str(err)) from None
        writes.append((t.phys, tss.to_bytes(), "build.tss"))
    for phys, data, where in writes:
        try:
            mem.write(phys, data)
        except MemoryAccessError as err:
            raise SnapshotError(where, f"cannot write at {phys:#x}: {err}") from None


def _check_limit(mem: PhysicalMemory, phys: int, limit: int, where: str) -> None:
    if not mem.is_backed(phys, limit + 1):
        raise SnapshotError(
            where, f"{limit:#x} reaches beyond the memory backing the table at {phys:#x}"
        )
