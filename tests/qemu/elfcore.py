"""Write synthetic QEMU-style ELF cores: the layout ``dump-guest-memory`` produces.

Written from the ELF gABI and QEMU's ``QEMUCPUState`` description, independently
of :mod:`kctx_debug.qemu_dump`, so tests can compare the importer against it.
The file is ELF header, program headers, one PT_NOTE (a CORE NT_PRSTATUS note per
CPU, then a QEMU note per CPU), then the PT_LOAD contents back to back: their
file offsets are not page aligned, as in real dumps. ``e_ehsize`` is 8, as QEMU
writes it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "QEMU_GPRS",
    "QEMU_SEGMENTS",
    "CoreLayout",
    "CpuNote",
    "Load",
    "write_core",
]

QEMU_GPRS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
# struct user_regs_struct order (Linux arch/x86/include/asm/user_64.h).
USER_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base",
    "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip


@dataclass
class CpuNote:
    """One vCPU: 18 registers, 10 segments as (selector, limit, flags, base), CR0-CR4."""

    regs: dict[str, int]
    segments: dict[str, tuple[int, int, int, int]]
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int | None = 0  # None: the 0x1B0-byte variant of older QEMU
    version: int = 1
    size: int | None = None  # override the size field (to test rejection)

    def qemu_state(self) -> bytes:
        body = struct.pack("<18Q", *(self.regs.get(r, 0) for r in QEMU_GPRS))
        for name in QEMU_SEGMENTS:
            selector, limit, flags, base = self.segments.get(name, (0, 0, 0, 0))
            body += struct.pack("<IIIIQ", selector, limit, flags, 0, base)
        body += struct.pack("<5Q", *self.cr)
        if self.kernel_gs_base is not None:
            body += struct.pack("<Q", self.kernel_gs_base)
        size = self.size if self.size is not None else 8 + len(body)
        return struct.pack("<II", self.version, size) + body

    def prstatus(self, pid: int) -> bytes:
        """Linux x86-64 struct elf_prstatus (336 bytes): pid at 32, registers at 112."""
        values = dict(self.regs)
        values["orig_rax"] = (1 << 64) - 1
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            values[name] = self.segments.get(name, (0, 0, 0, 0))[0]
        values["fs_base"] = self.segments.get("fs", (0, 0, 0, 0))[3]
        values["gs_base"] = self.segments.get("gs", (0, 0, 0, 0))[3]
        out = bytearray(336)
        struct.pack_into("<I", out, 32, pid)
        struct.pack_into("<27Q", out, 112, *(values.get(r, 0) for r in USER_REGS))
        return bytes(out)


@dataclass
class Load:
    """One PT_LOAD: guest-physical base, contents (or a size for a sparse all-zero one)."""

    paddr: int
    data: bytes = b""
    size: int = 0  # used when data is empty: written as a hole
    memsz: int | None = None  # default: the file size

    @property
    def filesz(self) -> int:
        return len(self.data) if self.data else self.size


def _note(name: str, ntype: int, desc: bytes) -> bytes:
    raw = name.encode() + b"\0"
    return (
        struct.pack("<III", len(raw), len(desc), ntype)
        + raw + bytes(-len(raw) % 4)
        + desc + bytes(-len(desc) % 4)
    )  # fmt: skip


@dataclass
class CoreLayout:
    """Where :func:`write_core` put each part (for tests that corrupt a file on purpose)."""

    phoff: int = 0
    note_offset: int = 0
    note_size: int = 0
    load_offsets: list[int] = field(default_factory=list)
    file_size: int = 0


def write_core(
    path: Path,
    cpus: list[CpuNote],
    loads: list[Load],
    *,
    qemu_name: str = "QEMU",
    extra_notes: bytes = b"",
    e_type: int = 4,
) -> CoreLayout:
    """Write the core; returns the offsets used."""
    notes = b"".join(_note("CORE", 1, c.prstatus(i + 1)) for i, c in enumerate(cpus))
    notes += b"".join(_note(qemu_name, 0, c.qemu_state()) for c in cpus)
    notes += extra_notes
    phnum = 1 + len(loads)
    phoff = 64
    layout = CoreLayout(phoff=phoff)
    layout.note_offset = phoff + 56 * phnum
    layout.note_size = len(notes)
    pos = layout.note_offset + len(notes)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, layout.note_offset, 0, 0, len(notes), len(notes), 0)
    for load in loads:
        layout.load_offsets.append(pos)
        memsz = load.memsz if load.memsz is not None else load.filesz
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, pos, 0, load.paddr, load.filesz, memsz, 0)
        pos += load.filesz
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", e_type, 62, 1, 0, phoff, 0, 0, 8, 56, phnum,
                                 0, 0, 0)  # fmt: skip
    with open(path, "wb") as f:
        f.write(header + phdrs + notes)
        for load, offset in zip(loads, layout.load_offsets, strict=True):
            if load.data:
                f.seek(offset)
                f.write(load.data)
        f.truncate(pos)
    layout.file_size = pos
    return layout
