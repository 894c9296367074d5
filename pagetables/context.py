"""A kernel context: a snapshot with its memory mapped, built, and walkable.

This is the offline view every higher layer starts from: the emulator builds a
Unicorn machine from it, the REPL inspects it, and ``ptdump`` dumps it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import CommandError, KctxError
from ..physmem import PhysicalMemory
from ..qemu_dump import is_qemu_dump, read_qemu_dump
from ..snapshot import Snapshot
from ..snapshot_io import load_snapshot
from ..symbols import Symbol, SymbolTable, load_symbols
from ..tables import materialize_descriptors
from .build import build_page_tables
from .entry import PagingMode, paging_mode
from .walk import Access, CpuPagingState, WalkResult, translate

__all__ = ["KernelContext", "TranslationFault", "open_context"]


class TranslationFault(KctxError):
    """A virtual access that the page tables do not allow; ``result`` has the walk."""

    def __init__(self, result: WalkResult) -> None:
        self.result = result
        reason = result.fault.reason if result.fault else "not mapped"
        super().__init__(f"cannot access {result.va:#x}: {reason}")


@dataclass
class KernelContext:
    """Snapshot + physical memory (build section applied) + page-table walker."""

    snapshot: Snapshot
    mem: PhysicalMemory

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> KernelContext:
        mem = snapshot.open_memory()
        try:
            build = snapshot.build
            if build is not None:
                materialize_descriptors(mem, build, snapshot.cpu)
                if build.page_tables is not None:
                    build_page_tables(mem, build.page_tables)
        except BaseException:
            mem.close()
            raise
        return cls(snapshot, mem)

    @property
    def cpu(self):  # -> CpuState
        return self.snapshot.cpu

    @property
    def paging(self) -> CpuPagingState:
        cpu = self.snapshot.cpu
        return CpuPagingState.from_registers(
            cr0=cpu.cr0,
            cr3=cpu.cr3,
            cr4=cpu.cr4,
            efer=cpu.efer,
            rflags=cpu.regs.get("rflags", 0),
            pkru=cpu.msrs.get("pkru", 0),
        )

    @property
    def mode(self) -> PagingMode:
        return paging_mode(self.paging.la57)

    @cached_property
    def symbols(self) -> SymbolTable:
        """Every symbol source the snapshot names, merged (files are read on first use)."""
        tables = []
        for i, src in enumerate(self.snapshot.symbols):
            if src.kind == "inline":
                table = SymbolTable.from_entries(Symbol(n, a, type="T") for n, a in src.entries)
            else:
                table = load_symbols(self.snapshot.resolve(src.path, f"symbols[{i}].path"))
            tables.append(table.relocated(src.offset) if src.offset else table)
        return SymbolTable.combine(tables)

    def translate(self, va: int, access: Access | None = None) -> WalkResult:
        return translate(self.mem, va, self.paging, access)

    def virt_to_phys(self, va: int, access: Access | None = None) -> int:
        """Physical address of ``va``; raises :class:`TranslationFault` when it faults."""
        result = self.translate(va, access)
        if result.phys is None or result.fault is not None:
            raise TranslationFault(result)
        return result.phys

    def read_virtual(self, va: int, size: int) -> bytes:
        """Read through the page tables, page by page (supervisor read access)."""
        out = bytearray()
        end = va + size
        while va < end:
            n = min(end, (va | 0xFFF) + 1) - va
            out += self.mem.read(self.virt_to_phys(va), n)
            va += n
        return bytes(out)

    def write_virtual(self, va: int, data: bytes) -> None:
        """Write through the page tables; checks every page before writing any."""
        pieces = []
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, 0x1000 - ((va + pos) & 0xFFF))
            pieces.append((self.virt_to_phys(va + pos), data[pos : pos + n]))
            pos += n
        for phys, piece in pieces:
            self.mem.write(phys, piece)

    def close(self) -> None:
        self.mem.close()


def open_context(
    path: str | os.PathLike[str],
    *,
    allow_outside: bool = False,
    cpu: int = 0,
    symbols: str | os.PathLike[str] | None = None,
) -> KernelContext:
    """Load a snapshot document or a QEMU ELF core (``cpu`` picks its vCPU) as a context."""
    if is_qemu_dump(path):
        return KernelContext.from_snapshot(read_qemu_dump(path, cpu=cpu, symbols=symbols))
    if cpu or symbols is not None:
        raise CommandError("--cpu and --symbols apply to QEMU ELF cores only")
    return KernelContext.from_snapshot(load_snapshot(Path(path), allow_outside=allow_outside))
