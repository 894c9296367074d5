"""The trace file (docs/trace-format.md): writer, reader, and the reader's checks.

Independent truth: the lines are parsed back with plain ``json`` and compared with
the documented field names; malformed traces are written byte by byte and must
fail with one TraceError naming the line and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kctx_debug.errors import KctxError, TraceError
from kctx_debug.traps.events import TrapEvent, TrapKind
from kctx_debug.traps.trace import (
    MAX_LINE_BYTES,
    RecordOptions,
    TraceHeader,
    TraceReader,
    TraceWriter,
    read_header,
    read_trace,
)

HASH = "0123456789abcdef" * 4
OPTIONS = RecordOptions(breaks=(0x400010,), until=0x400020, inject=((100, 32),), max_events=50)
HEADER = TraceHeader("int3.json", HASH, "0.1.0", OPTIONS)
EVENTS = (
    TrapEvent(seq=0, icount=2, kind=TrapKind.EXCEPTION, vector=3, name="#BP", rip=0x400007,
              cs=0x33, cpl=3, handler=0xFFFFFFFF81000000, handler_symbol="bp_handler",
              regs={"rax": 1, "rip": 0x400008}),
    TrapEvent(seq=1, icount=9, kind=TrapKind.STOP, name="until", rip=0x400020, cs=0x33, cpl=3),
)  # fmt: skip


def write(path: Path, lines: list[object], raw_tail: bytes = b"") -> Path:
    body = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    path.write_bytes(body + raw_tail)
    return path


def good_lines() -> list[object]:
    return [HEADER.to_json()] + [e.to_json() for e in EVENTS]


def test_round_trip_and_documented_fields(tmp_path: Path) -> None:
    path = tmp_path / "t.ktrace.jsonl"
    with TraceWriter(path, HEADER) as writer:
        for event in EVENTS:
            writer.write(event)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    header = json.loads(lines[0])
    assert header == {
        "format": "kctx-trace",
        "version": 1,
        "snapshot": "int3.json",
        "snapshot_hash": HASH,
        "tool_version": "0.1.0",
        "options": {
            "breaks": [0x400010],
            "until": 0x400020,
            "inject": [{"icount": 100, "vector": 32}],
            "max_events": 50,
            "budget": None,
        },
    }
    first = json.loads(lines[1])
    assert first["seq"] == 0 and first["kind"] == "exception" and first["rip"] == 0x400007
    assert first["regs"] == {"rax": 1, "rip": 0x400008}
    assert json.loads(lines[2])["kind"] == "stop"
    trace = read_trace(path)
    assert trace.header == HEADER
    assert trace.events == EVENTS
    assert trace.complete
    assert read_header(path) == HEADER


def test_each_event_is_on_disk_before_the_next_is_written(tmp_path: Path) -> None:
    path = tmp_path / "t.ktrace.jsonl"
    with TraceWriter(path, HEADER) as writer:
        assert len(path.read_bytes().splitlines()) == 1
        writer.write(EVENTS[0])
        assert path.read_bytes().splitlines()[1] == EVENTS[0].to_json_line().encode()
        assert writer.events_written == 1


def test_writer_refuses_events_out_of_order(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t.ktrace.jsonl", HEADER) as writer:
        with pytest.raises(KctxError, match="event seq 1, expected 0"):
            writer.write(EVENTS[1])


def test_an_incomplete_trace_reads_as_incomplete(tmp_path: Path) -> None:
    path = write(tmp_path / "t.ktrace.jsonl", good_lines()[:2])
    trace = read_trace(path)
    assert len(trace.events) == 1 and not trace.complete


def _bad_header(**changes: object) -> dict:
    doc = HEADER.to_json()
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], r"t:1: empty file: no header"),
        ([{"format": "other"}], r"t:1: not a trace: the first line needs format 'kctx-trace'"),
        ([_bad_header(version=2)], r"t:1: version: 2 is not supported \(1\)"),
        ([_bad_header(extra=1)], r"t:1: extra: unknown field"),
        ([_bad_header(snapshot="../x.json")], r"t:1: snapshot: '../x.json' must be a plain"),
        ([_bad_header(snapshot_hash="ABC")], r"t:1: snapshot_hash: expected 64 lowercase hex"),
        ([_bad_header(tool_version=3)], r"t:1: tool_version: expected a non-empty string"),
        (
            [_bad_header(options={**OPTIONS.to_json(), "inject": [{"icount": 1, "vector": 256}]})],
            r"t:1: options.inject\[0\].vector: expected an integer in \[0, 0x100\), got 256",
        ),
        (
            [_bad_header(options={**OPTIONS.to_json(), "max_events": -1})],
            r"t:1: options.max_events: expected an integer",
        ),
        ([HEADER.to_json(), b"{not json"], r"t:2: invalid JSON at column 2"),
        ([HEADER.to_json(), b"[1, 2]"], r"t:2: trap event must be a JSON object"),
        (
            [HEADER.to_json(), {**EVENTS[0].to_json(), "rip": "0x400007"}],
            r"t:2: trap event field 'rip' must be an integer",
        ),
        (
            [HEADER.to_json(), {**EVENTS[0].to_json(), "bogus": 1}],
            r"t:2: trap event has unknown field\(s\): bogus",
        ),
        ([HEADER.to_json(), EVENTS[1].to_json()], r"t:2: seq: 1, expected 0"),
        (
            [*good_lines(), {**EVENTS[1].to_json(), "seq": 2}],
            r"t:4: an event after the stop event",
        ),
        ([HEADER.to_json(), b'{"seq": 0, "seq": 1}'], r"t:2: seq: repeated key"),
        ([HEADER.to_json(), b'{"seq": NaN}'], r"t:2: invalid JSON: NaN is not a JSON number"),
        ([HEADER.to_json(), b'{"seq": "\xff"}'], r"t:2: not UTF-8 \(byte 9\)"),
        ([HEADER.to_json(), b"[" * 100_00 + b"]" * 100_00], r"t:2: JSON nested too deeply"),
    ],
)
def test_malformed_traces_name_the_line_and_field(
    tmp_path: Path, lines: list[object], message: str
) -> None:
    path = write(tmp_path / "t", lines)
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}:")


def test_line_length_is_bounded(tmp_path: Path) -> None:
    long_line = b'{"seq": 0, "name": "' + b"x" * MAX_LINE_BYTES + b'"}'
    path = write(tmp_path / "t", [HEADER.to_json(), long_line])
    with pytest.raises(TraceError, match=rf"t:2: line longer than {MAX_LINE_BYTES} bytes"):
        read_trace(path)


def test_a_line_cut_short_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "t", [HEADER.to_json()], raw_tail=b'{"seq": 0, "icount"')
    with pytest.raises(TraceError, match=r"t:2: last line is cut short"):
        read_trace(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope: cannot read"):
        read_header(tmp_path / "nope")


def test_reader_streams_events_with_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "t", good_lines())
    with TraceReader(path) as reader:
        seen = [(event.seq, reader.line) for event in reader]
    assert seen == [(0, 2), (1, 3)]
