"""TrapEvent: the JSON form is integers and strings only, round-trips, and rejects junk."""

from __future__ import annotations

import json

import pytest

from kctx_debug.errors import CommandError
from kctx_debug.traps.events import EVENT_REGISTERS, TrapEvent, TrapKind, describe_event

REGS = {name: i * 0x1000 for i, name in enumerate(EVENT_REGISTERS)}
EVENT = TrapEvent(
    seq=3, icount=1234, kind=TrapKind.EXCEPTION, vector=14, name="#PF", error_code=6,
    cr2=0x1234_5000, rip=0x40_0001, cs=0x33, cpl=3, handler=0xFFFF_FFFF_8100_0800,
    handler_symbol="asm_exc_page_fault", regs=REGS,
)  # fmt: skip


def test_json_round_trip_and_exact_form():
    doc = EVENT.to_json()
    assert list(doc) == [
        "seq", "icount", "kind", "vector", "name", "error_code", "cr2", "rip", "cs", "cpl",
        "handler", "handler_symbol", "regs",
    ]  # fmt: skip
    assert doc["kind"] == "exception" and doc["regs"]["rip"] == REGS["rip"]
    assert list(doc["regs"]) == list(EVENT_REGISTERS)
    line = EVENT.to_json_line()
    assert "\n" not in line and json.loads(line) == doc
    assert TrapEvent.from_json(json.loads(line)) == EVENT


def test_minimal_event_and_frozen_registers():
    event = TrapEvent(seq=0, icount=0, kind=TrapKind.STOP, name="budget")
    assert TrapEvent.from_json(event.to_json()) == event
    with pytest.raises(TypeError):
        event.regs["rax"] = 1  # type: ignore[index]
    assert event.with_seq(7).seq == 7


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "crash"}, "unknown kind"),
        ({"seq": "3"}, "'seq' must be an integer"),
        ({"icount": True}, "'icount' must be an integer"),
        ({"vector": 1.5}, "'vector' must be an integer"),
        ({"name": 5}, "'name' must be a string"),
        ({"regs": {"rax": "1"}}, "'regs' must map"),
        ({"regs": [1]}, "'regs' must map"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_malformed_documents(change, match):
    doc = {**EVENT.to_json(), **change}
    with pytest.raises(CommandError, match=match):
        TrapEvent.from_json(doc)


def test_missing_fields_and_non_objects():
    doc = EVENT.to_json()
    del doc["rip"]
    with pytest.raises(CommandError, match="lacks field 'rip'"):
        TrapEvent.from_json(doc)
    with pytest.raises(CommandError, match="JSON object"):
        TrapEvent.from_json([1, 2])  # type: ignore[arg-type]


def test_describe():
    assert describe_event(EVENT) == (
        "#3 exception #PF at 0x400001 (cpl 3) error=0x6 cr2=0x12345000 -> asm_exc_page_fault "
        "icount=1234"
    )
