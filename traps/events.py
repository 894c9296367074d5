"""The trap event: one line of the trap log, the unit a trace records and replays.

Every breakpoint hit, CPU exception, interrupt, syscall, watchpoint hit and final stop
of a :class:`~kctx_debug.traps.debugger.Debugger` run becomes one :class:`TrapEvent`.
Its JSON form holds only integers, strings and null (no floats, no nested objects
except ``regs``), so two runs can be compared field by field.

>>> event = TrapEvent(seq=0, icount=5, kind=TrapKind.EXCEPTION, vector=14, name="#PF",
...                   error_code=2, cr2=0x1000, rip=0x401000, cs=0x10, cpl=0)
>>> TrapEvent.from_json(event.to_json()) == event
True
>>> event.to_json()["kind"]
'exception'
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from kctx_debug.errors import CommandError

__all__ = [
    "EVENT_REGISTERS",
    "TrapEvent",
    "TrapKind",
    "describe_event",
]

# The general registers an event carries, in the order the JSON form lists them.
EVENT_REGISTERS: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip


class TrapKind(enum.Enum):
    """What kind of trap an event records."""

    BREAKPOINT = "breakpoint"  # a debugger breakpoint (our int3) was hit
    EXCEPTION = "exception"  # a CPU exception: raised, stopped at, or delivered
    INTERRUPT = "interrupt"  # an external interrupt or NMI (injected)
    SYSCALL = "syscall"  # syscall executed (SDM vol. 2B SYSCALL)
    WATCHPOINT = "watchpoint"  # a watched range was accessed
    STOP = "stop"  # the run ended for another reason (budget, until, user stop, halt)


_INT_FIELDS = ("seq", "icount", "rip", "cs", "cpl")
_OPTIONAL_INT_FIELDS = ("vector", "error_code", "cr2", "handler")


@dataclass(frozen=True)
class TrapEvent:
    """One trap: where and when it happened, what it was, and the registers at the time.

    ``seq`` numbers the events of one debugger from 0; ``icount`` is the machine's exact
    instruction count when the event was recorded. ``rip`` is the architectural address
    of the trapping instruction (for a breakpoint: the breakpoint address; for a trap
    such as ``int n`` or ``syscall``: the instruction itself). ``handler`` and
    ``handler_symbol`` are set when the event was delivered through the IDT (or
    LSTAR for a syscall). ``regs`` holds :data:`EVENT_REGISTERS` when captured.
    """

    seq: int
    icount: int
    kind: TrapKind
    vector: int | None = None
    name: str = ""
    error_code: int | None = None
    cr2: int | None = None
    rip: int = 0
    cs: int = 0
    cpl: int = 0
    handler: int | None = None
    handler_symbol: str | None = None
    regs: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen means frozen: a read-only copy of the register dict.
        object.__setattr__(self, "regs", MappingProxyType(dict(self.regs)))

    def __hash__(self) -> int:
        return hash((self.seq, self.icount, self.kind, self.vector, self.rip))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrapEvent):
            return NotImplemented
        return self.to_json() == other.to_json()

    def with_seq(self, seq: int) -> TrapEvent:
        """The same event renumbered."""
        return replace(self, seq=seq, regs=dict(self.regs))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: integers stay integers, ``kind`` is its string value."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kind":
                value = value.value
            elif f.name == "regs":
                value = {name: int(value[name]) for name in _ordered(value)}
            out[f.name] = value
        return out

    def to_json_line(self) -> str:
        """:meth:`to_json` as one compact line of JSON (no newline)."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TrapEvent:
        """Parse :meth:`to_json` output; unknown keys are rejected.

        :raises CommandError: a field is missing, of the wrong type or unknown.
        """
        if not isinstance(doc, Mapping):
            raise CommandError(f"trap event must be a JSON object, not {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(doc) - known)
        if extra:
            raise CommandError(f"trap event has unknown field(s): {', '.join(extra)}")
        values: dict[str, Any] = {}
        for name in _INT_FIELDS:
            values[name] = _int_field(doc, name, optional=False)
        for name in _OPTIONAL_INT_FIELDS:
            values[name] = _int_field(doc, name, optional=True)
        try:
            values["kind"] = TrapKind(doc.get("kind"))
        except ValueError:
            raise CommandError(f"trap event has unknown kind {doc.get('kind')!r}") from None
        for name in ("name", "handler_symbol"):
            value = doc.get(name, "" if name == "name" else None)
            if value is not None and not isinstance(value, str):
                raise CommandError(f"trap event field {name!r} must be a string")
            values[name] = value
        if values["name"] is None:
            raise CommandError("trap event field 'name' must be a string")
        regs = doc.get("regs", {})
        if not isinstance(regs, Mapping) or not all(
            isinstance(k, str) and _is_int(v) for k, v in regs.items()
        ):
            raise CommandError("trap event field 'regs' must map register names to integers")
        values["regs"] = dict(regs)
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(doc: Mapping[str, Any], name: str, *, optional: bool) -> int | None:
    if name not in doc:
        if optional:
            return None
        raise CommandError(f"trap event lacks field {name!r}")
    value = doc[name]
    if value is None and optional:
        return None
    if not _is_int(value):
        raise CommandError(f"trap event field {name!r} must be an integer, not {value!r}")
    return value


def _ordered(regs: Mapping[str, int]) -> list[str]:
    known = [name for name in EVENT_REGISTERS if name in regs]
    return known + sorted(name for name in regs if name not in EVENT_REGISTERS)


def describe_event(event: TrapEvent) -> str:
    """One line, e.g. ``#3 exception #PF at 0x401000 error=0x2 cr2=0x1000 -> handler``."""
    what = event.name or event.kind.value
    parts = [f"#{event.seq} {event.kind.value} {what} at {event.rip:#x} (cpl {event.cpl})"]
    if event.error_code is not None:
        parts.append(f"error={event.error_code:#x}")
    if event.cr2 is not None:
        parts.append(f"cr2={event.cr2:#x}")
    if event.handler is not None:
        target = event.handler_symbol or f"{event.handler:#x}"
        parts.append(f"-> {target}")
    parts.append(f"icount={event.icount}")
    return " ".join(parts)
