"""Traps and the debugger: breakpoints, watchpoints, IDT delivery, record and replay.

The names below are imported on first use (PEP 562), not with the package: the
pytest plugin (:mod:`.plugin`) lives here and must not load Unicorn or Capstone
when pytest starts. The ``replay`` function is not among them: that name is the
submodule's (``from kctx_debug.traps.replay import replay``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .breakpoints import Breakpoint, BreakpointTable
    from .debugger import Debugger
    from .delivery import Delivery, DeliveryError, TrapFrame, TripleFault, deliver
    from .events import TrapEvent, TrapKind, describe_event
    from .exceptions import PolicyTable, Trap, TrapPolicy, TrapSource
    from .expr import ExprEnv, describe_expression, evaluate, parse_expression
    from .replay import (
        Divergence,
        RecordResult,
        ReplayResult,
        describe_replay,
        record,
    )
    from .syscall import SyscallEntry
    from .trace import RecordOptions, Trace, TraceHeader, TraceReader, TraceWriter, read_trace
    from .watchpoints import WatchHit, WatchKind, Watchpoint

# Public name -> the submodule defining it.
_EXPORTS = {
    "Breakpoint": "breakpoints",
    "BreakpointTable": "breakpoints",
    "Debugger": "debugger",
    "Delivery": "delivery",
    "DeliveryError": "delivery",
    "TrapFrame": "delivery",
    "TripleFault": "delivery",
    "deliver": "delivery",
    "TrapEvent": "events",
    "TrapKind": "events",
    "describe_event": "events",
    "PolicyTable": "exceptions",
    "Trap": "exceptions",
    "TrapPolicy": "exceptions",
    "TrapSource": "exceptions",
    "ExprEnv": "expr",
    "describe_expression": "expr",
    "evaluate": "expr",
    "parse_expression": "expr",
    "Divergence": "replay",
    "RecordResult": "replay",
    "ReplayResult": "replay",
    "describe_replay": "replay",
    "record": "replay",
    "SyscallEntry": "syscall",
    "RecordOptions": "trace",
    "Trace": "trace",
    "TraceHeader": "trace",
    "TraceReader": "trace",
    "TraceWriter": "trace",
    "read_trace": "trace",
    "WatchHit": "watchpoints",
    "WatchKind": "watchpoints",
    "Watchpoint": "watchpoints",
}

__all__ = [
    "Breakpoint",
    "BreakpointTable",
    "Debugger",
    "Delivery",
    "DeliveryError",
    "Divergence",
    "ExprEnv",
    "PolicyTable",
    "RecordOptions",
    "RecordResult",
    "ReplayResult",
    "SyscallEntry",
    "Trace",
    "TraceHeader",
    "TraceReader",
    "TraceWriter",
    "Trap",
    "TrapEvent",
    "TrapFrame",
    "TrapKind",
    "TrapPolicy",
    "TrapSource",
    "TripleFault",
    "WatchHit",
    "WatchKind",
    "Watchpoint",
    "deliver",
    "describe_event",
    "describe_expression",
    "describe_replay",
    "evaluate",
    "parse_expression",
    "read_trace",
    "record",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
