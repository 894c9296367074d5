"""The snapshot model (format v1): CPU state, physical memory ranges, and extras.

A ``Snapshot`` is plain data. Physical memory is described by ``MemoryRange``
records and only mapped when :meth:`Snapshot.open_memory` is called. Reading
and writing the JSON document lives in :mod:`kctx_debug.snapshot_io`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .arch.registers import RegisterGroup
from .buildspec import BuildSpec
from .errors import KctxError, SnapshotError
from .physmem import PhysicalMemory, RangeKind

__all__ = [
    "CONTROL_REGISTERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GENERAL_REGISTERS",
    "KNOWN_MSRS",
    "SEGMENT_REGISTERS",
    "CpuState",
    "MemoryRange",
    "PagemapRecord",
    "RangeKind",
    "Segment",
    "Snapshot",
    "SymbolSource",
    "TableRegister",
]

FORMAT_NAME = "kctx-snapshot"
FORMAT_VERSION = 1

# The format's register names are the architecture's groups (kctx_debug.arch.registers).
GENERAL_REGISTERS = RegisterGroup.GENERAL.names
SEGMENT_REGISTERS = RegisterGroup.SEGMENT.names
CONTROL_REGISTERS = RegisterGroup.CONTROL.names
# MSRs by the names the format uses; PKRU is not an MSR but travels with them.
KNOWN_MSRS = (
    "efer", "fs_base", "gs_base", "kernel_gs_base", "star", "lstar", "cstar", "sfmask",
    "tsc_aux", "pat", "pkru",
)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """A segment register: the selector and, where known, its hidden part.

    ``attributes`` uses the VMCS access-rights layout (SDM vol. 3C 25.4.1):
    type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15.
    """

    selector: int
    base: int | None = None
    limit: int | None = None
    attributes: int | None = None


@dataclass(frozen=True)
class TableRegister:
    """GDTR or IDTR (SDM vol. 3A 2.4.1): linear base and 16-bit limit."""

    base: int
    limit: int


@dataclass(frozen=True)
class CpuState:
    """The architectural state of one CPU at the snapshot's instant."""

    regs: dict[str, int]  # GENERAL_REGISTERS, missing ones are 0
    cr0: int
    cr3: int
    cr4: int
    cr2: int = 0
    cr8: int = 0
    msrs: dict[str, int] = field(default_factory=dict)
    segments: dict[str, Segment] = field(default_factory=dict)
    gdtr: TableRegister = TableRegister(0, 0xFFFF)
    idtr: TableRegister = TableRegister(0, 0xFFFF)
    tr: Segment = Segment(0)
    ldtr: Segment = Segment(0)

    def reg(self, name: str) -> int:
        """A register by name: general, control, or MSR (0 when not recorded)."""
        if name in CONTROL_REGISTERS:
            return getattr(self, name)
        if name in self.regs:
            return self.regs[name]
        return self.msrs.get(name, 0)

    @property
    def efer(self) -> int:
        return self.msrs.get("efer", 0)

    @property
    def cpl(self) -> int:
        """Current privilege level: CS.RPL, which equals CS.DPL in long mode (SDM vol. 3A 5.5)."""
        cs = self.segments.get("cs")
        return cs.selector & 3 if cs else 0


@dataclass(frozen=True)
class MemoryRange:
    """One physical range and where its bytes come from."""

    base: int
    size: int
    kind: RangeKind
    data: bytes = field(default=b"", repr=False)  # INLINE; kept out of repr (may be megabytes)
    encoding: str = "hex"  # INLINE: "hex" or "base64"
    path: str = ""  # FILE: relative to the snapshot's folder
    offset: int = 0  # FILE: byte offset in the side file

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class PagemapRecord:
    """A ``/proc/PID/pagemap`` entry captured with the snapshot: VA and raw u64."""

    va: int
    entry: int


@dataclass(frozen=True)
class SymbolSource:
    """Where symbols come from: a file (ELF, System.map, kallsyms) or inline pairs."""

    kind: str  # "elf", "system.map", "kallsyms", "inline"
    path: str = ""
    entries: tuple[tuple[str, int], ...] = ()
    offset: int = 0  # added to every address (a KASLR slide)


@dataclass(frozen=True)
class Snapshot:
    """A machine snapshot: CPU, physical memory description, and optional extras."""

    cpu: CpuState
    memory: tuple[MemoryRange, ...]
    source: dict = field(default_factory=dict)
    build: BuildSpec | None = None
    pagemap: tuple[PagemapRecord, ...] = ()
    symbols: tuple[SymbolSource, ...] = ()
    arch: str = "x86_64"
    # Where the document was read from; side-file paths are relative to its folder.
    origin: Path | None = field(default=None, compare=False)
    allow_outside: bool = field(default=False, compare=False)

    @property
    def folder(self) -> Path:
        return self.origin.parent if self.origin else Path.cwd()

    def resolve(self, relative: str, where: str) -> Path:
        """A side file's path, refusing ones that leave the snapshot's folder."""
        folder = self.folder.resolve()
        path = (folder / relative).resolve()
        if not self.allow_outside and not path.is_relative_to(folder):
            raise SnapshotError(
                where,
                f"path {relative!r} leaves the snapshot's folder {folder} "
                "(pass --allow-outside-paths to permit it)",
            )
        return path

    def open_memory(self) -> PhysicalMemory:
        """Map every range (side files lazily, copy-on-write). Build sections are not applied."""
        mem = PhysicalMemory()
        try:
            for i, r in enumerate(self.memory):
                where = f"memory[{i}]"
                if r.kind is RangeKind.FILE:
                    side = self.resolve(r.path, where + ".path")
                    if not _regular_or_missing(side):
                        # open() on a FIFO blocks, and a device never ends.
                        raise SnapshotError(where + ".path", f"{r.path!r} is not a regular file")
                try:
                    if r.kind is RangeKind.INLINE:
                        mem.add_bytes(r.base, r.data)
                    elif r.kind is RangeKind.ZERO:
                        mem.add_zero(r.base, r.size)
                    else:
                        mem.add_file(r.base, side, r.offset, r.size)
                except OSError as e:
                    raise SnapshotError(where, f"cannot allocate {r.size:#x} bytes: {e}") from None
                except KctxError as e:
                    raise SnapshotError(where, str(e)) from None
        except BaseException:
            mem.close()
            raise
        return mem

    def content_hash(self) -> str:
        """SHA-256 of the canonical JSON form (memory by reference, not content)."""
        from .snapshot_io import snapshot_to_json

        doc = json.dumps(snapshot_to_json(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()


def _regular_or_missing(path: Path) -> bool:
    """False only for something that exists and is not a regular file (opening reports the rest)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True
