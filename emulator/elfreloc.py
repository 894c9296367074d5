"""Relocating an ``ET_REL`` object (``.o``, ``.ko``): layout, symbols, x86-64 arithmetic.

The loader lays every allocated section out in a private buffer at a chosen base
address, resolves each relocation's symbol (the object's own, COMMON, or the kernel's)
and stores ``S + A [- P]`` after checking that the value fits the field. The buffer is
only written to guest memory by :func:`kctx_debug.emulator.elfload.load_relocatable`
once every relocation has succeeded.

>>> kind = RELOC_KINDS[ENUM_RELOC_TYPE_x64["R_X86_64_PC32"]]
>>> relocated_bytes(kind, symbol=0xffffffff81000000, addend=-4, place=0xffffffffc0000010).hex()
'ecffffc0'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from elftools.elf.constants import SH_FLAGS
from elftools.elf.descriptions import describe_reloc_type
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.relocation import Relocation, RelocationSection
from elftools.elf.sections import Section, SymbolTableSection

from ..errors import KctxError, SymbolError
from ..symbols import Symbol, SymbolTable

__all__ = [
    "MAX_OBJECT_SIZE",
    "RELOC_KINDS",
    "R_X86_64_NONE",
    "AppliedRelocation",
    "ElfLoadError",
    "FieldCheck",
    "LoadedSection",
    "RelocKind",
    "RelocatedObject",
    "RelocationOverflowError",
    "UndefinedSymbolError",
    "UnsupportedRelocationError",
    "relocate_object",
    "relocated_bytes",
]

_U64 = (1 << 64) - 1
#: Largest object laid out: Linux's x86-64 module area is 1520 MiB, so 1 GiB is generous.
MAX_OBJECT_SIZE = 1 << 30
R_X86_64_NONE = ENUM_RELOC_TYPE_x64["R_X86_64_NONE"]
# Compiler-made labels (string literals, constants) that nm and kallsyms leave out.
_ASSEMBLER_LOCAL = ".L"


class ElfLoadError(KctxError):
    """An ELF file cannot be loaded; see the :ref:`elf load failures`."""


class UndefinedSymbolError(ElfLoadError):
    """A relocation names a symbol that neither the object nor the kernel defines."""

    def __init__(self, path: str, symbol: str, section: str, offset: int) -> None:
        self.symbol = symbol
        self.section = section
        self.offset = offset
        super().__init__(
            f"{path}: undefined symbol {symbol!r} (relocation at {section}+{offset:#x})"
        )


class UnsupportedRelocationError(ElfLoadError):
    """A relocation type this loader does not implement (GOT/TLS/PLT-table types)."""

    def __init__(self, path: str, type_name: str, section: str, offset: int) -> None:
        self.type_name = type_name
        self.section = section
        self.offset = offset
        super().__init__(f"{path}: unsupported relocation {type_name} at {section}+{offset:#x}")


class RelocationOverflowError(ElfLoadError):
    """A relocated value does not fit the field (the object was built for another address)."""

    def __init__(
        self, path: str, type_name: str, symbol: str, section: str, offset: int, value: int
    ) -> None:
        self.type_name = type_name
        self.symbol = symbol
        self.section = section
        self.offset = offset
        self.value = value
        super().__init__(
            f"{path}: relocation {type_name} against {symbol!r} at {section}+{offset:#x} "
            f"overflows: value {value:#x} does not fit"
        )


# -- relocation arithmetic ---------------------------------------------------------------------


class FieldCheck(Enum):
    """How a truncated value is checked: the psABI's "zero-extend" and "sign-extend" notes."""

    UNSIGNED = "unsigned"
    SIGNED = "signed"
    WRAP = "wrap"  # the field is 64 bits wide: every value fits


@dataclass(frozen=True)
class RelocKind:
    """One relocation type: ``S + A`` (minus the place ``P`` when ``pc_relative``)."""

    width: int  # bytes written at the place
    pc_relative: bool
    check: FieldCheck


