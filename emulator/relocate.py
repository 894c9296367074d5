"""The machine's physical address space: snapshot memory below Unicorn's 40-bit limit.

Unicorn's CPU model has a MAXPHYADDR of 40: a paging entry that points at or above
1 TiB takes a reserved-bit #PF. A snapshot range above that limit is therefore mapped
lower, at an address congruent to its own modulo 1 GiB (so 2 MiB and 1 GiB pages
stay aligned), over the same host buffer: nothing is copied. The paging entries
that point into a moved range are rewritten, but never in the snapshot's own bytes:
each table holding such an entry is copied into a private frame, and so is every
table on the path from CR3 down to it, since its parent must point at the copy. The
guest then runs on the copies (CR3 included); :class:`Relocations` records it all.

:class:`MachineMemory` is that address space as the emulator and the walker see it:
windows of snapshot memory (moved or not) and of private memory (table copies, the
emulator's trampoline), addressed by machine-physical address.

:class:`TableWatch` keeps a copy of every table reachable from CR3 when the machine
is built and lists the entries emulation changed since (Unicorn's MMU sets the
Accessed and Dirty bits as it walks).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import MemoryAccessError, PageTableError, UnbackedMemoryError
from ..pagetables.entry import ADDRESS_MASK, PAT_LARGE, Level, PagingMode, PteFlag, describe_entry
from ..physmem import PAGE_SIZE, HostRange, PhysicalMemory

__all__ = [
    "LARGEST_PAGE",
    "MAX_TABLE_FRAMES",
    "PHYS_LIMIT",
    "UNICORN_PHYS_BITS",
    "AddressSpace",
    "EntryChange",
    "MachineMemory",
    "RegionMove",
    "RelocationPlan",
    "Relocations",
    "TableCopy",
    "TableWatch",
    "Window",
    "apply_relocations",
    "build_address_space",
    "describe_relocations",
    "find_free",
    "find_table_frames",
    "plan_relocations",
]

# MAXPHYADDR of Unicorn 2.1's x86 CPU models (QEMU's TCG default phys-bits).
UNICORN_PHYS_BITS = 40
PHYS_LIMIT = 1 << UNICORN_PHYS_BITS
# Moved ranges keep their offset within the largest page size (SDM vol. 3A 4.5: 1 GiB).
LARGEST_PAGE = 1 << 30
# A bound on the tables one traversal visits (a 4 KiB-mapped 64 GiB direct map needs 32 Ki).
MAX_TABLE_FRAMES = 1 << 18
_ENTRIES = 512
_P = np.uint64(PteFlag.P)
_PS = np.uint64(PteFlag.PS)


# -- the address space --------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """``size`` bytes at machine-physical ``base`` are ``mem`` at ``source``."""

    base: int
    size: int
    mem: PhysicalMemory
    source: int

    @property
    def end(self) -> int:
        return self.base + self.size


class MachineMemory:
    """Machine-physical memory made of :class:`Window` s; reads and writes go to the buffers."""

    def __init__(self, windows: list[Window]) -> None:
        self._windows = sorted(windows, key=lambda w: w.base)
        self._starts = [w.base for w in self._windows]
        for a, b in zip(self._windows, self._windows[1:], strict=False):
            if b.base < a.end:
                raise MemoryAccessError(b.base, f"machine ranges overlap at {b.base:#x}")

    @property
    def windows(self) -> tuple[Window, ...]:
        return tuple(self._windows)

    def window_at(self, address: int) -> Window | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._windows[i].end:
            return self._windows[i]
        return None

    def is_backed(self, address: int, size: int = 1) -> bool:
        end = address + size
        while address < end:
            window = self.window_at(address)
            if window is None:
                return False
            address = window.end
        return True

    def _pieces(self, address: int, size: int) -> Iterator[tuple[Window, int, int]]:
        if address < 0 or size < 0:
            raise MemoryAccessError(address, f"invalid span {address:#x}+{size:#x}")
        end = address + size
        while address < end:
            window = self.window_at(address)
            if window is None:
                raise UnbackedMemoryError(address, end - address)
            n = min(end, window.end) - address
            yield window, window.source + address - window.base, n
            address += n

    def read(self, address: int, size: int) -> bytes:
        window = self.window_at(address)
        if window is not None and 0 <= size <= window.end - address:  # the common case
            return window.mem.read(window.source + address - window.base, size)
        return b"".join(w.mem.read(src, n) for w, src, n in self._pieces(address, size))

    def write(self, address: int, data: bytes) -> None:
        """Write ``data``; checks the whole span is backed before changing anything."""
        pos = 0
        for w, src, n in list(self._pieces(address, len(data))):
            w.mem.write(src, data[pos : pos + n])
            pos += n

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(8, "little"))

    def frame(self, pfn: int) -> np.ndarray:
        """A writable view of the 4 KiB frame ``pfn`` as 512 little-endian u64."""
        window = self.window_at(pfn * PAGE_SIZE)
        if window is None:
            raise UnbackedMemoryError(pfn * PAGE_SIZE, PAGE_SIZE)
        return window.mem.frame((window.source + pfn * PAGE_SIZE - window.base) // PAGE_SIZE)

    def host_ranges(self) -> list[HostRange]:
        """Every window as a host pointer for ``Uc.mem_map_ptr`` (keep the result alive)."""
        by_mem: dict[int, list[HostRange]] = {}
        out = []
        for w in self._windows:
            ranges = by_mem.setdefault(id(w.mem), w.mem.host_ranges())
            host = next(
                r for r in ranges if r.base <= w.source and w.source + w.size <= r.base + r.size
            )
            out.append(
                HostRange(w.base, w.size, host.address + w.source - host.base, host.keepalive)
            )
        return out


def find_free(taken: list[tuple[int, int]], size: int, align: int, phase: int = 0) -> int | None:
    """The highest ``base`` with ``base % align == phase`` whose ``size`` bytes lie below
    2**40 and outside every ``(start, end)`` span of ``taken``; None if there is none."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(taken):
        start, end = max(start, 0), min(end, PHYS_LIMIT)
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    gaps, previous = [], 0
    for start, end in merged:
        if start > previous:
            gaps.append((previous, start))
        previous = max(previous, end)
    if previous < PHYS_LIMIT:
        gaps.append((previous, PHYS_LIMIT))
    for lo, hi in reversed(gaps):
        base = (hi - size - phase) // align * align + phase
        if base >= lo:
            return base
    return None


