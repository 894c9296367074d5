"""The snapshot's declarative ``build`` section, parsed and validated.

These are requests ("map this VA range", "put this gate in the IDT"), not
hardware state: the layers that own each structure materialize them into
physical memory (page tables: ``kctx_debug.pagetables.build``; GDT/IDT/TSS:
``kctx_debug.tables``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BuildSpec",
    "GateSpec",
    "GdtEntrySpec",
    "GdtSpec",
    "IdtSpec",
    "MappingSpec",
    "PageTableSpec",
    "TssSpec",
]


@dataclass(frozen=True)
class MappingSpec:
    """Map ``[va, va+size)`` to ``[pa, pa+size)`` with pages of ``page_size`` bytes.

    ``flags`` are leaf-entry ``PteFlag`` bits other than P (implied) and PS/PAT:
    the builder sets PS for large pages and places PAT (``pat``) at bit 7 or 12
    as the page size requires. ``where`` names the mapping in errors.
    """

    va: int
    pa: int
    size: int
    page_size: int
    flags: int
    pkey: int = 0
    pat: bool = False
    where: str = ""


@dataclass(frozen=True)
class PageTableSpec:
    """Page tables to build: the root table is the first frame of the table area."""

    levels: int  # 4 or 5
    table_base: int  # physical, 4 KiB aligned, must be backed memory
    table_size: int
    mappings: tuple[MappingSpec, ...]

    @property
    def root(self) -> int:
        return self.table_base


@dataclass(frozen=True)
class GdtEntrySpec:
    """One GDT slot: a code/data segment, a 16-byte TSS/LDT descriptor, or raw bytes."""

    index: int
    kind: str  # "code64", "code32", "data", "tss", "ldt", "null", "raw"
    dpl: int = 0
    base: int = 0
    limit: int = 0xFFFFF
    raw: bytes = b""
    where: str = ""


@dataclass(frozen=True)
class GdtSpec:
    phys: int  # where the table's bytes go
    entries: tuple[GdtEntrySpec, ...]


@dataclass(frozen=True)
class GateSpec:
    vector: int
    handler: int
    selector: int
    gate_type: str  # "interrupt" or "trap"
    dpl: int = 0
    ist: int = 0
    present: bool = True
    where: str = ""


@dataclass(frozen=True)
class IdtSpec:
    phys: int
    gates: tuple[GateSpec, ...]


@dataclass(frozen=True)
class TssSpec:
    phys: int
    rsp: tuple[int, int, int] = (0, 0, 0)
    ist: tuple[int, ...] = (0,) * 7
    iomap_base: int = 104


@dataclass(frozen=True)
class BuildSpec:
    page_tables: PageTableSpec | None = None
    gdt: GdtSpec | None = None
    idt: IdtSpec | None = None
    tss: TssSpec | None = None
