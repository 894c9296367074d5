"""One exception hierarchy for everything kctx-debug reports to a user.

Every error carries the data a caller needs (an address, a JSON path) as
attributes, and its ``str()`` is the one line the CLI prints.
"""

from __future__ import annotations

__all__ = [
    "CommandError",
    "DescriptorError",
    "KctxError",
    "MemoryAccessError",
    "PageTableError",
    "SnapshotError",
    "SymbolError",
    "TraceError",
    "UnbackedMemoryError",
]


class KctxError(Exception):
    """Base class: a problem the user can act on, printed as one line."""


class SnapshotError(KctxError):
    """A snapshot document (or a side file it names) is malformed.

    ``where`` is the JSON path (``cpu.cr3``, ``memory[2].size``) or a file name.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}" if where else reason)


class MemoryAccessError(KctxError):
    """A physical-memory access that cannot be served."""

    def __init__(self, address: int, message: str) -> None:
        self.address = address
        super().__init__(message)


class UnbackedMemoryError(MemoryAccessError):
    """A read or write touched physical memory the snapshot does not hold."""

    def __init__(self, address: int, size: int = 1) -> None:
        self.size = size
        super().__init__(address, f"physical address {address:#x} is not backed by the snapshot")


class DescriptorError(KctxError):
    """A descriptor table (GDT, IDT, TSS) cannot be decoded or written."""


class SymbolError(KctxError):
    """A symbol file is malformed or a symbol is unknown."""


class PageTableError(KctxError):
    """A page-table build or walk request is invalid (not a fault: see WalkResult)."""


class CommandError(KctxError):
    """A CLI or REPL command was used wrongly."""


class TraceError(KctxError):
    """A trap log (trace) file is malformed: ``path`` and 1-based ``line`` say where."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
