"""The trap log on disk: JSON Lines, a header then one :class:`TrapEvent` per line.

Format (docs/trace-format.md): line 1 is a :class:`TraceHeader` (``format``
``"kctx-trace"``, ``version`` 1, the snapshot's file name and content hash, the
tool version and the :class:`RecordOptions` of the run); every further line is
one event (:meth:`TrapEvent.to_json`), ``seq`` counting from 0; the last is a
``stop`` event. The writer appends and flushes one line per event, so a trace
cut short by a crash is still readable up to its last whole line.

Traces are untrusted input: the reader bounds the line length, parses with
``json`` only, and reports the first problem as one :class:`TraceError` naming
the file, the line number and the field.

>>> header = TraceHeader("demo.json", "ab" * 32, "0.1.0", RecordOptions(until=0x400000))
>>> TraceHeader.from_json(header.to_json(), "t", 1) == header
True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import KctxError, TraceError
from .events import TrapEvent, TrapKind

__all__ = [
    "MAX_LINE_BYTES",
    "TRACE_FORMAT",
    "TRACE_SUFFIX",
    "TRACE_VERSION",
    "RecordOptions",
    "Trace",
    "TraceHeader",
    "TraceReader",
    "TraceWriter",
    "read_header",
    "read_trace",
]

TRACE_FORMAT = "kctx-trace"
TRACE_VERSION = 1
TRACE_SUFFIX = ".ktrace.jsonl"
# An event with every register in decimal is about 700 bytes; a header with a few
# thousand breakpoints fits too. Anything longer is not a trace.
MAX_LINE_BYTES = 1 << 16
_HASH_DIGITS = 64  # SHA-256 in hex
_U64 = 1 << 64
_MAX_VECTOR = 255


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _want_int(doc: Mapping[str, Any], key: str, where: str, limit: int = _U64) -> int:
    value = doc.get(key)
    if not _is_int(value) or not 0 <= value < limit:
        raise ValueError(f"{where}{key}: expected an integer in [0, {limit:#x}), got {value!r}")
    return value


def _want_optional_int(doc: Mapping[str, Any], key: str, where: str) -> int | None:
    return None if doc.get(key) is None else _want_int(doc, key, where)


@dataclass(frozen=True)
class RecordOptions:
    """How a run was driven: what replay repeats exactly.

    ``breaks`` are breakpoint addresses, ``until`` an address where the run ends,
    ``inject`` (instruction count, vector) pairs: the interrupt is delivered when
    the machine's icount reaches that count. ``max_events`` and ``budget`` (an
    instruction count, None for none) bound the run.
    """

    breaks: tuple[int, ...] = ()
    until: int | None = None
    inject: tuple[tuple[int, int], ...] = ()
    max_events: int = 100_000
    budget: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "breaks": list(self.breaks),
            "until": self.until,
            "inject": [{"icount": n, "vector": v} for n, v in self.inject],
            "max_events": self.max_events,
            "budget": self.budget,
        }

    @classmethod
    def from_json(cls, doc: object) -> RecordOptions:
        """:raises ValueError: naming the field (``options.inject[1].vector: …``)."""
        if not isinstance(doc, Mapping):
            raise ValueError("options: expected an object")
        _no_unknown(doc, ("breaks", "until", "inject", "max_events", "budget"), "options.")
        breaks = doc.get("breaks", [])
        inject = doc.get("inject", [])
        if not isinstance(breaks, list) or not all(_is_int(b) and 0 <= b < _U64 for b in breaks):
            raise ValueError("options.breaks: expected a list of addresses")
        if not isinstance(inject, list):
            raise ValueError("options.inject: expected a list")
        pairs = []
        for i, item in enumerate(inject):
            where = f"options.inject[{i}]."
            if not isinstance(item, Mapping):
                raise ValueError(f"{where[:-1]}: expected an object")
            _no_unknown(item, ("icount", "vector"), where)
            pairs.append(
                (
                    _want_int(item, "icount", where),
                    _want_int(item, "vector", where, _MAX_VECTOR + 1),
                )
            )
        return cls(
            breaks=tuple(breaks),
            until=_want_optional_int(doc, "until", "options."),
            inject=tuple(pairs),
            max_events=_want_int(doc, "max_events", "options."),
            budget=_want_optional_int(doc, "budget", "options."),
        )


def _no_unknown(doc: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    extra = sorted(set(doc) - set(known))
    if extra:
        raise ValueError(f"{where}{extra[0]}: unknown field")


ORIGINS = ("record", "repl")


@dataclass(frozen=True)
class TraceHeader:
    """Line 1 of a trace: which snapshot, which tool, which options."""

    snapshot: str  # the snapshot's file name, relative to the trace's folder
    snapshot_hash: str  # Snapshot.content_hash()
    tool_version: str
    options: RecordOptions = field(default_factory=RecordOptions)
    # "record" (the record verb: replayable) or "repl" (an interactive session's log,
    # started from whatever state the session had: it documents, it does not replay).
    origin: str = "record"

    def to_json(self) -> dict[str, Any]:
        doc = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "snapshot": self.snapshot,
            "snapshot_hash": self.snapshot_hash,
            "tool_version": self.tool_version,
            "options": self.options.to_json(),
        }
        if self.origin != "record":
            doc["origin"] = self.origin
        return doc

    @classmethod
    def from_json(cls, doc: object, path: str, line: int) -> TraceHeader:
        """:raises TraceError: not a version-1 kctx trace header, naming the field."""
        if not isinstance(doc, Mapping) or doc.get("format") != TRACE_FORMAT:
            raise TraceError(
                path, line, f"not a trace: the first line needs format {TRACE_FORMAT!r}"
            )
        if doc.get("version") != TRACE_VERSION:
            raise TraceError(
                path, line, f"version: {doc.get('version')!r} is not supported ({TRACE_VERSION})"
            )
        known = (
            "format", "version", "snapshot", "snapshot_hash", "tool_version", "options", "origin"
        )  # fmt: skip
        try:
            _no_unknown(doc, known, "")
            for key in ("snapshot", "snapshot_hash", "tool_version"):
                if not isinstance(doc.get(key), str) or not doc[key]:
                    raise ValueError(f"{key}: expected a non-empty string")
            snapshot = doc["snapshot"]
            if Path(snapshot).name != snapshot or snapshot in (".", ".."):
                raise ValueError(f"snapshot: {snapshot[:80]!r} must be a plain file name")
            digest = doc["snapshot_hash"]
            if len(digest) != _HASH_DIGITS or digest.strip("0123456789abcdef"):
                raise ValueError("snapshot_hash: expected 64 lowercase hex digits")
            options = RecordOptions.from_json(doc.get("options", {}))
            origin = doc.get("origin", "record")
            if origin not in ORIGINS:
                raise ValueError(f"origin: expected one of {', '.join(ORIGINS)}")
        except ValueError as e:
            raise TraceError(path, line, str(e)) from None
        return cls(snapshot, digest, doc["tool_version"], options, origin)


@dataclass(frozen=True)
class Trace:
    """A whole trace in memory (:func:`read_trace`); ``complete``: it ends with a stop event."""

    header: TraceHeader
    events: tuple[TrapEvent, ...]

    @property
    def complete(self) -> bool:
        return bool(self.events) and self.events[-1].kind is TrapKind.STOP


class TraceWriter:
    """Append events to a new trace file, one flushed line each (use as a context manager).

    :param fsync: also ``os.fsync`` after every line (slow; for traces that must
        survive a power cut, not only a crash).
    """

    def __init__(
        self, path: str | os.PathLike[str], header: TraceHeader, *, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._count = 0
        try:
            self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise KctxError(f"{self.path}: cannot write the trace: {e.strerror}") from None
        self._line(header.to_json())

    @property
    def events_written(self) -> int:
        return self._count

    def write(self, event: TrapEvent) -> None:
        """Append one event; its ``seq`` must be the next number (0, 1, 2 …)."""
        if event.seq != self._count:
            raise KctxError(f"{self.path}: event seq {event.seq}, expected {self._count}")
        self._line(event.to_json())
        self._count += 1

    def _line(self, doc: dict[str, Any]) -> None:
        if self._file is None:
            raise KctxError(f"{self.path}: the trace is closed")
        try:
            self._file.write(json.dumps(doc, separators=(",", ":")) + "\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as e:
            raise KctxError(f"{self.path}: cannot write the trace: {e.strerror}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{key}: repeated key")
            seen.add(key)
    return out


class TraceReader:
    """Read a trace line by line (use as a context manager; iterate for the events).

    The header is read and checked when the reader opens; events are checked as
    they are read: JSON, fields (:meth:`TrapEvent.from_json`), ``seq`` in order,
    nothing after the stop event.

    :raises TraceError: naming the file, line and field of the first problem.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._name = str(path)
        try:
            self._file: IO[bytes] = open(self.path, "rb")
        except OSError as e:
            raise TraceError(self._name, 0, f"cannot read: {e.strerror}") from None
        self._lineno = 0
        try:
            doc = self._next_doc()
            if doc is None:
                raise TraceError(self._name, 1, "empty file: no header")
            self.header = TraceHeader.from_json(doc, self._name, 1)
        except BaseException:
            self._file.close()
            raise

    def _next_doc(self) -> object | None:
        """The next line parsed as JSON, None at the end of the file."""
        raw = self._file.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return None
        self._lineno += 1
        if len(raw) > MAX_LINE_BYTES:
            raise TraceError(self._name, self._lineno, f"line longer than {MAX_LINE_BYTES} bytes")
        if not raw.endswith(b"\n"):
            raise TraceError(self._name, self._lineno, "last line is cut short (no newline)")
        try:
            return json.loads(
                raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
            )
        except UnicodeDecodeError as e:
            raise TraceError(self._name, self._lineno, f"not UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            reason = f"invalid JSON at column {e.colno}: {e.msg}"
            raise TraceError(self._name, self._lineno, reason) from None
        except RecursionError:
            raise TraceError(self._name, self._lineno, "JSON nested too deeply") from None
        except ValueError as e:
            # A repeated key, NaN/Infinity, or an integer longer than Python converts.
            reason = f"invalid JSON: {str(e).split(':')[0]}"
            if "repeated key" in str(e):
                reason = str(e)
            raise TraceError(self._name, self._lineno, reason) from None

    def __iter__(self) -> Iterator[TrapEvent]:
        expected, stopped = 0, False
        while (doc := self._next_doc()) is not None:
            line = self._lineno
            if stopped:
                raise TraceError(self._name, line, "an event after the stop event")
            try:
                event = TrapEvent.from_json(doc)
            except KctxError as e:
                raise TraceError(self._name, line, str(e)) from None
            if event.seq != expected:
                raise TraceError(self._name, line, f"seq: {event.seq}, expected {expected}")
            expected += 1
            stopped = event.kind is TrapKind.STOP
            yield event

    @property
    def line(self) -> int:
        """The number of the last line read (1 is the header)."""
        return self._lineno

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def read_header(path: str | os.PathLike[str]) -> TraceHeader:
    """Only the header (line 1): cheap, for collecting traces."""
    with TraceReader(path) as reader:
        return reader.header


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """The whole trace, every line checked.

    :raises TraceError: naming the file, line and field of the first problem.
    """
    with TraceReader(path) as reader:
        return Trace(reader.header, tuple(reader))
