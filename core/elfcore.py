"""x86-64 ELF64 core files: header, program headers and notes, read with bounds checks.

Layouts from the System V gABI ("ELF Header", "Program Header", "Note Section").
:func:`read_elf_core` reads the headers and every PT_NOTE segment (bounded in
size); PT_LOAD contents are never read, only checked to lie inside the file.

Every failure is a :class:`~kctx_debug.errors.SnapshotError` whose ``where`` is
the file name: not a 64-bit little-endian x86-64 core, a header or segment past
the end of the file, a note whose sizes overrun its segment.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import SnapshotError

__all__ = [
    "ELF_MAGIC",
    "NT_PRSTATUS",
    "ElfCore",
    "ElfHeader",
    "ElfNote",
    "ProgramHeader",
    "is_elf_core",
    "iter_notes",
    "read_elf_core",
]

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1  # e_ident[EI_CLASS], e_ident[EI_DATA]
_ET_CORE = 4
_EM_X86_64 = 62
_PT_LOAD, _PT_NOTE = 1, 4
_PN_XNUM = 0xFFFF  # e_phnum escape: the real count is section header 0's sh_info
_SH_INFO_OFFSET = 44  # in an Elf64_Shdr
_SHDR_SIZE = 64  # an Elf64_Shdr
NT_PRSTATUS = 1
_NOTE_ALIGN = 4
_NOTE_HEADER = struct.Struct("<III")  # n_namesz, n_descsz, n_type
_MAX_NOTE_BYTES = 16 << 20  # far above 1 KiB per vCPU; bounds what we read eagerly
_MAX_PHDRS = 1 << 20
_SNIFF_BYTES = 18  # e_ident and e_type


@dataclass(frozen=True)
class ElfHeader:
    """The Elf64_Ehdr fields a core needs (QEMU writes e_ehsize 8; it is not checked)."""

    e_ident: bytes
    e_type: int
    e_machine: int
    e_version: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_flags: int
    e_ehsize: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int

    LAYOUT = struct.Struct("<16sHHIQQQIHHHHHH")

    @classmethod
    def from_bytes(cls, data: bytes) -> ElfHeader:
        return cls(*cls.LAYOUT.unpack_from(data))


@dataclass(frozen=True)
class ProgramHeader:
    """One Elf64_Phdr."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int

    LAYOUT = struct.Struct("<IIQQQQQQ")

    @classmethod
    def from_bytes(cls, data: bytes, offset: int = 0) -> ProgramHeader:
        return cls(*cls.LAYOUT.unpack_from(data, offset))


@dataclass(frozen=True)
class ElfNote:
    """One note: owner name (NUL stripped), type, descriptor bytes, file offset of its header."""

    name: str
    type: int
    desc: bytes
    offset: int


@dataclass(frozen=True)
class ElfCore:
    """What :func:`read_elf_core` found: the header, PT_LOADs (in file order) and all notes."""

    file_size: int
    header: ElfHeader
    loads: tuple[ProgramHeader, ...]
    notes: tuple[ElfNote, ...]


