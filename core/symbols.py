"""Kernel symbol tables: load kallsyms, System.map or ELF symbols and map addresses to names.

>>> table = SymbolTable.from_kallsyms("ffffffff81000000 T _text\\nffffffff81000100 t helper\\n")
>>> table.format_address(0xffffffff81000010)
'0xffffffff81000010 <_text+0x10>'
>>> hex(table.address("helper"))
'0xffffffff81000100'

.. _symbol lookup rules:

Lookup rules
------------
- ``lookup(address)`` picks the symbol with the greatest address ``<= address``.
- Among aliases at one address (``_text``/``_stext``) the representative is the first by:
  global before local, text (``T``/``t``) before other types, known size before unknown,
  shorter name (``_text`` before ``_stext``, ``__x64_sys_read`` before ``__ia32_sys_read``),
  then name.
- No hit (``None``) below the first symbol, at or past the symbol's end when its size is
  known, or more than ``max_distance`` bytes past it when the size is unknown (0). The default,
  :data:`DEFAULT_MAX_DISTANCE` (1 MiB), exceeds any kernel function yet keeps far-off
  addresses past the last symbol from being named after it.
- Absolute (``A``/``a``) and undefined (``U``/``w``/``v``) symbols are values, not places:
  name lookups see them, ``lookup`` never returns them and ``relocated`` never moves them.
- ``SymbolHit`` prints ``name`` at offset 0, else ``name+0x10`` (hex, where GDB prints
  ``<name+16>``), then `` [module]`` for module symbols.
- A name defined several times (static symbols of several files): ``get`` returns the
  lowest-addressed global definition, else the lowest-addressed one; ``address`` raises
  instead when those candidates are at different addresses.

.. _symbol file failures:

Failures
--------
Every problem raises :class:`~kctx_debug.errors.SymbolError` naming the file (and line, for
text): missing or unreadable file, malformed line, all addresses zero (kallsyms read without
privilege), an ELF file that cannot be parsed or has no symbol table, an unknown or ambiguous
name, a relocation leaving the 64-bit address space.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice, takewhile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import Section

from kctx_debug.errors import SymbolError

__all__ = ["DEFAULT_MAX_DISTANCE", "Symbol", "SymbolHit", "SymbolTable", "load_symbols"]

#: Largest ``lookup`` offset accepted past a symbol of unknown size (see the lookup rules).
DEFAULT_MAX_DISTANCE = 0x100000
_ADDRESS_LIMIT = 2**64
_ELF_MAGIC = b"\x7fELF"
# nm letters of symbols that are values rather than locations: absolute and undefined.
_UNLOCATED = frozenset("AaUwv")
# Alias preference by type letter: global text, other global, local text, other local.
_TYPE_RANK = {c: (2 if c.islower() else 0) + (c not in "Tt") for c in map(chr, range(32, 127))}
_ELF_KEPT_TYPES = frozenset({"STT_FUNC", "STT_OBJECT", "STT_NOTYPE"})
_ELF_SKIPPED_SECTIONS = frozenset({"SHN_UNDEF", "SHN_COMMON"})
# Non-allocated sections that binutils classes as debugging information (nm letter 'N').
_DEBUG_SECTION_PREFIXES = (".debug", ".gnu.linkonce.wi.", ".line", ".stab", ".gdb_index")


@dataclass(frozen=True, slots=True)
class Symbol:
    """One symbol: ``type`` is the nm/kallsyms letter (uppercase = global), ``size`` 0 = unknown."""

    name: str
    address: int
    size: int = 0
    type: str = "T"
    module: str | None = None

    @property
    def is_global(self) -> bool:
        """True for uppercase letters (global, including weak ``W``/``V``)."""
        return self.type.isupper()

    @property
    def is_text(self) -> bool:
        """True for code symbols (``T``/``t``)."""
        return self.type in ("T", "t")


@dataclass(frozen=True, slots=True)
class SymbolHit:
    """The result of :meth:`SymbolTable.lookup`: a symbol and the offset into it."""

    symbol: Symbol
    offset: int

    def __str__(self) -> str:
        text = self.symbol.name if self.offset == 0 else f"{self.symbol.name}+{self.offset:#x}"
        return f"{text} [{self.symbol.module}]" if self.symbol.module else text


class _Columns(NamedTuple):
    """Parallel per-symbol lists: 200k symbols as five lists, not 200k objects, build fast."""

    names: list[str]
    addrs: list[int]
    sizes: list[int]
    types: list[str]
    modules: list[str | None]


def _columns_valid(cols: _Columns) -> bool:
    """Whole-column type and range checks: the fast path for valid input."""
    names, addrs, sizes, types, modules = cols
    if not names:
        return True
    if set(map(type, names + types)) != {str} or set(map(type, addrs + sizes)) != {int}:
        return False
    if not set(map(type, modules)) <= {str, type(None)}:
        return False
    in_range = min(addrs + sizes) >= 0 and max(addrs + sizes) < _ADDRESS_LIMIT
    return in_range and all(names) and all(len(t) == 1 for t in set(types))


class SymbolTable:
    """An immutable, address-sorted symbol table; see the :ref:`symbol lookup rules`.

    :param symbols: the symbols, in any order; duplicates are kept as given.
    :param max_distance: largest offset ``lookup`` accepts past a symbol of unknown size.
    :raises SymbolError: an address outside 0..2**64-1, a negative size, an empty name or a
        type that is not one character.
    """

    __slots__ = (
        "_addr", "_dups", "_first", "_loc_addrs", "_loc_index", "_max_distance", "_module",
        "_name", "_names", "_size", "_type",
    )  # fmt: skip

    def __init__(
        self, symbols: Iterable[Symbol], *, max_distance: int = DEFAULT_MAX_DISTANCE
    ) -> None:
        syms = list(symbols)
        # Per-field lists, not per-symbol tuples: fewer new objects, so less GC work.
        names, addrs = [s.name for s in syms], [s.address for s in syms]
        sizes, types = [s.size for s in syms], [s.type for s in syms]
        self._build(_Columns(names, addrs, sizes, types, [s.module for s in syms]), max_distance)

    @classmethod
    def _make(cls, cols: _Columns, max_distance: int) -> SymbolTable:
        table = cls.__new__(cls)
        table._build(cols, max_distance)
        return table

    def _build(self, cols: _Columns, max_distance: int) -> None:
        names, addrs, sizes, types, modules = cols
        for sym in map(Symbol, *cols) if not _columns_valid(cols) else ():
            single = _Columns([sym.name], [sym.address], [sym.size], [sym.type], [sym.module])
            if not _columns_valid(single):
                raise SymbolError(f"invalid symbol {sym!r}")
        if not isinstance(max_distance, int) or max_distance < 0:
            raise SymbolError(f"max_distance must be an integer >= 0, got {max_distance!r}")
        # numpy sorts the addresses; only runs of aliases need Python-level tie-breaking.
        addr_array = np.array(addrs, dtype=np.uint64)
        order_array = np.argsort(addr_array, kind="stable")
        ordered = addr_array[order_array]
        order, self._addr = order_array.tolist(), ordered.tolist()

        def alias_key(i: int) -> tuple[int, bool, int, str]:
            return (_TYPE_RANK.get(types[i], 4), sizes[i] == 0, len(names[i]), names[i])

        for value in np.unique(ordered[1:][ordered[1:] == ordered[:-1]]).tolist():
            lo = bisect.bisect_left(self._addr, value)
            hi = bisect.bisect_right(self._addr, value, lo)
            order[lo:hi] = sorted(order[lo:hi], key=alias_key)
        self._name = [names[i] for i in order]
        self._size = [sizes[i] for i in order]
        self._type = [types[i] for i in order]
        self._module = [modules[i] for i in order]
        # lookup() bisects the distinct located addresses, each mapped to its representative.
        located = np.flatnonzero([t not in _UNLOCATED for t in self._type])
        loc_addrs = ordered[located]
        first = np.ones(len(located), dtype=bool)
        first[1:] = loc_addrs[1:] != loc_addrs[:-1]
        self._loc_addrs: list[int] = loc_addrs[first].tolist()
        self._loc_index: list[int] = located[first].tolist()
        # Inserting in reverse leaves each name mapped to its first (lowest) index.
        count = len(names)
        self._first = dict(zip(reversed(self._name), range(count - 1, -1, -1), strict=True))
        self._dups: dict[str, list[int]] = {}  # every index of each repeated name
        for i, name in enumerate(self._name) if len(self._first) != count else ():
            if self._first[name] != i:
                self._dups.setdefault(name, [self._first[name]]).append(i)
        self._names = sorted(self._first)
        self._max_distance = max_distance

    def _symbol(self, i: int) -> Symbol:
        return Symbol(self._name[i], self._addr[i], self._size[i], self._type[i], self._module[i])

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_entries(
        cls, symbols: Iterable[Symbol], *, max_distance: int = DEFAULT_MAX_DISTANCE
    ) -> SymbolTable:
        """Build a table from :class:`Symbol` objects (the same as the constructor)."""
        return cls(symbols, max_distance=max_distance)

    @classmethod
    def from_kallsyms(
        cls, source: str | os.PathLike[str], *, max_distance: int = DEFAULT_MAX_DISTANCE
    ) -> SymbolTable:
        """Parse ``/proc/kallsyms`` lines: ``ffffffff81000000 T _text``, optionally ``\\t[mod]``.

        :param source: a path (any ``os.PathLike``, or a ``str`` without a newline), or the
            text itself (a ``str`` containing a newline).
        :raises SymbolError: see the :ref:`symbol file failures`.
        """
        where, text = _text_source(source, "<kallsyms text>")
        return cls._make(_parse_text(text, where, modules=True), max_distance)

    @classmethod
    def from_system_map(
        cls, source: str | os.PathLike[str], *, max_distance: int = DEFAULT_MAX_DISTANCE
    ) -> SymbolTable:
        """Parse a ``System.map``: kallsyms lines without module fields; ``source`` as above."""
        where, text = _text_source(source, "<System.map text>")
        return cls._make(_parse_text(text, where, modules=False), max_distance)

    @classmethod
    def from_elf(
        cls, path: str | os.PathLike[str], *, max_distance: int = DEFAULT_MAX_DISTANCE
    ) -> SymbolTable:
        """Read the defined function, object and untyped symbols of an ELF file.

        Uses ``.symtab``, else ``.dynsym``; keeps ``st_size`` and gives each symbol the
        letter GNU ``nm`` prints. Section, file, TLS and ifunc symbols are skipped.

        :raises SymbolError: see the :ref:`symbol file failures`.
        """
        return cls(_elf_symbols(os.fspath(path)), max_distance=max_distance)

    @classmethod
    def combine(
        cls, tables: Iterable[SymbolTable], *, max_distance: int = DEFAULT_MAX_DISTANCE
    ) -> SymbolTable:
        """Merge tables, keeping one symbol per (name, address, module), a sized one if any.

        >>> a = SymbolTable.from_entries([Symbol("f", 0x1000)])
        >>> b = SymbolTable.from_entries([Symbol("f", 0x1000, 0x20), Symbol("g", 0x2000)])
        >>> [(s.name, s.size) for s in SymbolTable.combine([a, b])]
        [('f', 32), ('g', 0)]
        """
        kept: dict[tuple[str, int, str | None], Symbol] = {}
        for sym in chain.from_iterable(tables):
            old = kept.setdefault((sym.name, sym.address, sym.module), sym)
            if old.size == 0 and sym.size != 0:
                kept[sym.name, sym.address, sym.module] = sym
        return cls(kept.values(), max_distance=max_distance)

    def merged(self, other: SymbolTable) -> SymbolTable:
        """This table combined with ``other`` (see :meth:`combine`); keeps ``max_distance``."""
        return SymbolTable.combine((self, other), max_distance=self._max_distance)

    def relocated(self, delta: int) -> SymbolTable:
        """A copy with every located symbol moved by ``delta`` bytes (a KASLR slide).

        :raises SymbolError: a moved address would leave 0..2**64-1.
        """
        pairs = zip(self._addr, self._type, strict=True)
        moved = [a if t in _UNLOCATED else a + delta for a, t in pairs]
        if moved and not (min(moved) >= 0 and max(moved) < _ADDRESS_LIMIT):
            raise SymbolError(f"relocating by {delta:#x} moves symbols out of the address space")
        cols = _Columns(self._name, moved, self._size, self._type, self._module)
        return SymbolTable._make(cols, self._max_distance)

    # -- queries ------------------------------------------------------------------------------

    @property
    def max_distance(self) -> int:
        """Largest offset ``lookup`` accepts past a symbol of unknown size."""
        return self._max_distance

    def __len__(self) -> int:
        return len(self._name)

    def __iter__(self) -> Iterator[Symbol]:
        """All symbols by address; aliases at one address in representative order."""
        return map(self._symbol, range(len(self._name)))

    def __contains__(self, name: object) -> bool:
        return name in self._first

    def __repr__(self) -> str:
        return f"<SymbolTable of {len(self._name)} symbols>"

    def lookup(self, address: int) -> SymbolHit | None:
        """The symbol containing ``address``, or None; see the :ref:`symbol lookup rules`.

        >>> table = SymbolTable.from_entries([Symbol("f", 0x1000, 0x10), Symbol("g", 0x2000)])
        >>> str(table.lookup(0x100F)), table.lookup(0x1010), str(table.lookup(0x2000))
        ('f+0xf', None, 'g')
        """
        where = bisect.bisect_right(self._loc_addrs, address) - 1
        if where < 0:
            return None
        i = self._loc_index[where]
        offset, size = address - self._addr[i], self._size[i]
        if offset >= (size or self._max_distance + 1):
            return None
        return SymbolHit(self._symbol(i), offset)

    def format_address(self, address: int) -> str:
        """``0xffffffff81000010 <_text+0x10>``, or just the hex when no symbol contains it."""
        hit = self.lookup(address)
        return f"{address:#x} <{hit}>" if hit else f"{address:#x}"

    def get_all(self, name: str) -> tuple[Symbol, ...]:
        """Every definition of ``name``, lowest address first (empty if unknown)."""
        first = self._first.get(name)
        where = self._dups.get(name) or (() if first is None else (first,))
        return tuple(map(self._symbol, where))

    def get(self, name: str) -> Symbol | None:
        """The preferred definition of ``name`` (see the lookup rules), or None if unknown."""
        found = self.get_all(name)
        return next((s for s in found if s.is_global), found[0] if found else None)

    def address(self, name: str) -> int:
        """The address of ``name``.

        :raises SymbolError: ``unknown symbol 'foo'``, or the preferred definitions (the
            global ones, else all) are at several addresses.
        """
        found = self.get_all(name)
        if not found:
            raise SymbolError(f"unknown symbol {name!r}")
        addresses = sorted({s.address for s in [s for s in found if s.is_global] or found})
        if len(addresses) > 1:
            listed = ", ".join(f"{a:#x}" for a in addresses[:4])
            more = ", ..." if len(addresses) > 4 else ""
            raise SymbolError(
                f"ambiguous symbol {name!r}: defined at {len(addresses)} addresses ({listed}{more})"
            )
        return addresses[0]

    def names_with_prefix(self, prefix: str, limit: int | None = None) -> list[str]:
        """Sorted distinct names starting with ``prefix`` (tab completion), at most ``limit``."""
        following = islice(self._names, bisect.bisect_left(self._names, prefix), None)
        return list(islice(takewhile(lambda n: n.startswith(prefix), following), limit))


# -- file formats -----------------------------------------------------------------------------


def _os_error(where: str, exc: OSError) -> SymbolError:
    if isinstance(exc, FileNotFoundError):
        return SymbolError(f"{where}: symbol file not found")
    return SymbolError(f"{where}: cannot read symbol file: {exc.strerror or exc}")


def _text_source(source: str | os.PathLike[str], label: str) -> tuple[str, str]:
    """(name for messages, text) of a path or of literal text."""
    if isinstance(source, str) and "\n" in source:
        return label, source
    where = os.fspath(source)
    try:
        with open(where, encoding="utf-8") as handle:
            return where, handle.read()
    except UnicodeDecodeError as exc:
        raise SymbolError(f"{where}: not a text symbol file ({exc.reason})") from None
    except OSError as exc:
        raise _os_error(where, exc) from None


def _parse_text(text: str, where: str, *, modules: bool) -> _Columns:
    """Symbols of ``ADDRESS TYPE NAME`` lines (plus ``[module]`` if allowed); blanks skipped."""
    expected = "'ADDRESS TYPE NAME [[module]]'" if modules else "'ADDRESS TYPE NAME'"
    out = _Columns([], [], [], [], [])
    add_name, add_addr, add_type, add_module = (
        out.names.append, out.addrs.append, out.types.append, out.modules.append
    )  # fmt: skip
    for number, line in enumerate(text.split("\n"), 1):
        fields = line.split()
        if not fields:
            continue
        module = None
        if len(fields) == 4 and modules:
            module = fields[3]
            if not (module.startswith("[") and module.endswith("]") and len(module) > 2):
                raise SymbolError(f"{where}:{number}: expected '[module]', got {module!r}")
            module = module[1:-1]
        elif len(fields) != 3:
            raise SymbolError(f"{where}:{number}: expected {expected}, got {line.strip()!r:.80}")
        try:
            address = int(fields[0], 16)
        except ValueError:
            address = -1
        if not 0 <= address < _ADDRESS_LIMIT:
            raise SymbolError(f"{where}:{number}: bad address {fields[0]!r} (expected 64-bit hex)")
        if len(fields[1]) != 1:
            raise SymbolError(f"{where}:{number}: bad type {fields[1]!r} (expected one letter)")
        add_name(fields[2])
        add_addr(address)
        add_type(fields[1])
        add_module(module)
    out.sizes.extend([0] * len(out.names))
    if not out.names:
        raise SymbolError(f"{where}: no symbols found")
    if not any(out.addrs):
        raise SymbolError(
            f"{where}: all {len(out.names)} symbol addresses are zero: the kernel hides them "
            "(kernel.kptr_restrict); read the file as root, after "
            "'sysctl kernel.kptr_restrict=1' if it is 2"
        )
    return out


def _section_letter(section: Section) -> str:
    """nm's lowercase letter for symbols defined in ``section`` (binutils' section classes)."""
    flags, nobits = section["sh_flags"], section["sh_type"] == "SHT_NOBITS"
    writable = bool(flags & SH_FLAGS.SHF_WRITE)
    if flags & SH_FLAGS.SHF_EXECINSTR:
        return "t"
    if flags & SH_FLAGS.SHF_ALLOC and not nobits:
        return "d" if writable else "r"
    if nobits:
        return "b"
    if section.name.startswith(_DEBUG_SECTION_PREFIXES):
        return "N"
    return "d" if writable else "n"


def _elf_symbols(where: str) -> list[Symbol]:
    try:
        with open(where, "rb") as handle:
            elf = ELFFile(handle)
            tables = {s["sh_type"]: s for s in elf.iter_sections()}
            table = tables.get("SHT_SYMTAB") or tables.get("SHT_DYNSYM")
            if table is None:
                raise SymbolError(f"{where}: ELF file has no .symtab or .dynsym (stripped?)")
            letters: dict[int | str, str] = {"SHN_ABS": "a"}  # per section index
            found = []
            for sym in table.iter_symbols():
                info, shndx = sym["st_info"], sym["st_shndx"]
                kept = sym.name and info["type"] in _ELF_KEPT_TYPES
                if not kept or shndx in _ELF_SKIPPED_SECTIONS:
                    continue
                if shndx not in letters:
                    valid = isinstance(shndx, int) and shndx < elf.num_sections()
                    letters[shndx] = _section_letter(elf.get_section(shndx)) if valid else "?"
                if info["bind"] == "STB_WEAK":
                    letter = "V" if info["type"] == "STT_OBJECT" else "W"
                elif info["bind"] == "STB_GNU_UNIQUE":
                    letter = "u"
                elif info["bind"] == "STB_GLOBAL":
                    letter = letters[shndx].upper()
                else:
                    letter = letters[shndx]
                found.append(Symbol(sym.name, sym["st_value"], sym["st_size"], letter))
            return found
    except OSError as exc:
        raise _os_error(where, exc) from None
    except (ELFError, ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise SymbolError(f"{where}: malformed ELF file: {exc}") from None


def load_symbols(
    path: str | os.PathLike[str], *, max_distance: int = DEFAULT_MAX_DISTANCE
) -> SymbolTable:
    """Load an ELF file (recognised by its ``\\x7fELF`` magic) or a kallsyms/System.map file.

    :raises SymbolError: see the :ref:`symbol file failures`.
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as handle:
            magic = handle.read(len(_ELF_MAGIC))
    except OSError as exc:
        raise _os_error(where, exc) from None
    if magic == _ELF_MAGIC:
        return SymbolTable.from_elf(where, max_distance=max_distance)
    return SymbolTable.from_kallsyms(Path(where), max_distance=max_distance)
