"""GDB's ``x/NFU`` memory display: parsing the suffix and rendering units.

The suffix is a count N, a format letter F and a unit size U, each optional, in any
order after the count (GDB's rules): formats ``x`` hex, ``d`` signed, ``u`` unsigned,
``o`` octal, ``t`` binary, ``c`` character, ``a`` address (with symbol), ``s`` string,
``i`` instruction; units ``b`` 1, ``h`` 2, ``w`` 4, ``g`` 8 bytes. What is not given
comes from the previous ``x`` (initially ``x`` and ``w``); ``a`` implies ``g``, ``c``
implies ``b`` unless a unit is given.

>>> fmt = parse_format("/4gx")
>>> fmt.count, fmt.letter, fmt.size
(4, 'x', 8)
>>> str(format_units(0x1000, bytes(range(16)), parse_format("/4wx"))).split("\\t")
['0x1000:', '0x03020100', '0x07060504', '0x0b0a0908', '0x0f0e0d0c']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import CommandError
from .styled import Styled

__all__ = [
    "DEFAULT_FORMAT",
    "MAX_STRING",
    "UNIT_SIZES",
    "XFormat",
    "format_string",
    "format_units",
    "parse_format",
]

UNIT_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}
_LETTERS = "xduotcasi"
# Units per output line, by size, as GDB prints them.
_PER_LINE = {1: 8, 2: 8, 4: 4, 8: 2}
# A string (x/s) is read up to its NUL, at most this many bytes.
MAX_STRING = 256
# A display count above this is a typo, not a request (it would read megabytes).
MAX_COUNT = 1 << 16
_SUFFIX = re.compile(r"/(-?\d+)?([a-z]*)")


@dataclass(frozen=True)
class XFormat:
    """A parsed ``/NFU``: how many units, of which size, shown how."""

    count: int = 1
    letter: str = "x"
    size: int = 4

    @property
    def suffix(self) -> str:
        unit = {v: k for k, v in UNIT_SIZES.items()}[self.size]
        body = self.letter if self.letter in "si" else f"{unit}{self.letter}"
        return f"/{self.count}{body}"


DEFAULT_FORMAT = XFormat()


def parse_format(suffix: str, previous: XFormat = DEFAULT_FORMAT) -> XFormat:
    """``/8gx`` -> XFormat(8, 'x', 8); missing parts come from ``previous`` (count: 1).

    :raises CommandError: an unknown letter, two formats or sizes, or a bad count.
    """
    if not suffix:
        return replace(previous, count=1)
    m = _SUFFIX.fullmatch(suffix)
    if m is None:
        raise CommandError(f"invalid format {suffix!r} (expected /NFU, e.g. /8gx)")
    count = int(m.group(1)) if m.group(1) else 1
    if not 0 < count <= MAX_COUNT:
        raise CommandError(f"count {count} must be between 1 and {MAX_COUNT}")
    letter = size = None
    for ch in m.group(2):
        if ch in UNIT_SIZES:
            if size is not None:
                raise CommandError(f"two unit sizes in {suffix!r}")
            size = UNIT_SIZES[ch]
        elif ch in _LETTERS:
            if letter is not None:
                raise CommandError(f"two formats in {suffix!r}")
            letter = ch
        else:
            raise CommandError(
                f"unknown format letter {ch!r} in {suffix!r} (formats {_LETTERS}, sizes bhwg)"
            )
    letter = letter or previous.letter
    if size is None:
        size = {"a": 8, "c": 1}.get(letter, previous.size if previous.letter not in "ac" else 4)
    return XFormat(count, letter, size)


def _unit_text(value: int, letter: str, size: int) -> str:
    bits = size * 8
    if letter == "x":
        return f"0x{value:0{size * 2}x}"
    if letter == "d":
        return str(value - (1 << bits) if value >> (bits - 1) else value)
    if letter == "u":
        return str(value)
    if letter == "o":
        return f"0{value:o}" if value else "0"
    if letter == "t":
        return f"{value:0{bits}b}"
    if letter == "c":
        signed = value - 256 if value > 127 else value
        shown = chr(value) if 32 <= value < 127 else f"\\{value:03o}"
        return f"{signed} '{shown}'"
    raise CommandError(f"format {letter!r} does not apply to units")  # pragma: no cover


def format_units(address: int, data: bytes, fmt: XFormat, symbols: object | None = None) -> Styled:
    """Lines of ``address: unit unit …``; ``a`` units name their symbol.

    ``symbols`` is anything with ``lookup(address)`` (a SymbolTable); line addresses
    are labelled with it too.
    """
    size = fmt.size
    per_line = _PER_LINE[size]
    out = Styled()
    units = [int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)]
    units = units[: len(data) // size]
    for line_start in range(0, len(units), per_line):
        at = address + line_start * size
        if line_start:
            out.newline()
        out.add(f"{at:#x}", "addr")
        label = _label(symbols, at)
        if label:
            out.add(f" {label}", "sym")
        out.add(":")
        for value in units[line_start : line_start + per_line]:
            out.add("\t")
            if fmt.letter == "a":
                out.add(f"{value:#x}", "addr")
                target = _label(symbols, value)
                if target:
                    out.add(f" {target}", "sym")
            else:
                out.add(_unit_text(value, fmt.letter, size), "value")
    return out


def format_string(address: int, data: bytes, symbols: object | None = None) -> Styled:
    """``0x1000 <msg>:	"hello\\n"`` for bytes up to (not including) the NUL."""
    text = "".join(chr(b) if 32 <= b < 127 and b not in (0x22, 0x5C) else _escape(b) for b in data)
    out = Styled().add(f"{address:#x}", "addr")
    label = _label(symbols, address)
    if label:
        out.add(f" {label}", "sym")
    truncated = "..." if len(data) >= MAX_STRING else ""
    return out.add(":\t").add(f'"{text}"{truncated}', "value")


_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x1B: "\\e"}


def _escape(b: int) -> str:
    return _ESCAPES.get(b, f"\\{b:03o}")


def _label(symbols: object | None, address: int) -> str:
    lookup = getattr(symbols, "lookup", None)
    hit = lookup(address) if lookup is not None else None
    return f"<{hit}>" if hit is not None else ""