# x86-64 psABI (v1.0) table 4.10 "Relocation Types": the subset -mcmodel=kernel, -fno-pic
# code uses; Linux's arch/x86/kernel/module.c apply_relocate_add() accepts the same list.
RELOC_KINDS: dict[int, RelocKind] = {
    ENUM_RELOC_TYPE_x64["R_X86_64_64"]: RelocKind(8, False, FieldCheck.WRAP),
    ENUM_RELOC_TYPE_x64["R_X86_64_PC32"]: RelocKind(4, True, FieldCheck.SIGNED),
    ENUM_RELOC_TYPE_x64["R_X86_64_PLT32"]: RelocKind(4, True, FieldCheck.SIGNED),
    ENUM_RELOC_TYPE_x64["R_X86_64_32"]: RelocKind(4, False, FieldCheck.UNSIGNED),
    ENUM_RELOC_TYPE_x64["R_X86_64_32S"]: RelocKind(4, False, FieldCheck.SIGNED),
    ENUM_RELOC_TYPE_x64["R_X86_64_PC64"]: RelocKind(8, True, FieldCheck.WRAP),
}


def _fits(value: int, kind: RelocKind) -> bool:
    bits = kind.width * 8
    if kind.check is FieldCheck.WRAP:
        return True
    if kind.check is FieldCheck.UNSIGNED:
        return value < 1 << bits
    signed = value - (1 << 64) if value >> 63 else value
    return -(1 << (bits - 1)) <= signed < 1 << (bits - 1)


def relocated_bytes(kind: RelocKind, *, symbol: int, addend: int, place: int) -> bytes | None:
    """The little-endian field for ``S + A [- P]``, or None when the value overflows it.

    Addresses are 64-bit: the sum is taken modulo 2**64 before the field check, so a
    kernel address such as 0xffffffff80001000 fits a sign-extended 32-bit field.
    """
    value = (symbol + addend - (place if kind.pc_relative else 0)) & _U64
    if not _fits(value, kind):
        return None
    return (value & ((1 << (kind.width * 8)) - 1)).to_bytes(kind.width, "little")


# -- layout and resolution ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedSection:
    """An allocated section of a relocatable object at its run-time address."""

    name: str
    index: int
    address: int
    size: int
    flags: int  # sh_flags

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True)
class AppliedRelocation:
    """One relocation as written: where, which type, against which symbol, what value."""

    address: int
    type_name: str
    symbol: str
    value: int


@dataclass(frozen=True)
class RelocatedObject:
    """An object laid out at ``base`` in a private buffer, every relocation applied."""

    base: int
    image: bytes
    sections: tuple[LoadedSection, ...]
    symbols: SymbolTable
    relocations: tuple[AppliedRelocation, ...]


@dataclass
class _Layout:
    """Where each allocated section and each COMMON symbol goes, as offsets from the base."""

    sections: dict[int, int]  # section index -> offset
    commons: dict[int, int]  # symbol index -> offset
    size: int


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment if alignment > 1 else value


def _placement_rank(section: Section) -> int:
    """Group like the kernel does (text, read-only data, writable data, zero-filled)."""
    flags = section["sh_flags"]
    if section["sh_type"] == "SHT_NOBITS":
        return 3
    if flags & SH_FLAGS.SHF_EXECINSTR:
        return 0
    return 2 if flags & SH_FLAGS.SHF_WRITE else 1


def _layout(elf: ELFFile, symtab: SymbolTableSection | None, base: int) -> _Layout:
    alloc = [
        (i, s) for i, s in enumerate(elf.iter_sections()) if s["sh_flags"] & SH_FLAGS.SHF_ALLOC
    ]
    alloc.sort(key=lambda item: _placement_rank(item[1]))
    offset = 0
    sections = {}
    for index, section in alloc:
        offset = _align(base + offset, section["sh_addralign"]) - base
        sections[index] = offset
        offset += section["sh_size"]
    commons = {}
    if symtab is not None:
        for number, sym in enumerate(symtab.iter_symbols()):
            if sym["st_shndx"] == "SHN_COMMON":
                # For COMMON symbols st_value holds the alignment (ELF gABI, Symbol Values).
                offset = _align(base + offset, sym["st_value"]) - base
                commons[number] = offset
                offset += sym["st_size"]
    return _Layout(sections, commons, offset)


