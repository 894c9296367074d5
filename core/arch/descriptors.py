"""Segment selectors, GDT/LDT descriptors, 64-bit IDT gates and the 64-bit TSS.

Each structure is a frozen dataclass whose fields carry the Intel SDM names and
whose bit layout is declared once, as a table of :class:`DescriptorField` rows.
The same table drives decoding, encoding, range checks and
:func:`describe_layout`. Reserved bits are kept in a ``reserved`` field so
``to_bytes(from_bytes(b)) == b`` holds for every accepted input.

>>> cs = SegmentDescriptor.from_int(0x00AF9B000000FFFF)   # Linux __KERNEL_CS
>>> str(cs)
'code64 DPL0 P base=0x0 limit=0xfffff G L'
>>> cs.effective_limit == 0xFFFFFFFF, cs.is_long_code
(True, True)

Errors: malformed input (wrong length, out-of-range field, reserved type bits
set) raises :class:`~kctx_debug.errors.DescriptorError` naming the structure and field.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from kctx_debug.arch.bits import BitField
from kctx_debug.arch.packing import BitPacked, DescriptorField, describe_bit_layout, field_spec
from kctx_debug.arch.tss import TSS64_SIZE, Tss64, describe_tss, describe_tss_layout
from kctx_debug.errors import DescriptorError

__all__ = [
    "GRANULARITY_SHIFT",
    "TSS64_SIZE",
    "CodeSegmentType",
    "DataSegmentType",
    "DescriptorField",
    "IdtGate",
    "SegmentDescriptor",
    "Selector",
    "SystemDescriptor",
    "SystemDescriptorType",
    "Tss64",
    "describe_idt_gate",
    "describe_layout",
    "describe_segment_descriptor",
    "describe_selector",
    "describe_system_descriptor",
    "describe_tss",
]

# With G=1 the 20-bit limit counts 4-KByte units (SDM Vol. 3A 3.4.5, "G flag").
GRANULARITY_SHIFT = 12


class DataSegmentType(enum.IntFlag):
    """Type-field bits of a data segment, S=1 (SDM Vol. 3A 3.4.5.1, Table 3-1)."""

    A = 1 << 0  # accessed
    W = 1 << 1  # write-enable
    E = 1 << 2  # expansion-direction: expand-down


class CodeSegmentType(enum.IntFlag):
    """Type-field bits of a code segment, S=1 (SDM Vol. 3A 3.4.5.1, Table 3-1)."""

    A = 1 << 0  # accessed
    R = 1 << 1  # read-enable
    C = 1 << 2  # conforming
    CODE = 1 << 3  # set: code segment; clear: data segment


class SystemDescriptorType(enum.IntEnum):
    """System-segment and gate types, S=0 (SDM Vol. 3A 3.5, Table 3-2).

    Names are the IA-32e-mode meanings; values that are reserved in IA-32e mode
    keep their legacy (16-bit) names. 0, 8, 10 and 13 are reserved in both modes.
    """

    TSS16_AVAILABLE = 1
    LDT = 2
    TSS16_BUSY = 3
    CALL_GATE16 = 4
    TASK_GATE = 5
    INTERRUPT_GATE16 = 6
    TRAP_GATE16 = 7
    TSS_AVAILABLE = 9
    TSS_BUSY = 11
    CALL_GATE = 12
    INTERRUPT_GATE = 14
    TRAP_GATE = 15


_SYSTEM_KIND: Mapping[int, str] = MappingProxyType(
    {
        SystemDescriptorType.TSS16_AVAILABLE: "tss16-avail",
        SystemDescriptorType.LDT: "ldt",
        SystemDescriptorType.TSS16_BUSY: "tss16-busy",
        SystemDescriptorType.CALL_GATE16: "call-gate16",
        SystemDescriptorType.TASK_GATE: "task-gate",
        SystemDescriptorType.INTERRUPT_GATE16: "int-gate16",
        SystemDescriptorType.TRAP_GATE16: "trap-gate16",
        SystemDescriptorType.TSS_AVAILABLE: "tss-avail",
        SystemDescriptorType.TSS_BUSY: "tss-busy",
        SystemDescriptorType.CALL_GATE: "call-gate",
        SystemDescriptorType.INTERRUPT_GATE: "int-gate",
        SystemDescriptorType.TRAP_GATE: "trap-gate",
    }
)


def _system_kind(type_: int) -> str:
    return _SYSTEM_KIND.get(type_, f"type={type_:#x}")


def _system_type(type_: int) -> SystemDescriptorType | None:
    return SystemDescriptorType(type_) if type_ in _SYSTEM_KIND else None


# Segment selector (SDM Vol. 3A 3.4.2, Figure 3-6); the index counts 8-byte slots.
_SLOT_SIZE = 8
_SELECTOR_LAYOUT = (
    field_spec("rpl", "RPL", (0, 2)),
    field_spec("ti", "TI", (2, 1), flag=True),
    field_spec("index", "Index", (3, 13)),
)


@dataclass(frozen=True)
class Selector(BitPacked):
    """A 16-bit segment selector: table index, table indicator (1 = LDT), RPL.

    >>> Selector.from_int(0x33)
    Selector(index=6, ti=False, rpl=3)
    """

    index: int = 0
    ti: bool = False
    rpl: int = 0

    _SIZE: ClassVar[int] = 2
    _LAYOUT: ClassVar[tuple[DescriptorField, ...]] = _SELECTOR_LAYOUT

    @property
    def is_null(self) -> bool:
        """Index 0 of the GDT: loading it into CS or SS faults (RPL is ignored)."""
        return self.index == 0 and not self.ti

    @property
    def table_offset(self) -> int:
        """Byte offset of the descriptor within its table (8-byte slots)."""
        return self.index * _SLOT_SIZE

    def __str__(self) -> str:
        return describe_selector(self)


# Code/data and legacy system descriptor, 8 bytes (SDM Vol. 3A 3.4.5, Figure 3-8).
_SEGMENT_LAYOUT = (
    field_spec("limit", "Segment Limit", (0, 16), (48, 4)),
    field_spec("base", "Base Address", (16, 16), (32, 8), (56, 8)),
    field_spec("type", "Type", (40, 4)),
    field_spec("s", "S", (44, 1), flag=True),
    field_spec("dpl", "DPL", (45, 2)),
    field_spec("p", "P", (47, 1), flag=True),
    field_spec("avl", "AVL", (52, 1), flag=True),
    field_spec("l", "L", (53, 1), flag=True),
    field_spec("db", "D/B", (54, 1), flag=True),
    field_spec("g", "G", (55, 1), flag=True),
)


# System types whose IA-32e-mode descriptor is 16 bytes (SDM Vol. 3A 3.5).
_SIXTEEN_BYTE_TYPES = frozenset(
    {
        SystemDescriptorType.LDT,
        SystemDescriptorType.TSS_AVAILABLE,
        SystemDescriptorType.TSS_BUSY,
        SystemDescriptorType.CALL_GATE,
    }
)


def _effective_limit(limit: int, g: bool) -> int:
    return (limit << GRANULARITY_SHIFT) | ((1 << GRANULARITY_SHIFT) - 1) if g else limit


@dataclass(frozen=True)
class SegmentDescriptor(BitPacked):
    """An 8-byte GDT/LDT entry: a code or data segment (S=1) or a legacy system one.

    ``limit`` is the raw 20-bit field; :attr:`effective_limit` applies G.
    """

    base: int = 0
    limit: int = 0
    type: int = 0
    s: bool = False
    dpl: int = 0
    p: bool = False
    avl: bool = False
    l: bool = False  # noqa: E741 - the SDM's name for the 64-bit code flag
    db: bool = False
    g: bool = False

    _SIZE: ClassVar[int] = 8
    _LAYOUT: ClassVar[tuple[DescriptorField, ...]] = _SEGMENT_LAYOUT

    @property
    def effective_limit(self) -> int:
        """The last valid byte offset: ``limit`` scaled to 4-KByte units when G=1."""
        return _effective_limit(self.limit, self.g)

    @property
    def is_null(self) -> bool:
        return self.raw == 0

    @property
    def is_system(self) -> bool:
        return not self.s

    @property
    def is_code(self) -> bool:
        return self.s and bool(self.type & CodeSegmentType.CODE)

    @property
    def is_data(self) -> bool:
        return self.s and not self.type & CodeSegmentType.CODE

    @property
    def is_long_code(self) -> bool:
        """A 64-bit code segment (L=1); L=1 with D=1 is reserved by the SDM."""
        return self.is_code and self.l

    @property
    def accessed(self) -> bool:
        """Type bit A; False for system descriptors, whose type has no such bit."""
        return self.s and bool(self.type & CodeSegmentType.A)

    @property
    def readable(self) -> bool:
        """Data segments are always readable; code segments only with R."""
        return self.is_data or (self.is_code and bool(self.type & CodeSegmentType.R))

    @property
    def writable(self) -> bool:
        return self.is_data and bool(self.type & DataSegmentType.W)

    @property
    def conforming(self) -> bool:
        return self.is_code and bool(self.type & CodeSegmentType.C)

    @property
    def expand_down(self) -> bool:
        return self.is_data and bool(self.type & DataSegmentType.E)

    @property
    def system_type(self) -> SystemDescriptorType | None:
        """The Table 3-2 type of a system descriptor; None for code/data or reserved types."""
        return None if self.s else _system_type(self.type)

    @property
    def spans_two_slots(self) -> bool:
        """In a 64-bit GDT/LDT: this is the low half of a 16-byte system descriptor.

        LDT, TSS and call-gate descriptors take two 8-byte slots in IA-32e mode
        (SDM Vol. 3A 3.5); decode those 16 bytes with :class:`SystemDescriptor`
        (LDT/TSS) instead.
        """
        return not self.s and self.type in _SIXTEEN_BYTE_TYPES

    @property
    def kind(self) -> str:
        """``null``, ``code16/32/64``, ``data``, or the system type (``tss-avail`` …)."""
        if self.is_null:
            return "null"
        if self.is_code:
            return "code64" if self.l else ("code32" if self.db else "code16")
        if self.is_data:
            return "data"
        return _system_kind(self.type)

    def __str__(self) -> str:
        return describe_segment_descriptor(self)


# 16-byte LDT/TSS descriptor in IA-32e mode (SDM Vol. 3A 7.2.3, Figure 7-4).
_SYSTEM_LAYOUT = (
    field_spec("limit", "Segment Limit", (0, 16), (48, 4)),
    field_spec("base", "Base Address", (16, 16), (32, 8), (56, 8), (64, 32)),
    field_spec("type", "Type", (40, 4)),
    field_spec("dpl", "DPL", (45, 2)),
    field_spec("p", "P", (47, 1), flag=True),
    field_spec("avl", "AVL", (52, 1), flag=True),
    field_spec("g", "G", (55, 1), flag=True),
    field_spec("reserved", "Reserved", (53, 2), (96, 8), (109, 19)),
)
# S must be 0 (a system descriptor), and the upper half's type field must be 0 so
# the upper 8 bytes can never pass as a legacy descriptor.
_SYSTEM_ZERO = (
    field_spec("s", "S", (44, 1)),
    field_spec("upper_type", "upper Type", (104, 5)),
)
_LONG_MODE_SYSTEM_TYPES = frozenset(
    {SystemDescriptorType.LDT, SystemDescriptorType.TSS_AVAILABLE, SystemDescriptorType.TSS_BUSY}
)


@dataclass(frozen=True)
class SystemDescriptor(BitPacked):
    """A 16-byte TSS or LDT descriptor of a 64-bit GDT (type 2, 9 or 11).

    ``reserved`` holds the reserved bits (53-54, 103:96, 127:109 of the 128-bit
    value) packed low to high, so arbitrary reserved contents round-trip.
    """

    base: int = 0
    limit: int = 0
    type: int = SystemDescriptorType.TSS_AVAILABLE
    dpl: int = 0
    p: bool = False
    avl: bool = False
    g: bool = False
    reserved: int = 0

    _SIZE: ClassVar[int] = 16
    _LAYOUT: ClassVar[tuple[DescriptorField, ...]] = _SYSTEM_LAYOUT
    _MUST_BE_ZERO: ClassVar[tuple[DescriptorField, ...]] = _SYSTEM_ZERO

    def _check(self) -> None:
        if self.type not in _LONG_MODE_SYSTEM_TYPES:
            raise DescriptorError(
                f"SystemDescriptor.type={self.type:#x} is not an LDT (2) or 64-bit TSS (9, 11)"
            )

    @property
    def system_type(self) -> SystemDescriptorType:
        return SystemDescriptorType(self.type)

    @property
    def effective_limit(self) -> int:
        return _effective_limit(self.limit, self.g)

    @property
    def is_tss(self) -> bool:
        return self.type != SystemDescriptorType.LDT

    @property
    def is_busy(self) -> bool:
        """A busy TSS: LTR sets this, and LTR on a busy TSS faults."""
        return self.type == SystemDescriptorType.TSS_BUSY

    @property
    def kind(self) -> str:
        return _system_kind(self.type)

    def __str__(self) -> str:
        return describe_system_descriptor(self)


# 64-bit interrupt/trap gate (SDM Vol. 3A 6.14.1, Figure 6-8).
_GATE_LAYOUT = (
    field_spec("offset", "Offset", (0, 16), (48, 16), (64, 32)),
    field_spec("selector", "Segment Selector", (16, 16)),
    field_spec("ist", "IST", (32, 3)),
    field_spec("type", "Type", (40, 4)),
    field_spec("dpl", "DPL", (45, 2)),
    field_spec("p", "P", (47, 1), flag=True),
    field_spec("reserved", "Reserved", (35, 5), (44, 1), (96, 32)),
)
_GATE_S = BitField("S", 44, 1)  # inside "reserved"; 0 for every gate
_GATE_TYPES_64 = frozenset({SystemDescriptorType.INTERRUPT_GATE, SystemDescriptorType.TRAP_GATE})


@dataclass(frozen=True)
class IdtGate(BitPacked):
    """A 16-byte IDT entry of IA-32e mode.

    Any 16 bytes decode (IDTs hold not-present and junk entries); whether the
    CPU would accept the entry is :attr:`is_valid_64bit_type` and :attr:`p`.
    ``reserved`` holds bits 39:35, 44 (the S bit, 0 for a gate) and 127:96,
    packed low to high.
    """

    offset: int = 0
    selector: int = 0
    ist: int = 0
    type: int = SystemDescriptorType.INTERRUPT_GATE
    dpl: int = 0
    p: bool = False
    reserved: int = 0

    _SIZE: ClassVar[int] = 16
    _LAYOUT: ClassVar[tuple[DescriptorField, ...]] = _GATE_LAYOUT

    @property
    def is_interrupt_gate(self) -> bool:
        """Delivery through it clears RFLAGS.IF."""
        return self.type == SystemDescriptorType.INTERRUPT_GATE

    @property
    def is_trap_gate(self) -> bool:
        return self.type == SystemDescriptorType.TRAP_GATE

    @property
    def is_valid_64bit_type(self) -> bool:
        """Type 0xE or 0xF with S=0: anything else in a 64-bit IDT raises #GP on delivery."""
        return self.type in _GATE_TYPES_64 and not _GATE_S.extract(self.raw)

    @property
    def kind(self) -> str:
        return _system_kind(self.type)

    def __str__(self) -> str:
        return describe_idt_gate(self)


