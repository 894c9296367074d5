"""The shipped JSON Schema and the loader agree on what a snapshot document is.

Valid documents pass both; every dict-level case of the malformed corpus fails
both (except the few checks JSON Schema cannot express, listed in LOADER_ONLY);
and for the fields with fiddly lexical rules (integers of each width, aligned
addresses, inline data, page sizes) hypothesis checks that schema and loader
accept exactly the same values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import FULL_SIDE_FILES, full_snapshot_doc, minimal_snapshot_doc, write_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from test_snapshot_malformed import LOAD_CASES

from kctx_debug.errors import SnapshotError
from kctx_debug.jsonfields import parse_int
from kctx_debug.schema import SNAPSHOT_SCHEMA_FILE, snapshot_schema
from kctx_debug.snapshot_io import load_snapshot, parse_snapshot, snapshot_to_json

DOC = Path(__file__).parent.parent / "docs" / "snapshot-format.md"
VALIDATOR = jsonschema.Draft202012Validator(snapshot_schema())

# Corpus cases whose rule JSON Schema cannot state: values compared with other
# values (overlap, end of range, data length), integer-valued floats (JSON Schema
# counts 4096.0 as an integer), depth of free-form JSON, unencodable file names.
LOADER_ONLY = {
    "cr3-float": "fractional number",
    "version-float": "unsupported version 1.0",
    "levels-float": "got 4.0",
    "ranges-overlap": "overlaps",
    "ranges-overlap-unsorted": "overlaps",
    "ranges-duplicate": "overlaps",
    "range-past-52-bits": "beyond the 52-bit",
    "inline-larger-than-size": "more than size",
    "source-nested-100": "nested deeper",
    "file-path-lone-surrogate": "not a usable file name",
}


def loader_accepts(doc: Any) -> bool:
    try:
        parse_snapshot(doc)
    except SnapshotError:
        return False
    return True


def agree(doc: dict) -> None:
    """Schema and loader give the same verdict on ``doc``."""
    errors = [e.message for e in VALIDATOR.iter_errors(doc)]
    assert (not errors) == loader_accepts(doc), errors


# -- the schema itself --------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    schema = snapshot_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_is_package_data_and_fresh_per_call() -> None:
    from importlib import resources

    text = resources.files("kctx_debug.schema").joinpath(SNAPSHOT_SCHEMA_FILE).read_text()
    first = snapshot_schema()
    assert first == json.loads(text)
    first["properties"].clear()
    assert snapshot_schema()["properties"]["cpu"] == {"$ref": "#/$defs/cpu"}


def test_schema_closes_every_object() -> None:
    """Every object schema with properties rejects unknown keys, as the loader does."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and where != "$.properties.source":
                assert node.get("additionalProperties") is False, where
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(snapshot_schema(), "$")


# -- valid documents ------------------------------------------------------------------------


def _doc_example() -> dict:
    """The complete example in docs/snapshot-format.md."""
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    examples = [json.loads(b) for b in blocks if '"format": "kctx-snapshot"' in b]
    assert len(examples) == 1
    return examples[0]


VALID = {
    "minimal": minimal_snapshot_doc,
    "full": full_snapshot_doc,
    "docs-example": _doc_example,
    "saved-full": lambda: snapshot_to_json(parse_snapshot(full_snapshot_doc())),
    "no-memory": lambda: {**minimal_snapshot_doc(), "memory": []},
    "max-values": lambda: {
        **minimal_snapshot_doc(),
        "cpu": {
            "regs": {"rip": 2**64 - 1},
            "cr0": "0x" + "F" * 16,
            "cr3": "0X" + "0" * 32,
            "cr4": 0,
            "gdtr": {"base": 0, "limit": "0xffff"},
        },
        "memory": [
            {"base": hex(2**52 - 2**40), "size": 2**40, "kind": "zero"},
            {"base": 0, "size": "0x1000000", "kind": "inline", "encoding": "base64", "data": ""},
        ],
    },
}


