"""Data watchpoints: stop after an instruction reads or writes a watched range.

A watchpoint covers a virtual range, translated when it is set into the
machine-physical pieces behind it: with paging on, Unicorn hands memory hooks physical
addresses (measured), so each piece gets a ``UC_HOOK_MEM_READ``/``WRITE`` hook bounded
to it (through :meth:`~kctx_debug.emulator.machine.Machine.hook_memory`); nothing
is hooked outside the watched bytes. Like the breakpoints, a watchpoint follows the
physical bytes: an alias of the page is watched too.

A hook records the access (the instruction, the address, the old value and the new
one) and asks the runner to stop once the instruction completes
(:meth:`~kctx_debug.emulator.control.Runner.stop_after_instruction`), which keeps the
instruction count exact: ``emu_stop`` inside a memory hook would abandon the
instruction after its store, with RIP still on it.

The accesses seen are the guest's own loads and stores (instructions, ``iretq`` …);
the debugger's reads and writes, page walks, and the frames trap delivery pushes are
not.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from kctx_debug.errors import CommandError, KctxError
from kctx_debug.pagetables.walk import AccessKind
from kctx_debug.physmem import PAGE_SIZE

__all__ = [
    "MAX_WATCH_SIZE",
    "WatchHit",
    "WatchKind",
    "WatchTable",
    "Watchpoint",
    "describe_watch_hit",
    "describe_watchpoint",
]

MAX_WATCH_SIZE = 1 << 20  # a watched range is at most this many bytes
_VALUE_BYTES = 8  # values are reported for accesses of up to 8 bytes
_WIDEST_ACCESS = 64  # bytes: an AVX-512 load or store


class WatchKind(enum.Enum):
    """Which accesses a watchpoint stops on (GDB's watch, rwatch, awatch)."""

    WRITE = "write"
    READ = "read"
    ACCESS = "access"

    def matches(self, kind: AccessKind) -> bool:
        if self is WatchKind.ACCESS:
            return True
        return (kind is AccessKind.WRITE) == (self is WatchKind.WRITE)


@dataclass(frozen=True)
class WatchHit:
    """One access to a watched range.

    ``address`` is the virtual address of the access (through the watched range's
    mapping), ``size`` its width; ``old`` is the value before it and ``new`` after it
    (equal for a read); values are None for accesses wider than 8 bytes.
    """

    watchpoint: int
    kind: AccessKind
    address: int
    phys: int
    size: int
    old: int | None
    new: int | None
    pc: int


@dataclass(frozen=True)
class _Piece:
    va: int
    phys: int
    size: int


@dataclass
class Watchpoint:
    number: int
    kind: WatchKind
    address: int
    size: int
    pieces: tuple[_Piece, ...]
    enabled: bool = True
    hits: int = 0
    handles: list[int] = field(default_factory=list, repr=False)


class _MachineView(Protocol):
    def virt_to_phys(self, va: int, access=None) -> int: ...
    def read_physical(self, address: int, size: int) -> bytes: ...
    def hook_memory(self, begin, end, callback, *, read=True, write=True) -> int: ...
    def unhook(self, handle: int) -> None: ...


class WatchTable:
    """The watchpoints of one machine; :meth:`take_hits` collects what the hooks saw.

    :param stop_after_instruction: called from a hook to end the run after the
        accessing instruction (the machine's runner's method).
    """

    def __init__(self, machine: _MachineView, stop_after_instruction: Callable[[], None]) -> None:
        self._machine = machine
        self._stop = stop_after_instruction
        self._by_number: dict[int, Watchpoint] = {}
        self._next = 1
        self._hits: list[WatchHit] = []

    def __iter__(self) -> Iterator[Watchpoint]:
        return iter(sorted(self._by_number.values(), key=lambda w: w.number))

    def __len__(self) -> int:
        return len(self._by_number)

    def get(self, number: int) -> Watchpoint:
        """:raises CommandError: no watchpoint has that number."""
        try:
            return self._by_number[number]
        except KeyError:
            raise CommandError(f"no watchpoint number {number}") from None

    def add(self, address: int, size: int, kind: WatchKind = WatchKind.WRITE) -> Watchpoint:
        """Watch ``[address, address + size)`` for ``kind`` accesses.

        :raises CommandError: a size outside 1..MAX_WATCH_SIZE or an unmapped page.
        """
        if not isinstance(size, int) or not 0 < size <= MAX_WATCH_SIZE:
            raise CommandError(f"watch size {size!r} must be 1..{MAX_WATCH_SIZE}")
        pieces = []
        pos = 0
        while pos < size:
            va = address + pos
            n = min(size - pos, PAGE_SIZE - (va % PAGE_SIZE))
            try:
                phys = self._machine.virt_to_phys(va)
            except KctxError as e:
                raise CommandError(f"cannot watch {va:#x}: {e}") from None
            pieces.append(_Piece(va, phys, n))
            pos += n
        wp = Watchpoint(self._next, kind, address, size, tuple(pieces))
        self._next += 1
        self._by_number[wp.number] = wp
        self._arm(wp)
        return wp

    def delete(self, number: int) -> Watchpoint:
        wp = self.get(number)
        self._disarm(wp)
        del self._by_number[number]
        return wp

    def enable(self, number: int, enabled: bool = True) -> Watchpoint:
        wp = self.get(number)
        if enabled and not wp.enabled:
            self._arm(wp)
        elif not enabled and wp.enabled:
            self._disarm(wp)
        wp.enabled = enabled
        return wp

    def take_hits(self) -> list[WatchHit]:
        """The hits recorded since the last call, in order; clears them."""
        hits, self._hits = self._hits, []
        return hits

    def discard_hits(self) -> None:
        self._hits = []

    # -- hooks ---------------------------------------------------------------------------

    def _arm(self, wp: Watchpoint) -> None:
        read = wp.kind is not WatchKind.WRITE
        write = wp.kind is not WatchKind.READ
        for piece in wp.pieces:
            callback = self._callback(wp, piece)
            # Unicorn checks the hook range against the access's first byte only: start
            # early enough to see a wide access that begins before the range and overlaps it.
            begin = max(piece.phys - _WIDEST_ACCESS + 1, 0)
            end = piece.phys + piece.size - 1
            handle = self._machine.hook_memory(begin, end, callback, read=read, write=write)
            wp.handles.append(handle)

    def _disarm(self, wp: Watchpoint) -> None:
        for handle in wp.handles:
            self._machine.unhook(handle)
        wp.handles.clear()

    def _callback(self, wp: Watchpoint, piece: _Piece):
        def on_access(kind: AccessKind, phys: int, size: int, value: int, pc: int) -> None:
            # Runs inside emu_start: record only, never raise.
            if not wp.kind.matches(kind) or phys + size <= piece.phys:
                return
            old = new = None
            if size <= _VALUE_BYTES:
                try:
                    old = int.from_bytes(self._machine.read_physical(phys, size), "little")
                except KctxError:
                    old = None
                mask = (1 << (8 * size)) - 1
                new = value & mask if kind is AccessKind.WRITE else old
            va = piece.va + (phys - piece.phys)
            self._hits.append(WatchHit(wp.number, kind, va, phys, size, old, new, pc))
            self._stop()

        return on_access


def describe_watch_hit(hit: WatchHit) -> str:
    """``watchpoint 1: write of 8 bytes at 0x… by 0x…: 0x0 -> 0x1122``."""
    values = ""
    if hit.old is not None and hit.new is not None:
        values = (
            f": {hit.old:#x} -> {hit.new:#x}"
            if hit.kind is AccessKind.WRITE
            else f": value {hit.old:#x}"
        )
    return (
        f"watchpoint {hit.watchpoint}: {hit.kind.value} of {hit.size} bytes at "
        f"{hit.address:#x} by {hit.pc:#x}{values}"
    )


def describe_watchpoint(wp: Watchpoint) -> str:
    """``1   watch write y 0xffff888000001000 size=8 hits=2``."""
    return (
        f"{wp.number:<3} watch {wp.kind.value} {'y' if wp.enabled else 'n'} "
        f"{wp.address:#x} size={wp.size} hits={wp.hits}"
    )
