"""Bit-packed structure machinery shared by the descriptor decoders.

A structure's layout is a tuple of :class:`DescriptorField` rows, each a list of
(low bit, width) pieces taken from an SDM figure. :class:`BitPacked` turns such
a layout plus a frozen dataclass into ``from_int``/``from_bytes``/``raw``/
``to_bytes`` with range checks, and :func:`describe_bit_layout` renders it as
the figure's field table. Nothing here knows about any particular descriptor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from kctx_debug.arch.bits import BitField
from kctx_debug.errors import DescriptorError

__all__ = [
    "BitPacked",
    "DescriptorField",
    "as_bytes",
    "describe_bit_layout",
    "field_spec",
    "format_table",
]


@dataclass(frozen=True)
class DescriptorField:
    """One field of a packed structure, possibly split over several bit ranges.

    ``pieces`` run from the least significant part of the value upwards (the
    base of a segment descriptor is bits 31:16, then 39:32, then 63:56).
    """

    name: str  # dataclass attribute
    label: str  # SDM figure name
    pieces: tuple[BitField, ...]
    flag: bool = False  # one-bit field exposed as bool

    @property
    def width(self) -> int:
        return sum(piece.width for piece in self.pieces)

    @property
    def max_value(self) -> int:
        return (1 << self.width) - 1

    @property
    def mask(self) -> int:
        """All the bits of the structure this field occupies."""
        mask = 0
        for piece in self.pieces:
            mask |= piece.mask
        return mask

    def extract(self, raw: int) -> int:
        """The field's value, its pieces concatenated."""
        value, shift = 0, 0
        for piece in self.pieces:
            value |= piece.extract(raw) << shift
            shift += piece.width
        return value

    def insert(self, raw: int, value: int) -> int:
        """``raw`` with the field set to ``value`` (which must fit: see ``max_value``)."""
        shift = 0
        for piece in self.pieces:
            raw = piece.insert(raw, (value >> shift) & piece.max_value)
            shift += piece.width
        return raw


def field_spec(
    name: str, label: str, *ranges: tuple[int, int], flag: bool = False
) -> DescriptorField:
    """A field from (low bit, width) ranges, least significant part first."""
    pieces = tuple(BitField(name, lo, width) for lo, width in ranges)
    return DescriptorField(name, label, pieces, flag)


def as_bytes(data: object, what: str) -> bytes:
    """``data`` as bytes if it is a buffer; :class:`DescriptorError` otherwise."""
    # bytes(n) on an int would silently build n zero bytes, so accept buffers only.
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"{what} must be decoded from bytes, not {type(data).__name__}")
    return bytes(data)


_P = TypeVar("_P", bound="BitPacked")


class BitPacked:
    """Mixin for frozen dataclasses whose fields are named in ``_LAYOUT``.

    ``_MUST_BE_ZERO`` fields are checked on decode and not stored; ``_check``
    adds rules beyond field widths.
    """

    _SIZE: ClassVar[int]  # bytes
    _LAYOUT: ClassVar[tuple[DescriptorField, ...]]
    _MUST_BE_ZERO: ClassVar[tuple[DescriptorField, ...]] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in self._LAYOUT:
            value = getattr(self, f.name)
            if not isinstance(value, int):
                raise DescriptorError(f"{name}.{f.name} must be an integer, not {value!r}")
            if not 0 <= value <= f.max_value:
                raise DescriptorError(f"{name}.{f.name}={value:#x} is outside 0..{f.max_value:#x}")
            object.__setattr__(self, f.name, bool(value) if f.flag else int(value))
        self._check()

    def _check(self) -> None:
        """Structure-specific rules beyond field widths (overridden)."""

    @property
    def raw(self) -> int:
        """The structure as one little-endian integer."""
        raw = 0
        for f in self._LAYOUT:
            raw = f.insert(raw, int(getattr(self, f.name)))
        return raw

    def to_bytes(self) -> bytes:
        """The structure as it lies in memory."""
        return self.raw.to_bytes(self._SIZE, "little")

    @classmethod
    def from_int(cls: type[_P], raw: int) -> _P:
        """Decode from the structure's little-endian integer value.

        :raises DescriptorError: ``raw`` does not fit, or a must-be-zero field is set.
        """
        bits = cls._SIZE * 8
        if not isinstance(raw, int) or not 0 <= raw < 1 << bits:
            raise DescriptorError(f"{cls.__name__}: {raw!r} is not a {bits}-bit value")
        for f in cls._MUST_BE_ZERO:
            if f.extract(raw):
                raise DescriptorError(
                    f"{cls.__name__}: {f.label} must be zero, found {f.extract(raw):#x}"
                )
        values: dict[str, Any] = {f.name: f.extract(raw) for f in cls._LAYOUT}
        return cls(**values)

    @classmethod
    def from_bytes(cls: type[_P], data: bytes | bytearray | memoryview) -> _P:
        """Decode from exactly the structure's size in bytes.

        :raises DescriptorError: wrong length (or anything :meth:`from_int` rejects).
        """
        buf = as_bytes(data, cls.__name__)
        if len(buf) != cls._SIZE:
            raise DescriptorError(f"{cls.__name__} needs {cls._SIZE} bytes, got {len(buf)}")
        return cls.from_int(int.from_bytes(buf, "little"))


def describe_bit_layout(structure: BitPacked | type[BitPacked]) -> str:
    """The field table of a bit-packed structure, most significant bit first.

    Split fields show which bits of the value each piece holds (``Base 31:24``);
    must-be-zero fields are marked. An instance adds a value column.
    """
    cls = structure if isinstance(structure, type) else type(structure)
    raw = None if isinstance(structure, type) else structure.raw
    rows: list[tuple[int, str, str, str]] = []
    for f, zero in [(f, False) for f in cls._LAYOUT] + [(f, True) for f in cls._MUST_BE_ZERO]:
        shift = 0
        for piece in f.pieces:
            bits = f"{piece.hi}:{piece.lo}" if piece.width > 1 else str(piece.lo)
            label = f.label
            if len(f.pieces) > 1 and f.name != "reserved":
                label = f"{f.label} {shift + piece.width - 1}:{shift}"
            if zero:
                label += " (must be 0)"
            value = "" if raw is None else hex(piece.extract(raw))
            rows.append((piece.lo, bits, label, value))
            shift += piece.width
    rows.sort(reverse=True)
    return format_table(("bits", "field", "value"), [row[1:] for row in rows])


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; an all-empty last column is dropped."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    if all(not row[-1] for row in table[1:]):
        table = [row[:-1] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
