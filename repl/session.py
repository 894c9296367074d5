"""One debugging session: the context, the lazily built machine and debugger, and settings.

Every command receives the :class:`Session` explicitly; nothing lives in globals. The
machine (Unicorn) is built on the first command that needs one, so inspecting a
snapshot never imports the emulator; until then commands read the snapshot itself
(:attr:`Session.target`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CommandError, KctxError
from ..pagetables.context import KernelContext, open_context
from ..symbols import SymbolTable
from .formats import DEFAULT_FORMAT, XFormat
from .target import MachineTarget, SnapshotTarget, Target

if TYPE_CHECKING:
    from ..emulator.machine import Machine
    from ..traps.debugger import Debugger
    from ..traps.events import TrapEvent
    from ..traps.trace import TraceWriter
    from .backtrace import CfiTable
    from .registry import CommandRegistry

__all__ = ["Session", "Settings", "StopRecord"]

_MAX_SETTING = 4096
_CHOICES = {"syntax": ("intel", "att")}


@dataclass
class Settings:
    """What ``set NAME VALUE`` changes (``set`` alone lists them)."""

    context: bool = True  # show the context display on every stop
    context_code: int = 6  # instructions shown from RIP on
    context_stack: int = 8  # stack words shown
    syntax: str = "intel"  # disassembly syntax: intel or att
    debug: bool = False  # print a traceback for internal errors

    def names(self) -> tuple[str, ...]:
        return tuple(self.__dataclass_fields__)


@dataclass(frozen=True)
class StopRecord:
    """Why the machine last stopped, for the context display and the toolbar."""

    event: TrapEvent | None  # the trap log's event, when the debugger made one
    summary: str  # one line: ``#BP at 0x400010 -> bp_handler``
    pending: bool = False  # stopped at a trap that ``continue`` will deliver


@dataclass
class _XState:
    """What ``x`` with no address (or an empty line after ``x``) continues from."""

    format: XFormat = DEFAULT_FORMAT
    next_address: int | None = None
    physical: bool = False


@dataclass
class Session:
    """The state a command may read or change; build with :meth:`open` or the constructor.

    :param context: the loaded snapshot.
    :param symbols: overrides the snapshot's own symbols (e.g. an ELF given on the
        command line); default: ``context.symbols``.
    :param source: the snapshot's path, for ``save`` and trace headers.
    """

    context: KernelContext
    symbols: SymbolTable = None  # type: ignore[assignment]
    source: Path | None = None
    settings: Settings = field(default_factory=Settings)
    last_stop: StopRecord | None = None
    x_state: _XState = field(default_factory=_XState)
    recorder: TraceWriter | None = None
    record_callback: Callable[[TrapEvent], None] | None = None
    notices: list[str] = field(default_factory=list)
    registry: CommandRegistry | None = None  # for help (set by whoever runs commands)
    running: bool = False  # a run is in progress: Ctrl-C stops it (see .runner)
    batch: bool = False  # no prompt (--batch or stdin not a terminal): runs get a default budget
    interrupted: bool = False  # Ctrl-C stopped the last run (batch mode then stops)
    _machine: Machine | None = None
    _debugger: Debugger | None = None
    _registers_before: dict[str, int] = field(default_factory=dict)
    _cfi: list[CfiTable] | None = None

    def __post_init__(self) -> None:
        if self.symbols is None:
            self.symbols = self.context.symbols

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        allow_outside: bool = False,
        cpu: int = 0,
        symbols: str | os.PathLike[str] | None = None,
    ) -> Session:
        """Load a snapshot (kctx JSON or QEMU ELF core) into a new session.

        :raises KctxError: the snapshot cannot be loaded.
        """
        ctx = open_context(path, allow_outside=allow_outside, cpu=cpu, symbols=symbols)
        return cls(ctx, source=Path(path))

    # -- the machine and the debugger ------------------------------------------------------

    @property
    def has_machine(self) -> bool:
        return self._machine is not None

    @property
    def machine(self) -> Machine:
        """The machine, built from the snapshot on first use.

        :raises CommandError: the snapshot's state cannot be loaded into Unicorn.
        """
        if self._machine is None:
            from ..emulator.machine import Machine

            try:
                machine = Machine.from_context(self.context)
            except KctxError as e:
                raise CommandError(f"cannot build a machine from this snapshot: {e}") from None
            self._machine = machine
            report = machine.report
            if report is not None:
                self.notices.extend(f"machine: {w}" for w in report.warnings)
        return self._machine

    @property
    def debugger(self) -> Debugger:
        """The trap engine over :attr:`machine`, built on first use."""
        if self._debugger is None:
            from ..traps.debugger import Debugger

            self._debugger = Debugger(self.machine, symbols=self.symbols)
        return self._debugger

    @property
    def has_debugger(self) -> bool:
        return self._debugger is not None

    @property
    def target(self) -> Target:
        """What inspection reads: the machine once built, else the snapshot."""
        if self._machine is None:
            return SnapshotTarget(self.context)
        if self._debugger is None:
            return MachineTarget(self._machine)
        return MachineTarget(self._machine, self._debugger.read_virtual, self._patched_bytes)

    def _patched_bytes(self) -> dict[int, int]:
        """Physical bytes holding our int3 -> the guest's original byte."""
        assert self._debugger is not None
        table = self._debugger.breakpoints
        return {bp.phys: table.original_byte(bp.phys) for bp in table if table.is_patched(bp.phys)}

    def interrupt(self) -> None:
        """Stop a run in progress (Ctrl-C); thread- and signal-safe, a no-op when idle."""
        if self._debugger is not None:
            self._debugger.stop()
        elif self._machine is not None:
            self._machine.stop()

    # -- expressions ----------------------------------------------------------------------

    def evaluate(self, text: str) -> int:
        """An expression over registers, symbols and memory (see traps/expr.py).

        :raises CommandError: a syntax error, an unknown name, unreadable memory.
        """
        from . import evaluation

        return evaluation.evaluate(self, text)

    # -- register change tracking (for the context display) ---------------------------------

    def remember_registers(self) -> None:
        """Record the general registers before a run, so the stop can show what changed."""
        if self._machine is not None:
            self._registers_before = self._machine.registers()

    def cfi_tables(self) -> list[CfiTable]:
        """The ``.eh_frame`` tables of the snapshot's ELF symbol sources (read once).

        A source that cannot be read is skipped with a notice.
        """
        if self._cfi is None:
            from .backtrace import CfiTable

            tables = []
            snap = self.context.snapshot
            for i, src in enumerate(snap.symbols):
                if src.kind != "elf":
                    continue
                try:
                    table = CfiTable.from_elf(
                        snap.resolve(src.path, f"symbols[{i}].path"), src.offset
                    )
                except KctxError as e:
                    self.notices.append(f"no CFI from symbols[{i}]: {e}")
                    continue
                if table is not None:
                    tables.append(table)
            self._cfi = tables
        return self._cfi

    @contextlib.contextmanager
    def breakpoints_lifted(self) -> Iterator[None]:
        """Guest bytes under inserted breakpoints restored for the duration (for save)."""
        if self._debugger is None:
            yield
            return
        table = self._debugger.breakpoints
        patched = {bp.phys: bp.address for bp in table if table.is_patched(bp.phys)}
        for phys, va in patched.items():
            table.lift(phys, va)
        try:
            yield
        finally:
            for phys, va in patched.items():
                table.rearm(phys, va)

    def changed_registers(self) -> set[str]:
        """General registers that differ from before the last run (empty before any run)."""
        if self._machine is None or not self._registers_before:
            return set()
        now = self._machine.registers()
        return {name for name, value in now.items() if self._registers_before.get(name) != value}

    def pending_trap(self) -> str | None:
        """The trap the machine stopped at and has not delivered yet, in one line."""
        stop = self.last_stop
        return stop.summary if stop is not None and stop.pending else None

    def write_virtual(self, address: int, data: bytes) -> None:
        """Write through the current page tables (the machine's once built).

        Through the debugger when it exists, so a breakpoint's saved byte is what
        changes under an inserted int3.
        """
        if self._debugger is not None:
            self._debugger.write_virtual(address, data)
        else:
            self.target.write_virtual(address, data)

    # -- settings --------------------------------------------------------------------------

    def describe_settings(self) -> list[tuple[str, str]]:
        """``(name, value)`` rows for ``set`` with no arguments."""
        rows = []
        for name in self.settings.names():
            value = getattr(self.settings, name)
            text = ("on" if value else "off") if isinstance(value, bool) else str(value)
            rows.append((name.replace("_", "-"), text))
        return rows

    def change_setting(self, name: str, value: str) -> None:
        """``set NAME VALUE``: booleans take on/off, numbers a positive integer.

        :raises CommandError: unknown setting or bad value.
        """
        key = name.replace("-", "_")
        if key not in self.settings.names():
            known = ", ".join(n.replace("_", "-") for n in self.settings.names())
            raise CommandError(f"unknown setting {name!r} (settings: {known})")
        current = getattr(self.settings, key)
        if isinstance(current, bool):
            if value not in ("on", "off", "1", "0"):
                raise CommandError(f"{name} takes on or off, not {value!r}")
            setattr(self.settings, key, value in ("on", "1"))
        elif isinstance(current, int):
            try:
                number = int(value, 0)
            except ValueError:
                raise CommandError(f"{name} takes a number, not {value!r}") from None
            if not 0 <= number <= _MAX_SETTING:
                raise CommandError(f"{name} must be between 0 and {_MAX_SETTING}")
            setattr(self.settings, key, number)
        else:
            choices = _CHOICES.get(key, ())
            if choices and value not in choices:
                raise CommandError(f"{name} takes one of {', '.join(choices)}, not {value!r}")
            setattr(self.settings, key, value)

    def close(self) -> None:
        """Finish a recording, release the machine and the snapshot's memory."""
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        if self._machine is not None:
            self._machine.close()
            self._machine = None
        self._debugger = None
        self.context.close()
