"""Software breakpoints: an int3 (0xCC) written over the first byte of an instruction.

A breakpoint is set at a virtual address but lives in the physical byte that address
translates to when it is set: the 0xCC goes into guest memory (machine-physical),
Unicorn's translated code for it is dropped, and the original byte is kept. So a page
mapped at two virtual addresses traps at both, as a real int3 would; a page-table
change after the breakpoint was set does not move it. Breakpoints cost nothing while
they are not hit: no hook runs between hits.

Several breakpoints may share one byte (the same address twice, or two aliases); the
byte is patched while at least one of them is enabled. Reads through
:meth:`BreakpointTable.unpatch` show the original bytes.

>>> table = BreakpointTable(machine)                            # doctest: +SKIP
>>> bp = table.add(0xffffffff81000010, condition="$rax == 3")   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from kctx_debug.errors import CommandError, KctxError
from kctx_debug.physmem import PAGE_SIZE

from .expr import Expr, ExprEnv, evaluate, parse_expression

__all__ = [
    "INT3",
    "Breakpoint",
    "BreakpointTable",
    "describe_breakpoint",
]

INT3 = 0xCC  # SDM vol. 2A "INT n/INTO/INT3/INT1": the one-byte breakpoint trap


class _Memory(Protocol):
    def read(self, address: int, size: int) -> bytes: ...
    def write(self, address: int, data: bytes) -> None: ...


class _MachineView(Protocol):
    memory: _Memory  # machine-physical

    def virt_to_phys(self, va: int, access=None) -> int: ...
    def drop_translated_code(self, va: int, size: int) -> None: ...


@dataclass
class Breakpoint:
    """One breakpoint; ``phys`` is the machine-physical byte it patches."""

    number: int
    address: int
    phys: int
    temporary: bool = False
    enabled: bool = True
    condition: str | None = None
    hits: int = 0
    _tree: Expr | None = field(default=None, repr=False, compare=False)

    def condition_holds(self, env: ExprEnv) -> bool:
        """True without a condition; else the condition's value is non-zero.

        :raises CommandError: the condition cannot be evaluated (unknown name,
            unreadable memory …).
        """
        return self._tree is None or evaluate(self._tree, env) != 0


class BreakpointTable:
    """The breakpoints of one machine, numbered from 1 in the order they are set."""

    def __init__(self, machine: _MachineView) -> None:
        self._machine = machine
        self._by_number: dict[int, Breakpoint] = {}
        self._next = 1
        self._original: dict[int, int] = {}  # patched phys -> the guest's byte
        self._patched_va: dict[int, int] = {}  # patched phys -> a VA that maps it

    # -- the table ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Breakpoint]:
        return iter(sorted(self._by_number.values(), key=lambda b: b.number))

    def __len__(self) -> int:
        return len(self._by_number)

    def get(self, number: int) -> Breakpoint:
        """:raises CommandError: no breakpoint has that number."""
        try:
            return self._by_number[number]
        except KeyError:
            raise CommandError(f"no breakpoint number {number}") from None

    def add(
        self, address: int, *, temporary: bool = False, condition: str | None = None
    ) -> Breakpoint:
        """Set a breakpoint at virtual ``address`` (translated now) and arm it.

        :raises CommandError: the address is not mapped, or the condition does not parse.
        """
        tree = parse_expression(condition) if condition is not None else None
        try:
            phys = self._machine.virt_to_phys(address)
        except KctxError as e:
            raise CommandError(f"cannot set a breakpoint at {address:#x}: {e}") from None
        bp = Breakpoint(self._next, address, phys, temporary, True, condition, 0, tree)
        self._by_number[bp.number] = bp
        self._next += 1
        self._sync(phys, address)
        return bp

    def delete(self, number: int) -> Breakpoint:
        """Remove a breakpoint (the byte is restored if no other one uses it)."""
        bp = self.get(number)
        del self._by_number[number]
        self._sync(bp.phys, bp.address)
        return bp

    def enable(self, number: int, enabled: bool = True) -> Breakpoint:
        bp = self.get(number)
        bp.enabled = enabled
        self._sync(bp.phys, bp.address)
        return bp

    def disable(self, number: int) -> Breakpoint:
        return self.enable(number, False)

    def set_condition(self, number: int, condition: str | None) -> Breakpoint:
        """Set (or with None, clear) the condition.

        :raises CommandError: the condition does not parse (the old one stays).
        """
        bp = self.get(number)
        bp._tree = parse_expression(condition) if condition is not None else None
        bp.condition = condition
        return bp

    # -- the patched bytes ---------------------------------------------------------------

    def _write(self, phys: int, value: int, va: int) -> None:
        self._machine.memory.write(phys, bytes([value]))
        # Unicorn drops cached code by the physical range the VA maps to, so code
        # translated through any alias of the page goes too.
        self._machine.drop_translated_code(va, 1)

    def _sync(self, phys: int, va: int) -> None:
        """Patch or restore the byte at ``phys`` to match the enabled breakpoints."""
        wanted = any(b.enabled and b.phys == phys for b in self._by_number.values())
        if wanted and phys not in self._original:
            self._original[phys] = self._machine.memory.read(phys, 1)[0]
            self._patched_va[phys] = va
            self._write(phys, INT3, va)
        elif not wanted and phys in self._original:
            self._write(phys, self._original.pop(phys), self._patched_va.pop(phys))

    def is_patched(self, phys: int) -> bool:
        """Whether ``phys`` holds one of our int3 bytes."""
        return phys in self._original

    def phys_at(self, va: int) -> int | None:
        """The patched physical byte behind ``va`` now, or None."""
        if not self._original:
            return None
        try:
            phys = self._machine.virt_to_phys(va)
        except KctxError:
            return None
        return phys if phys in self._original else None

    def original_byte(self, phys: int) -> int:
        return self._original[phys]

    def lift(self, phys: int, va: int) -> None:
        """Put the original byte back for a moment (to step the instruction once)."""
        self._write(phys, self._original[phys], va)

    def rearm(self, phys: int, va: int) -> None:
        """Undo :meth:`lift`."""
        if phys in self._original:
            self._write(phys, INT3, va)

    def at(self, phys: int) -> list[Breakpoint]:
        """The enabled breakpoints on ``phys``, lowest number first."""
        return [b for b in self if b.enabled and b.phys == phys]

    def unpatch(self, va: int, data: bytes, to_phys: Callable[[int], int]) -> bytes:
        """``data`` read at ``va`` with our int3 bytes replaced by the original ones."""
        if not self._original:
            return data
        out = bytearray(data)
        pos = 0
        while pos < len(out):
            n = min(len(out) - pos, PAGE_SIZE - ((va + pos) % PAGE_SIZE))
            try:
                base = to_phys(va + pos)
            except KctxError:
                pos += n
                continue
            for phys, byte in self._original.items():
                if base <= phys < base + n:
                    out[pos + phys - base] = byte
            pos += n
        return bytes(out)

    def repatch(self, va: int, size: int, to_phys: Callable[[int], int]) -> None:
        """After a debugger write of ``[va, va+size)``: keep the bytes written as the
        originals and put our int3 bytes back over them."""
        pos = 0
        while pos < size and self._original:
            n = min(size - pos, PAGE_SIZE - ((va + pos) % PAGE_SIZE))
            try:
                base = to_phys(va + pos)
            except KctxError:
                pos += n
                continue
            for phys in list(self._original):
                if base <= phys < base + n:
                    self._original[phys] = self._machine.memory.read(phys, 1)[0]
                    self._write(phys, INT3, va + pos + phys - base)
            pos += n


def describe_breakpoint(bp: Breakpoint, symbolize: Callable[[int], str] | None = None) -> str:
    """``2  breakpoint keep y 0xffffffff81000010 <f+0x10> hits=3 if $rax == 3``."""
    where = symbolize(bp.address) if symbolize else f"{bp.address:#x}"
    disp = "del " if bp.temporary else "keep"
    line = f"{bp.number:<3} breakpoint {disp} {'y' if bp.enabled else 'n'} {where} hits={bp.hits}"
    return line + (f" if {bp.condition}" if bp.condition else "")