def is_elf_core(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` starts like a 64-bit little-endian ELF core (False if unreadable)."""
    if not os.path.isfile(path):
        return False  # never open a FIFO or device just to sniff it
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    return (
        len(head) == _SNIFF_BYTES
        and head[:4] == ELF_MAGIC
        and head[4] == _ELFCLASS64
        and head[5] == _ELFDATA2LSB
        and int.from_bytes(head[16:18], "little") == _ET_CORE
    )


def _read_at(f: BinaryIO, where: str, offset: int, size: int, file_size: int, what: str) -> bytes:
    if offset < 0 or offset + size > file_size:
        raise SnapshotError(
            where, f"{what} at offset {offset:#x} (+{size:#x}) is past the end ({file_size:#x})"
        )
    f.seek(offset)
    return f.read(size)


def iter_notes(data: bytes, base: int, where: str) -> list[ElfNote]:
    """The notes of one PT_NOTE segment's bytes; ``base`` is the segment's file offset."""
    notes, pos = [], 0
    while pos < len(data):
        at = base + pos
        if pos + _NOTE_HEADER.size > len(data):
            raise SnapshotError(where, f"note header at offset {at:#x} is cut off by PT_NOTE's end")
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, pos)
        name_at = pos + _NOTE_HEADER.size
        desc_at = name_at + namesz + (-namesz % _NOTE_ALIGN)
        end = desc_at + descsz + (-descsz % _NOTE_ALIGN)
        if desc_at + descsz > len(data):
            raise SnapshotError(
                where,
                f"note at offset {at:#x} has bad sizes (namesz {namesz:#x}, descsz {descsz:#x}): "
                f"they overrun the PT_NOTE segment ({len(data):#x} bytes)",
            )
        name = data[name_at : name_at + namesz].rstrip(b"\0").decode("ascii", "replace")
        notes.append(ElfNote(name, ntype, data[desc_at : desc_at + descsz], at))
        pos = end
    return notes


def _read_header(f: BinaryIO, where: str, file_size: int) -> ElfHeader:
    raw = _read_at(f, where, 0, ElfHeader.LAYOUT.size, file_size, "ELF header")
    if raw[:4] != ELF_MAGIC:
        raise SnapshotError(where, "not an ELF file (no \\x7fELF magic)")
    hdr = ElfHeader.from_bytes(raw)
    if hdr.e_ident[4] != _ELFCLASS64 or hdr.e_ident[5] != _ELFDATA2LSB:
        raise SnapshotError(where, "not a 64-bit little-endian ELF file")
    if hdr.e_type != _ET_CORE or hdr.e_machine != _EM_X86_64:
        raise SnapshotError(
            where, f"not an x86-64 core (e_type {hdr.e_type}, e_machine {hdr.e_machine})"
        )
    if hdr.e_phentsize != ProgramHeader.LAYOUT.size:
        raise SnapshotError(where, f"e_phentsize {hdr.e_phentsize}, expected 56")
    return hdr


def _read_program_headers(
    f: BinaryIO, where: str, file_size: int, hdr: ElfHeader
) -> list[ProgramHeader]:
    phnum = hdr.e_phnum
    if phnum == _PN_XNUM:
        sh0 = _read_at(f, where, hdr.e_shoff, _SHDR_SIZE, file_size, "section header 0")
        phnum = int.from_bytes(sh0[_SH_INFO_OFFSET : _SH_INFO_OFFSET + 4], "little")
    if not 0 < phnum <= _MAX_PHDRS:
        raise SnapshotError(where, f"{phnum} program headers (expected 1..{_MAX_PHDRS})")
    table = _read_at(f, where, hdr.e_phoff, phnum * hdr.e_phentsize, file_size,
                     "program header table")  # fmt: skip
    return [ProgramHeader.from_bytes(table, i * hdr.e_phentsize) for i in range(phnum)]


def read_elf_core(path: str | os.PathLike[str]) -> ElfCore:
    """Read the header, program headers and notes of an x86-64 ELF64 core.

    :raises SnapshotError: see the module docstring; ``where`` is ``str(path)``.
    """
    where = str(Path(path))
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            hdr = _read_header(f, where, file_size)
            phdrs = _read_program_headers(f, where, file_size, hdr)
            loads = tuple(ph for ph in phdrs if ph.p_type == _PT_LOAD)
            for i, ph in enumerate(loads):  # numbered among the PT_LOADs, as everywhere here
                if ph.p_offset + ph.p_filesz > file_size:
                    raise SnapshotError(
                        where,
                        f"PT_LOAD {i} (offset {ph.p_offset:#x}, filesz {ph.p_filesz:#x}) "
                        f"is past the end of the file ({file_size:#x} bytes): truncated dump?",
                    )
                if ph.p_filesz > ph.p_memsz:
                    raise SnapshotError(where, f"PT_LOAD {i} has p_filesz above p_memsz")
            notes: list[ElfNote] = []
            for i, ph in enumerate(phdrs):
                if ph.p_type != _PT_NOTE:
                    continue
                if ph.p_filesz > _MAX_NOTE_BYTES:
                    raise SnapshotError(
                        where,
                        f"program header {i} (PT_NOTE) is {ph.p_filesz:#x} bytes, over 16 MiB",
                    )
                data = _read_at(f, where, ph.p_offset, ph.p_filesz, file_size,
                                f"program header {i} (PT_NOTE)")  # fmt: skip
                notes += iter_notes(data, ph.p_offset, where)
    except OSError as e:
        raise SnapshotError(where, f"cannot read: {e.strerror or e}") from None
    return ElfCore(file_size, hdr, loads, tuple(notes))
