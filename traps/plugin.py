"""pytest plugin: a recorded trace dropped in a test folder becomes a regression test.

Registered through the ``pytest11`` entry point ``kctx``. Every collected file
named ``*.ktrace.jsonl`` becomes one test item, ``<file>::replay``, which replays
the trace against the snapshot its header names (a file in the same folder) and
fails with the first divergent event and field. A trace whose header is
malformed or whose snapshot is missing fails the same way: a broken regression
test is never silently skipped.

Fixtures for hand-written tests:

- ``kctx_machine(snapshot_path)`` opens a snapshot and returns a
  :class:`~kctx_debug.traps.debugger.Debugger` on a fresh machine
  (``kctx_machine(path, debugger=False)`` returns the bare
  :class:`~kctx_debug.emulator.machine.Machine`); everything opened is closed at
  teardown.
- ``kctx_replay(trace_path, snapshot_path=None)`` replays a trace and fails the
  test unless it is identical; returns the :class:`~.replay.ReplayResult`.

The plugin costs nothing when no trace is collected: its module imports only
pytest and the standard library, and the emulator is imported by the first
item that runs. Items hold only their path, so they work under pytest-xdist
(``-n auto``) and their ids are the file's path.

>>> pytest fixtures/traps -q                                     # doctest: +SKIP
5 passed
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ITEM_NAME",
    "TRACE_SUFFIX",
    "ReplayMismatch",
    "TraceFile",
    "TraceItem",
    "kctx_machine",
    "kctx_replay",
    "pytest_collect_file",
]

TRACE_SUFFIX = ".ktrace.jsonl"  # the same as kctx_debug.traps.trace.TRACE_SUFFIX
ITEM_NAME = "replay"


class ReplayMismatch(AssertionError):
    """A replay that did not reproduce its trace; ``str()`` is the divergence report."""


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.File | None:
    if file_path.name.endswith(TRACE_SUFFIX):
        return TraceFile.from_parent(parent, path=file_path)
    return None


class TraceFile(pytest.File):
    """One ``*.ktrace.jsonl`` file; it yields a single replay item."""

    def collect(self) -> Iterator[pytest.Item]:
        yield TraceItem.from_parent(self, name=ITEM_NAME)


class TraceItem(pytest.Item):
    """Replays ``self.path`` against the snapshot named in its header."""

    def runtest(self) -> None:
        from ..errors import KctxError
        from .replay import describe_replay, replay, snapshot_for_trace

        try:
            result = replay(snapshot_for_trace(self.path), self.path)
        except KctxError as e:
            raise ReplayMismatch(f"{self.path.name}: {e}") from None
        if not result.ok:
            raise ReplayMismatch(describe_replay(result))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, ReplayMismatch):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"replay of {self.path.name}"


@pytest.fixture
def kctx_machine() -> Iterator[Callable[..., Any]]:
    """Factory: ``kctx_machine(snapshot_path, debugger=True)`` -> Debugger (or Machine)."""
    opened: list[Any] = []

    def open_machine(snapshot_path: str | Path, *, debugger: bool = True) -> Any:
        from ..emulator.machine import Machine
        from ..pagetables.context import open_context
        from .debugger import Debugger

        ctx = open_context(snapshot_path)
        opened.append(ctx)
        machine = Machine.from_context(ctx)
        return Debugger(machine) if debugger else machine

    yield open_machine
    for ctx in opened:
        ctx.close()


@pytest.fixture
def kctx_replay() -> Callable[..., Any]:
    """``kctx_replay(trace_path, snapshot_path=None)``: replay, fail the test unless identical."""

    def check(trace_path: str | Path, snapshot_path: str | Path | None = None) -> Any:
        from .replay import describe_replay, replay, snapshot_for_trace

        trace_path = Path(trace_path)
        snapshot = snapshot_for_trace(trace_path) if snapshot_path is None else snapshot_path
        result = replay(snapshot, trace_path)
        if not result.ok:
            pytest.fail(describe_replay(result), pytrace=False)
        return result

    return check