def relocate_object(
    elf: ELFFile,
    where: str,
    base: int,
    external: SymbolTable | Mapping[str, int] | None,
    module: str,
) -> RelocatedObject:
    """Lay out ``elf`` (an ``ET_REL``) at ``base`` and apply its relocations in a buffer.

    :param where: the file name, for messages.
    :param external: symbols for the object's undefined references.
    :param module: module name given to the returned symbols.
    :raises ElfLoadError: undefined symbol, unsupported type, overflow, bad section index.
    """
    work = _Relocator(elf, where, base, external, module)
    work.run()
    return RelocatedObject(
        base, bytes(work.image), work.sections, work.symbols, tuple(work.applied)
    )


class _Relocator:
    """One object being laid out in a private buffer and relocated (single use)."""

    def __init__(
        self,
        elf: ELFFile,
        where: str,
        base: int,
        external: SymbolTable | Mapping[str, int] | None,
        module: str,
    ) -> None:
        self.elf = elf
        self.where = where
        self.base = base
        self.external = external
        self.module = module
        self.image = bytearray()
        self.sections: tuple[LoadedSection, ...] = ()
        self.symbols = SymbolTable(())
        self.applied: list[AppliedRelocation] = []
        self.layout = _Layout({}, {}, 0)

    def run(self) -> None:
        elf = self.elf
        symtab = next((s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)), None)
        layout = _layout(elf, symtab, self.base)
        if layout.size > MAX_OBJECT_SIZE:
            raise ElfLoadError(
                f"{self.where}: allocated sections need {layout.size:#x} bytes, more than "
                f"{MAX_OBJECT_SIZE:#x}"
            )
        if not 0 <= self.base <= _U64 - layout.size:
            raise ElfLoadError(
                f"{self.where}: {layout.size:#x} bytes at {self.base:#x} leave the address space"
            )
        self.layout = layout
        self.image = bytearray(layout.size)
        placed = []
        for index, offset in layout.sections.items():
            section = elf.get_section(index)
            if section["sh_type"] != "SHT_NOBITS":
                data = section.data()
                if len(data) != section["sh_size"]:
                    raise ElfLoadError(f"{self.where}: section {section.name} is truncated")
                self.image[offset : offset + len(data)] = data
            placed.append(
                LoadedSection(
                    section.name,
                    index,
                    self.base + offset,
                    section["sh_size"],
                    section["sh_flags"],
                )
            )
        self.sections = tuple(sorted(placed, key=lambda s: s.address))
        self.symbols = self._defined_symbols(symtab)
        for section in elf.iter_sections():
            if not isinstance(section, RelocationSection):
                continue
            target = section["sh_info"]
            if target not in layout.sections:
                continue  # relocations for debug info and other unloaded sections
            if not section.is_RELA():
                raise ElfLoadError(
                    f"{self.where}: {section.name} is SHT_REL; x86-64 objects use SHT_RELA"
                )
            table = elf.get_section(section["sh_link"])
            if not isinstance(table, SymbolTableSection):
                raise ElfLoadError(f"{self.where}: {section.name} does not link a symbol table")
            for reloc in section.iter_relocations():
                self._apply(section.name, target, table, reloc)

    def _symbol_address(
        self, table: SymbolTableSection, number: int, reloc_where: str, offset: int
    ) -> tuple[str, int]:
        sym = table.get_symbol(number)
        shndx = sym["st_shndx"]
        name = sym.name
        if sym["st_info"]["type"] == "STT_SECTION" and isinstance(shndx, int):
            name = self.elf.get_section(shndx).name
        if shndx == "SHN_UNDEF":
            return name, self._external(name, sym["st_info"]["bind"], reloc_where, offset)
        if shndx == "SHN_ABS":
            return name, sym["st_value"]
        if shndx == "SHN_COMMON":
            return name, self.base + self.layout.commons[number]
        if not isinstance(shndx, int) or shndx not in self.layout.sections:
            raise ElfLoadError(
                f"{self.where}: relocation at {reloc_where}+{offset:#x} refers to {name!r} "
                f"in section {shndx}, which is not loaded"
            )
        return name, self.base + self.layout.sections[shndx] + sym["st_value"]

    def _external(self, name: str, bind: str, reloc_where: str, offset: int) -> int:
        table = self.external
        if isinstance(table, Mapping):
            if name in table:
                return table[name]
        elif table is not None and name in table:
            try:
                return table.address(name)
            except SymbolError as exc:
                raise ElfLoadError(
                    f"{self.where}: relocation at {reloc_where}+{offset:#x}: {exc}"
                ) from None
        if bind == "STB_WEAK":
            return 0
        raise UndefinedSymbolError(self.where, name, reloc_where, offset)

    def _apply(
        self, reloc_where: str, target: int, table: SymbolTableSection, reloc: Relocation
    ) -> None:
        rtype, offset = reloc["r_info_type"], reloc["r_offset"]
        target_name = self.elf.get_section(target).name
        if rtype == R_X86_64_NONE:
            return
        kind = RELOC_KINDS.get(rtype)
        type_name = describe_reloc_type(rtype, self.elf)
        if kind is None:
            raise UnsupportedRelocationError(self.where, type_name, target_name, offset)
        section_size = self.elf.get_section(target)["sh_size"]
        if offset + kind.width > section_size:
            raise ElfLoadError(
                f"{self.where}: {type_name} at {target_name}+{offset:#x} lies outside the "
                f"section ({section_size:#x} bytes)"
            )
        name, address = self._symbol_address(table, reloc["r_info_sym"], target_name, offset)
        place = self.base + self.layout.sections[target] + offset
        addend = reloc["r_addend"]
        stored = relocated_bytes(kind, symbol=address, addend=addend, place=place)
        if stored is None:
            value = (address + addend - (place if kind.pc_relative else 0)) & _U64
            raise RelocationOverflowError(self.where, type_name, name, target_name, offset, value)
        at = place - self.base
        self.image[at : at + kind.width] = stored
        self.applied.append(
            AppliedRelocation(place, type_name, name, int.from_bytes(stored, "little"))
        )

    def _defined_symbols(self, symtab: SymbolTableSection | None) -> SymbolTable:
        if symtab is None:
            return SymbolTable(())
        out = []
        for number, sym in enumerate(symtab.iter_symbols()):
            info, shndx = sym["st_info"], sym["st_shndx"]
            if not sym.name or info["type"] not in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                continue
            if info["bind"] == "STB_LOCAL" and sym.name.startswith(_ASSEMBLER_LOCAL):
                continue
            if shndx == "SHN_COMMON":
                address, letter = self.base + self.layout.commons[number], "b"
            elif isinstance(shndx, int) and shndx in self.layout.sections:
                section = self.elf.get_section(shndx)
                address = self.base + self.layout.sections[shndx] + sym["st_value"]
                letter = _letter(section)
            else:
                continue
            if info["bind"] != "STB_LOCAL":
                letter = letter.upper()
            out.append(Symbol(sym.name, address, sym["st_size"], letter, self.module))
        return SymbolTable(out)


def _letter(section: Section) -> str:
    """nm's letter for a symbol in an allocated section (lowercase: local)."""
    flags = section["sh_flags"]
    if flags & SH_FLAGS.SHF_EXECINSTR:
        return "t"
    if section["sh_type"] == "SHT_NOBITS":
        return "b"
    return "d" if flags & SH_FLAGS.SHF_WRITE else "r"