def _flags(*pairs: tuple[bool, str]) -> str:
    return "".join(f" {name}" for present, name in pairs if present)


def describe_selector(sel: Selector) -> str:
    """``0x0033 (GDT[6] RPL3)``; null selectors: ``0x0000 (null)``, ``0x0003 (null RPL3)``."""
    if sel.is_null:
        return f"{sel.raw:#06x} (null{f' RPL{sel.rpl}' if sel.rpl else ''})"
    return f"{sel.raw:#06x} ({'LDT' if sel.ti else 'GDT'}[{sel.index}] RPL{sel.rpl})"


def describe_segment_descriptor(desc: SegmentDescriptor) -> str:
    """One line: kind, DPL, P/NP, base, raw limit, then set flags.

    Flags: G, L, D (code) or B (data, system), AVL, then the type bits that
    differ from the common case: C (conforming), XO (execute-only code),
    RO (read-only data), E (expand-down). The accessed bit is not shown.

    >>> describe_segment_descriptor(SegmentDescriptor.from_int(0x00CF93000000FFFF))
    'data DPL0 P base=0x0 limit=0xfffff G B'
    """
    if desc.is_null:
        return "null"
    return (
        f"{desc.kind} DPL{desc.dpl} {'P' if desc.p else 'NP'} base={desc.base:#x} "
        f"limit={desc.limit:#x}"
        + _flags(
            (desc.g, "G"),
            (desc.l, "L"),
            (desc.db, "D" if desc.is_code else "B"),
            (desc.avl, "AVL"),
            (desc.conforming, "C"),
            (desc.is_code and not desc.readable, "XO"),
            (desc.is_data and not desc.writable, "RO"),
            (desc.expand_down, "E"),
        )
    )