# -- table traversal ------------------------------------------------------------------


def _child_mask(e: np.ndarray, level: Level, last: bool) -> np.ndarray:
    """Present entries that point to a next-level table (not pages)."""
    if last:
        return np.zeros(_ENTRIES, dtype=bool)
    table = (e & _P) != 0
    if level.large_pages:
        table &= (e & _PS) == 0
    return table


def find_table_frames(
    frame: Callable[[int], np.ndarray], root: int, mode: PagingMode, phys_bits: int
) -> tuple[dict[int, int], dict[int, list[tuple[int, int]]], list[int]]:
    """Tables reachable from ``root``: ``{frame: depth}``, child -> parents, missing frames.

    ``frame(pfn)`` returns the 512 entries of a frame or raises UnbackedMemoryError.

    :raises PageTableError: more than :data:`MAX_TABLE_FRAMES` tables.
    """
    mask = np.uint64(ADDRESS_MASK & ((1 << phys_bits) - 1))
    depth_of: dict[int, int] = {}
    parents: dict[int, list[tuple[int, int]]] = {}
    missing: list[int] = []
    todo = [(root, 0)]
    last = len(mode.levels) - 1
    while todo:
        table, depth = todo.pop()
        if table in depth_of:
            continue
        try:
            e = frame(table // PAGE_SIZE)
        except UnbackedMemoryError:
            missing.append(table)
            continue
        depth_of[table] = depth
        if len(depth_of) > MAX_TABLE_FRAMES:
            raise PageTableError(f"more than {MAX_TABLE_FRAMES} page tables reachable from CR3")
        if depth == last:
            continue
        children = e & mask
        for i in np.flatnonzero(_child_mask(e, mode.levels[depth], False)).tolist():
            child = int(children[i])
            parents.setdefault(child, []).append((table, i))
            todo.append((child, depth + 1))
    return depth_of, parents, missing


# -- relocation -----------------------------------------------------------------------


@dataclass(frozen=True)
class RegionMove:
    """A snapshot range mapped at another machine-physical address (same host bytes)."""

    snapshot_base: int
    machine_base: int
    size: int


@dataclass(frozen=True)
class TableCopy:
    """A paging table run from a private copy; ``rewritten`` entries point elsewhere."""

    snapshot_table: int
    machine_table: int
    level: str
    rewritten: int


@dataclass(frozen=True)
class Relocations:
    """How machine-physical addresses differ from the snapshot's; empty for most snapshots."""

    snapshot_cr3: int
    machine_cr3: int
    moves: tuple[RegionMove, ...] = ()
    copies: tuple[TableCopy, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.moves or self.copies)

    def to_machine(self, address: int) -> int:
        """Machine-physical address of snapshot-physical ``address`` (copied tables aside)."""
        for m in self.moves:
            if m.snapshot_base <= address < m.snapshot_base + m.size:
                return address - m.snapshot_base + m.machine_base
        return address

    def to_snapshot(self, address: int) -> int:
        """The snapshot-physical address of machine-physical ``address``."""
        for m in self.moves:
            if m.machine_base <= address < m.machine_base + m.size:
                return address - m.machine_base + m.snapshot_base
        for c in self.copies:
            if c.machine_table <= address < c.machine_table + PAGE_SIZE:
                return address - c.machine_table + c.snapshot_table
        return address

    def __str__(self) -> str:
        return describe_relocations(self)


def describe_relocations(r: Relocations) -> str:
    """One line per moved range and copied table, or ``no relocations``."""
    if not r:
        return "no relocations"
    lines = [
        f"range {m.snapshot_base:#x}+{m.size:#x} -> {m.machine_base:#x} (above 2^40)"
        for m in r.moves
    ]
    lines += [
        f"{c.level} table {c.snapshot_table:#x} -> copy {c.machine_table:#x} "
        f"({c.rewritten} entries rewritten)"
        for c in r.copies
    ]
    if r.machine_cr3 != r.snapshot_cr3:
        lines.append(f"cr3 {r.snapshot_cr3:#x} -> {r.machine_cr3:#x}")
    return "\n".join(lines)


def _leaf_mask(e: np.ndarray, level: Level, last: bool) -> np.ndarray:
    present = (e & _P) != 0
    if last:
        return present
    if level.large_pages:
        return present & ((e & _PS) != 0)
    return np.zeros(_ENTRIES, dtype=bool)


@dataclass(frozen=True)
class RelocationPlan:
    """What a snapshot needs before it can run: moves, and tables to copy (ancestors first)."""

    moves: tuple[RegionMove, ...]
    copy_order: tuple[int, ...]  # snapshot table frames, parents before children
    depth_of: dict[int, int]


def plan_relocations(
    mem: PhysicalMemory, cr3_root: int, mode: PagingMode, reserved: list[tuple[int, int]]
) -> RelocationPlan:
    """Decide where high ranges go and which tables must be copied.

    ``reserved`` are machine-physical spans to keep free (besides low snapshot ranges).

    :raises PageTableError: no free place below 2**40 for a range.
    """
    high = [r for r in mem.regions if r.end > PHYS_LIMIT]
    if not high:
        return RelocationPlan((), (), {})
    taken = [(r.base, r.end) for r in mem.regions if r.end <= PHYS_LIMIT] + list(reserved)
    moves = []
    for r in sorted(high, key=lambda r: -r.size):
        base = find_free(taken, r.size, LARGEST_PAGE, r.base % LARGEST_PAGE)
        if base is None:
            base = find_free(taken, r.size, PAGE_SIZE, r.base % PAGE_SIZE)
        if base is None:
            raise PageTableError(
                f"no room below 2^{UNICORN_PHYS_BITS} for snapshot range {r.base:#x}+{r.size:#x}"
            )
        taken.append((base, base + r.size))
        moves.append(RegionMove(r.base, base, r.size))
    depth_of, parents, _missing = find_table_frames(mem.frame, cr3_root, mode, 52)
    last = len(mode.levels) - 1
    dirty = []
    for table, depth in depth_of.items():
        e = mem.frame(table // PAGE_SIZE)
        level = mode.levels[depth]
        points = _child_mask(e, level, depth == last) | _leaf_mask(e, level, depth == last)
        if np.any(points & ((e & np.uint64(ADDRESS_MASK)) >= np.uint64(PHYS_LIMIT))):
            dirty.append(table)
    copy: set[int] = set()
    while dirty:
        table = dirty.pop()
        if table not in copy:
            copy.add(table)
            dirty.extend(parent for parent, _ in parents.get(table, ()))
    order = tuple(sorted(copy, key=lambda t: (depth_of[t], t)))
    return RelocationPlan(tuple(moves), order, depth_of)


def apply_relocations(
    mem: PhysicalMemory,
    plan: RelocationPlan,
    cr3: int,
    mode: PagingMode,
    scratch: PhysicalMemory,
    copy_base: int,
) -> Relocations:
    """Write the copied tables into ``scratch`` from ``copy_base`` and return the record."""
    snapshot_relocs = Relocations(cr3, cr3, plan.moves)
    copy_at = {t: copy_base + i * PAGE_SIZE for i, t in enumerate(plan.copy_order)}
    last = len(mode.levels) - 1
    addr_mask = ADDRESS_MASK
    copies = []
    for table in plan.copy_order:
        depth = plan.depth_of[table]
        level = mode.levels[depth]
        e = mem.frame(table // PAGE_SIZE).copy()
        children = _child_mask(e, level, depth == last)
        leaves = _leaf_mask(e, level, depth == last)
        rewritten = 0
        for i in np.flatnonzero(children | leaves).tolist():
            raw = int(e[i])
            mask = addr_mask
            if leaves[i]:
                mask &= ~(level.page_size - 1)
                if level.page_size > PAGE_SIZE:
                    mask &= ~PAT_LARGE  # bit 12 of a large page's entry is PAT

            target = raw & mask
            if children[i] and target in copy_at:
                new = copy_at[target]
            else:
                new = snapshot_relocs.to_machine(target)
            if new != target:
                e[i] = np.uint64((raw & ~mask) | new)
                rewritten += 1
        scratch.frame(copy_at[table] // PAGE_SIZE)[:] = e
        copies.append(TableCopy(table, copy_at[table], level.name, rewritten))
    root = cr3 & addr_mask
    new_root = copy_at.get(root, snapshot_relocs.to_machine(root))
    return Relocations(cr3, (cr3 & ~addr_mask) | new_root, plan.moves, tuple(copies))


# -- the whole address space -------------------------------------------------------------

_PRIVATE_ALIGN = 0x20_0000


@dataclass(frozen=True)
class AddressSpace:
    """The machine-physical memory of a machine about to be built."""

    memory: MachineMemory
    relocations: Relocations
    private: PhysicalMemory  # the emulator's own pages, then the table copies
    private_base: int
    labels: dict[int, str]  # window base -> what it holds


def build_address_space(
    mem: PhysicalMemory, cr3: int, mode: PagingMode, private_pages: int
) -> AddressSpace:
    """Place the snapshot's ranges and ``private_pages`` private pages below 2**40.

    :raises PageTableError: no room below 2**40 for a range or for the private pages.
    """
    plan = plan_relocations(mem, cr3 & ADDRESS_MASK, mode, [])
    size = -(-(len(plan.copy_order) + private_pages) * PAGE_SIZE // _PRIVATE_ALIGN)
    size *= _PRIVATE_ALIGN
    taken = [(r.base, r.end) for r in mem.regions]
    taken += [(m.machine_base, m.machine_base + m.size) for m in plan.moves]
    base = find_free(taken, size, _PRIVATE_ALIGN)
    if base is None:
        raise PageTableError("no free physical range below 2^40 for the emulator's own pages")
    private = PhysicalMemory()
    private.add_zero(base, size)
    relocations = apply_relocations(mem, plan, cr3, mode, private, base + private_pages * PAGE_SIZE)
    moved = {m.snapshot_base: m.machine_base for m in plan.moves}
    windows = [Window(moved.get(r.base, r.base), r.size, mem, r.base) for r in mem.regions]
    windows.append(Window(base, size, private, base))
    labels = {w.base: "snapshot" for w in windows}
    labels.update({m.machine_base: f"snapshot {m.snapshot_base:#x} (moved)" for m in plan.moves})
    labels[base] = "emulator pages (trampoline, table copies)"
    return AddressSpace(MachineMemory(windows), relocations, private, base, labels)


# -- page-table changes -----------------------------------------------------------------


@dataclass(frozen=True)
class EntryChange:
    """A paging entry whose value differs from the one the machine was built with."""

    table: int  # machine-physical address of the table
    index: int
    level: Level
    old: int
    new: int

    @property
    def address(self) -> int:
        return self.table + 8 * self.index

    def __str__(self) -> str:
        leaf = bool(self.new & PteFlag.PS) or self.level.shift == 12
        gained = describe_entry(self.new & ~self.old, leaf=leaf, large=self.level.shift > 12)
        lost = describe_entry(self.old & ~self.new, leaf=leaf, large=self.level.shift > 12)
        parts = ([f"+{gained}"] if self.new & ~self.old else []) + (
            [f"-{lost}"] if self.old & ~self.new else []
        )
        return (
            f"{self.level.name} {self.table:#x}[{self.index}] {self.old:#018x} -> "
            f"{self.new:#018x} ({' '.join(parts)})"
        )


class TableWatch:
    """A copy of the tables reachable from CR3, to list what emulation changed in them."""

    def __init__(self, memory: MachineMemory, cr3_root: int, mode: PagingMode) -> None:
        depth_of, _parents, self.missing = find_table_frames(
            memory.frame, cr3_root, mode, UNICORN_PHYS_BITS
        )
        self._memory = memory
        self._mode = mode
        self.frames = tuple(sorted(depth_of))
        self._depth = [depth_of[f] for f in self.frames]
        self._saved = np.stack([memory.frame(f // PAGE_SIZE).copy() for f in self.frames])

    def changes(self) -> list[EntryChange]:
        """Entries that differ now, in table order."""
        now = np.stack([self._memory.frame(f // PAGE_SIZE) for f in self.frames])
        out = []
        for row, index in zip(*np.nonzero(now != self._saved), strict=True):
            out.append(
                EntryChange(
                    self.frames[row],
                    int(index),
                    self._mode.levels[self._depth[row]],
                    int(self._saved[row, index]),
                    int(now[row, index]),
                )
            )
        return out