@pytest.mark.parametrize("name", VALID)
def test_valid_documents_pass_schema_and_loader(name: str, tmp_path: Path) -> None:
    doc = VALID[name]()
    VALIDATOR.validate(doc)
    snap = write_snapshot(tmp_path, doc, files={**FULL_SIDE_FILES, "example.phys": bytes(0x2000)})
    loaded = load_snapshot(snap)
    assert loaded.origin == snap
    if name == "max-values":
        return  # a 1 TiB zero range: anonymous mmap may be refused (a clean SnapshotError)
    mem = loaded.open_memory()
    try:
        assert mem.total_size == sum(r.size for r in loaded.memory)
    finally:
        mem.close()


def test_docs_example_contents(tmp_path: Path) -> None:
    """The documented example means what the document says it means."""
    snap = write_snapshot(tmp_path, _doc_example(), files={"example.phys": bytes(range(256)) * 32})
    loaded = load_snapshot(snap)
    assert loaded.cpu.cr3 == 0x10000 and loaded.cpu.regs["rip"] == 0xFFFFFFFF81000000
    assert loaded.cpu.regs["rax"] == 0  # registers left out are zero
    mem = loaded.open_memory()
    try:
        assert mem.read(0x100000, 3) == bytes.fromhex("cc90f4")
        assert mem.read(0x100003, 1) == b"\0"  # inline data is zero-padded to its size
        assert mem.read(0x200000, 2) == bytes([0x00, 0x01])  # example.phys from offset 0
    finally:
        mem.close()


def test_docs_example_opens_as_a_context(tmp_path: Path) -> None:
    from kctx_debug.pagetables.context import open_context

    snap = write_snapshot(tmp_path, _doc_example(), files={"example.phys": bytes(range(256)) * 32})
    ctx = open_context(snap)
    try:
        assert ctx.virt_to_phys(0xFFFFFFFF81000001) == 0x100001
        assert ctx.read_virtual(0xFFFFFFFF81000000, 3) == bytes.fromhex("cc90f4")
        assert ctx.read_virtual(0x401FFE, 2) == b"\xfe\xff"  # example.phys offset 0x1ffe
        assert ctx.virt_to_phys(0xFFFF888000001008) == 0x1008  # the GDT, through the direct map
    finally:
        ctx.close()


# -- invalid documents ---------------------------------------------------------------------------

DICT_CASES = [c for c in LOAD_CASES if isinstance(c.mutate(c.base()), dict)]


@pytest.mark.parametrize("case", DICT_CASES, ids=lambda c: c.id)
def test_invalid_documents_fail_schema_and_loader(case: Any) -> None:
    doc = case.mutate(case.base())
    with pytest.raises(SnapshotError) as info:
        parse_snapshot(doc)
    if case.id in LOADER_ONLY:
        assert LOADER_ONLY[case.id] in str(info.value)
        assert VALIDATOR.is_valid(doc), "now expressible: remove it from LOADER_ONLY"
    else:
        assert not VALIDATOR.is_valid(doc)


def test_loader_only_names_real_cases() -> None:
    assert set(LOADER_ONLY) <= {c.id for c in DICT_CASES}


# -- field-level agreement (hypothesis) ------------------------------------------------------------

_HEXDIGITS = "0123456789abcdefABCDEF"
hexish = st.builds(
    lambda prefix, digits, suffix: prefix + digits + suffix,
    st.sampled_from(["0x", "0X", "0x0000", "", "x", "-0x", "0x+", " 0x"]),
    st.text(alphabet=_HEXDIGITS, max_size=36),
    st.sampled_from(["", "", "", "\n", " ", "g", "_0"]),
)
interesting_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(
        [
            0,
            1,
            3,
            4,
            7,
            8,
            255,
            256,
            4095,
            4096,
            8191,
            8192,
            0xFFFF,
            0x10000,
            2**20 - 1,
            2**20,
            2**32 - 1,
            2**32,
            2**40,
            2**40 + 4096,
            2**52 - 4096,
            2**52,
            2**63,
            2**64 - 1,
            2**64,
            2**24,
            2**24 + 4096,
            0x200000,
            0x40000000,
        ]
    ),
)
aligned_hex = st.builds(
    lambda v, z: "0x" + "0" * z + format(v * 4096, "x"), st.integers(0, 2**53), st.integers(0, 20)
)
int_values = st.one_of(
    interesting_ints,
    interesting_ints.map(hex),
    hexish,
    aligned_hex,
    st.sampled_from([None, True, False, 1.5, [], {}, "4K", "2M", "1G", "4k"]),
)