def describe_system_descriptor(desc: SystemDescriptor) -> str:
    """``tss-busy DPL0 P base=0xfffffe0000003000 limit=0x4087`` plus G/AVL/reserved."""
    return (
        f"{desc.kind} DPL{desc.dpl} {'P' if desc.p else 'NP'} base={desc.base:#x} "
        f"limit={desc.limit:#x}"
        + _flags((desc.g, "G"), (desc.avl, "AVL"))
        + (f" reserved={desc.reserved:#x}" if desc.reserved else "")
    )


def describe_idt_gate(gate: IdtGate) -> str:
    """``int-gate sel=0x0010 off=0xffffffff81a00b50 ist=0 dpl=0 P``."""
    return (
        f"{gate.kind} sel={gate.selector:#06x} off={gate.offset:#018x} ist={gate.ist} "
        f"dpl={gate.dpl} {'P' if gate.p else 'NP'}"
        + (f" reserved={gate.reserved:#x}" if gate.reserved else "")
    )


def describe_layout(
    structure: BitPacked | type[BitPacked] | Tss64 | type[Tss64],
) -> str:
    """The SDM-figure table of a structure: bit (or byte) ranges, field, value.

    Pass a class for the bare layout, or an instance to add a value column.
    Rows run from the most significant bit (or the highest offset) down.

    >>> print(describe_layout(Selector.from_int(0x10)))
    bits  field  value
    15:3  Index  0x2
    2     TI     0x0
    1:0   RPL    0x0
    """
    if structure is Tss64:
        return describe_tss_layout()
    if isinstance(structure, Tss64):
        return describe_tss_layout(structure)
    return describe_bit_layout(structure)
