"""Put ELF code into a kernel context: executables by physical address, objects by relocation.

- :func:`load_executable` copies an ``ET_EXEC`` image (a fixture kernel, a vmlinux) into
  physical memory at each ``PT_LOAD``'s ``p_paddr``, the way a boot loader does.
- :func:`load_relocatable` lays out an ``ET_REL`` object (a ``.o`` or a kernel module
  ``.ko``) at a chosen virtual address, writes it through the page tables and applies its
  x86-64 ``RELA`` relocations against its own symbols and the kernel's, the way the
  kernel's module loader does (``arch/x86/kernel/module.c`` supports the same types).

>>> module = load_relocatable(ctx, "module.o", 0xffffffffc0000000, symbols=kernel.symbols)
... # doctest: +SKIP
>>> str(module.symbols.lookup(0xffffffffc0000004))                      # doctest: +SKIP
'module_entry+0x4 [module]'

.. _elf load failures:

Failures
--------
Every problem is an :class:`ElfLoadError` (a :class:`~kctx_debug.errors.KctxError`) whose
message names the file and the segment, section, symbol or relocation at fault:
unreadable or malformed ELF, not x86-64 little-endian 64-bit, wrong ``e_type``, a segment
landing on unbacked physical memory, a section that cannot be written at its address,
:class:`UndefinedSymbolError`, :class:`UnsupportedRelocationError` and
:class:`RelocationOverflowError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import KctxError, SymbolError
from ..physmem import PhysicalMemory
from ..symbols import SymbolTable
from .elfreloc import (
    AppliedRelocation,
    ElfLoadError,
    LoadedSection,
    RelocationOverflowError,
    UndefinedSymbolError,
    UnsupportedRelocationError,
    relocate_object,
)

__all__ = [
    "AppliedRelocation",
    "ElfLoadError",
    "LoadedImage",
    "LoadedModule",
    "LoadedSection",
    "LoadedSegment",
    "RelocationOverflowError",
    "UndefinedSymbolError",
    "UnsupportedRelocationError",
    "load_executable",
    "load_relocatable",
]

_MACHINE = "EM_X86_64"
_ZERO_CHUNK = 1 << 20  # zero-fill a large .bss in pieces, not one huge buffer


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedSegment:
    """One ``PT_LOAD`` copied to physical memory."""

    index: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int  # p_flags: PF_X 1, PF_W 2, PF_R 4 (ELF gABI)


@dataclass(frozen=True)
class LoadedImage:
    """An executable placed in physical memory by :func:`load_executable`."""

    path: str
    entry: int
    segments: tuple[LoadedSegment, ...]
    symbols: SymbolTable


@dataclass(frozen=True)
class LoadedModule:
    """A relocatable object laid out and relocated by :func:`load_relocatable`."""

    path: str
    name: str
    base: int
    size: int
    sections: tuple[LoadedSection, ...]
    symbols: SymbolTable
    relocations: tuple[AppliedRelocation, ...]

    def section(self, name: str) -> LoadedSection:
        """The loaded section called ``name``; raises :class:`ElfLoadError` if absent."""
        for s in self.sections:
            if s.name == name:
                return s
        raise ElfLoadError(f"{self.path}: no allocated section {name!r}")


class _VirtualWriter(Protocol):
    def write_virtual(self, va: int, data: bytes) -> None: ...


# -- common --------------------------------------------------------------------------------------


def _open_elf(path: str, handle: BinaryIO, e_type: str) -> ELFFile:
    try:
        elf = ELFFile(handle)
        machine, kind = elf["e_machine"], elf["e_type"]
    except (ELFError, ValueError, KeyError) as exc:
        raise ElfLoadError(f"{path}: malformed ELF file: {exc}") from None
    if elf.elfclass != 64 or not elf.little_endian or machine != _MACHINE:
        raise ElfLoadError(
            f"{path}: not a 64-bit little-endian x86-64 ELF file "
            f"(class {elf.elfclass}, machine {machine})"
        )
    if kind != e_type:
        hint = {"ET_REL": "load_relocatable", "ET_EXEC": "load_executable"}.get(kind)
        raise ElfLoadError(
            f"{path}: is {kind}, expected {e_type}" + (f" (use {hint})" if hint else "")
        )
    return elf


def _guard(path: str, action: Callable[[], object]) -> object:
    """Run a pyelftools call, turning its parse errors into :class:`ElfLoadError`."""
    try:
        return action()
    except (ELFError, ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise ElfLoadError(f"{path}: malformed ELF file: {exc}") from None


# -- executables -------------------------------------------------------------------------------


def load_executable(target: PhysicalMemory | object, path: str | os.PathLike[str]) -> LoadedImage:
    """Copy every ``PT_LOAD`` of an ``ET_EXEC`` file to physical memory at its ``p_paddr``.

    ``p_filesz`` bytes come from the file and the rest of ``p_memsz`` is zeroed (``.bss``).
    Every segment is checked before any byte is written.

    :param target: a :class:`~kctx_debug.physmem.PhysicalMemory`, or anything with a
        ``.mem`` attribute holding one (a ``KernelContext``).
    :param path: the ELF file.
    :return: entry point, the segments, and the file's ``.symtab`` symbols (empty if stripped).
    :raises ElfLoadError: see the :ref:`elf load failures`.
    """
    mem: PhysicalMemory = getattr(target, "mem", target)
    where = os.fspath(path)
    try:
        with open(where, "rb") as handle:
            elf = _open_elf(where, handle, "ET_EXEC")
            pieces = _guard(where, lambda: _read_segments(elf))
            has_symbols = _guard(where, lambda: elf.get_section_by_name(".symtab") is not None)
            entry = elf["e_entry"]
    except OSError as exc:
        raise ElfLoadError(f"{where}: cannot read: {exc.strerror}") from None
    for seg, _data in pieces:
        _check_backed(mem, where, seg)
    for seg, data in pieces:
        mem.write(seg.paddr, data)
        for start in range(seg.paddr + seg.filesz, seg.paddr + seg.memsz, _ZERO_CHUNK):
            mem.write(start, bytes(min(_ZERO_CHUNK, seg.paddr + seg.memsz - start)))
    try:
        symbols = SymbolTable.from_elf(where) if has_symbols else SymbolTable(())
    except SymbolError as exc:
        raise ElfLoadError(str(exc)) from None
    return LoadedImage(where, entry, tuple(seg for seg, _ in pieces), symbols)


def _read_segments(elf: ELFFile) -> list[tuple[LoadedSegment, bytes]]:
    out = []
    for index, segment in enumerate(elf.iter_segments()):
        if segment["p_type"] != "PT_LOAD" or segment["p_memsz"] == 0:
            continue
        seg = LoadedSegment(
            index,
            segment["p_paddr"],
            segment["p_vaddr"],
            segment["p_filesz"],
            segment["p_memsz"],
            segment["p_flags"],
        )
        if seg.filesz > seg.memsz:
            raise ElfLoadError(
                f"{elf.stream.name}: PT_LOAD segment {index} has p_filesz {seg.filesz:#x} "
                f"larger than p_memsz {seg.memsz:#x}"
            )
        data = segment.data()
        if len(data) != seg.filesz:
            raise ElfLoadError(
                f"{elf.stream.name}: PT_LOAD segment {index} is truncated "
                f"({len(data):#x} of {seg.filesz:#x} bytes in the file)"
            )
        out.append((seg, data))
    return out


def _check_backed(mem: PhysicalMemory, where: str, seg: LoadedSegment) -> None:
    address, end = seg.paddr, seg.paddr + seg.memsz
    while address < end:
        region = mem.region_at(address)
        if region is None:
            raise ElfLoadError(
                f"{where}: PT_LOAD segment {seg.index} (physical {seg.paddr:#x}-{end:#x}) "
                f"lands on unbacked physical memory at {address:#x}"
            )
        address = region.end


# -- relocatable objects -----------------------------------------------------------------------


def load_relocatable(
    ctx: _VirtualWriter,
    path: str | os.PathLike[str],
    base_va: int,
    *,
    symbols: SymbolTable | Mapping[str, int] | None = None,
    name: str | None = None,
) -> LoadedModule:
    """Lay out, relocate and write an ``ET_REL`` object (``.o``/``.ko``) at ``base_va``.

    Allocated sections are placed in the kernel's order (code, read-only data, writable
    data, ``.bss``, then COMMON symbols), each at its ``sh_addralign``; ``.bss`` is zeroed.
    Undefined symbols are looked up in ``symbols``; an undefined weak symbol that is not
    found resolves to 0, as in the kernel's module loader. Nothing is written until every
    relocation has been computed, then each section is written with ``ctx.write_virtual``.

    :param ctx: a ``KernelContext`` or ``Machine`` (anything with ``write_virtual``); the
        pages ``[base_va, base_va + size)`` must be mapped writable.
    :param base_va: where the first section goes.
    :param symbols: the kernel's symbols: a :class:`~kctx_debug.symbols.SymbolTable` or a
        ``{name: address}`` mapping.
    :param name: module name recorded in the returned symbols (default: the file's stem).
    :return: section addresses, the object's defined symbols at their run-time
        addresses, and the relocations applied.
    :raises ElfLoadError: see the :ref:`elf load failures`.
    """
    where = os.fspath(path)
    module = name or Path(where).stem
    try:
        with open(where, "rb") as handle:
            elf = _open_elf(where, handle, "ET_REL")
            obj = _guard(where, lambda: relocate_object(elf, where, base_va, symbols, module))
    except OSError as exc:
        raise ElfLoadError(f"{where}: cannot read: {exc.strerror}") from None
    for section in obj.sections:
        start = section.address - base_va
        try:
            ctx.write_virtual(section.address, obj.image[start : start + section.size])
        except KctxError as exc:
            raise ElfLoadError(
                f"{where}: cannot write section {section.name} at {section.address:#x}: {exc}"
            ) from exc
    return LoadedModule(
        where, module, base_va, len(obj.image), obj.sections, obj.symbols, obj.relocations
    )