@settings(max_examples=300, deadline=None)
@given(value=int_values, bits=st.sampled_from([2, 3, 4, 8, 13, 16, 20, 32, 52, 64]))
def test_integer_widths_agree(value: Any, bits: int) -> None:
    schema = {**snapshot_schema(), "$ref": f"#/$defs/u{bits}"}
    del schema["properties"], schema["required"], schema["additionalProperties"], schema["type"]
    try:
        parse_int(value, "x", bits)
        loader_ok = True
    except SnapshotError:
        loader_ok = False
    assert jsonschema.Draft202012Validator(schema).is_valid(value) == loader_ok


def small_build_doc() -> dict:
    """The minimal document plus a one-mapping page-table section and a one-entry GDT."""
    doc = minimal_snapshot_doc()
    doc["build"] = {
        "page_tables": {
            "tables": {"base": "0x1000", "size": "0x1000"},
            "mappings": [{"va": "0x0", "pa": "0x0", "size": "0x1000"}],
        },
        "gdt": {"phys": "0x0", "entries": [{"index": 0, "kind": "null"}]},
    }
    return doc


def _with(path: tuple, value: Any, base: dict | None = None) -> dict:
    doc = base if base is not None else minimal_snapshot_doc()
    node: Any = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


@settings(max_examples=100, deadline=None)
@given(value=int_values)
def test_memory_base_and_size_agree(value: Any) -> None:
    # One page, so that base + size <= 2**52 (a rule the schema cannot state) always holds.
    agree(_with(("memory", 0), {"base": value, "size": 4096, "kind": "zero"}))
    agree(_with(("memory", 0, "size"), value))
    inline = {"base": 0, "size": value, "kind": "inline", "data": "00"}
    agree(_with(("memory", 0), inline))


@settings(max_examples=100, deadline=None)
@given(value=int_values)
def test_aligned_build_and_pagemap_fields_agree(value: Any) -> None:
    agree(_with(("pagemap",), [{"va": value, "entry": 0}]))
    pt = ("build", "page_tables")
    agree(_with((*pt, "tables", "size"), value, small_build_doc()))
    agree(_with((*pt, "tables", "base"), value, small_build_doc()))
    agree(_with((*pt, "mappings", 0, "page_size"), value, small_build_doc()))
    agree(_with((*pt, "levels"), value, small_build_doc()))


_WS = " \t\n\r\x0b\x0c"


@settings(max_examples=150, deadline=None)
@given(
    data=st.text(alphabet=_HEXDIGITS + "g" + _WS + "\u00a0\u2028", max_size=14),
    b64=st.text(alphabet="AQgw+/=" + "-_ \n", max_size=14),
)
def test_inline_and_raw_data_agree(data: str, b64: str) -> None:
    agree(_with(("memory", 0), {"base": 0, "size": 4096, "kind": "inline", "data": data}))
    agree(
        _with(
            ("memory", 0),
            {"base": 0, "size": 4096, "kind": "inline", "encoding": "base64", "data": b64},
        )
    )
    gdt_entry = {"index": 0, "kind": "raw", "bytes": data + data}
    agree(_with(("build", "gdt", "entries", 0), gdt_entry, small_build_doc()))


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(
        [
            "cpu",
            "cpu.regs",
            "cpu.msrs",
            "cpu.segments.cs",
            "cpu.gdtr",
            "cpu.tr",
            "memory.0",
            "build",
            "build.page_tables",
            "build.page_tables.tables",
            "build.page_tables.mappings.0",
            "build.gdt",
            "build.gdt.entries.1",
            "build.idt.gates.0",
            "build.tss",
            "pagemap.0",
            "symbols.0",
            "symbols.0.entries.0",
            "symbols.1",
            "source",
        ]
    ),
    name=st.sampled_from(["extra", "Cr3", "rip ", "kind", "path", "data", "base", "offset"]),
)
def test_unknown_keys_agree(key: str, name: str) -> None:
    """Adding a key (unknown, or known elsewhere) to any object: same verdict."""
    doc = full_snapshot_doc()
    node: Any = doc
    for k in key.split("."):
        node = node[int(k) if k.isdigit() else k]
    if name in node:
        return
    node[name] = "0x1000"
    agree(doc)
