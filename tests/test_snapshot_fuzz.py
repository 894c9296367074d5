"""Random mutations of a valid snapshot: the loader, memory mapping and building the
context either succeed or raise KctxError, never anything else, and never hang.

Mutations: delete a key, replace a value by one of another type, huge/negative/
boundary integers, random strings (including path tricks), duplicated or shifted
memory ranges, unknown keys, random bytes spliced into the JSON text, and side
files cut short. Documents the loader accepts must also satisfy the JSON Schema.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
from conftest import FULL_SIDE_FILES, full_snapshot_doc, write_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kctx_debug.errors import KctxError
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.schema import snapshot_schema
from kctx_debug.snapshot_io import load_snapshot

VALIDATOR = jsonschema.Draft202012Validator(snapshot_schema())
BASE = full_snapshot_doc()

ints = st.one_of(
    st.integers(-(2**65), 2**65),
    st.sampled_from([0, -1, 1, 4095, 4096, 0x1001, 2**20, 2**40, 2**52, 2**63, 2**64 - 1, 2**64]),
    st.integers(0, 2**64).map(hex),
)
strings = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "0x", "0x1000", "0xZZ", "../full.bin", "/etc/passwd", "full.bin",
                     "kallsyms.txt", ".", "a\0b", "\ud800", "4K", "2M", "hex", "base64", "zero",
                     "inline", "file", "null", "raw", "code64", "tss", "trap"]),
)  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), strings)
# Values the loader often accepts (page-aligned addresses), so that mapping memory gets fuzzed too.
plausible = st.one_of(
    st.integers(0, 0x800).map(lambda k: hex(k * 4096)),
    st.sampled_from([0, 1, 3, 4096, "0x0", "0x1000", "0x2000", "0x100000", "4K", "2M", True]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.sampled_from(["base", "size", "kind", "x"]), scalars, max_size=3),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path in a JSON value (not the root)."""
    out = []
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return out
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for k in path[:-1]:
        doc = doc[k]
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value[:2].lower() == "0x")


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Any, int | None]:
    """(document as dict or raw bytes, length to cut full.bin to or None)."""
    doc = copy.deepcopy(BASE)
    ops = ["delete", "replace", "int", "string", "plausible", "plausible", "range", "unknown"]
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 4]))):
        paths = _paths(doc)
        op = draw(st.sampled_from(ops))
        if op == "range" and isinstance(doc.get("memory"), list) and doc["memory"]:
            # The same range again (an overlap), or moved to a free or random base.
            item = copy.deepcopy(draw(st.sampled_from(doc["memory"])))
            if isinstance(item, dict) and draw(st.booleans()):
                item["base"] = draw(st.one_of(ints, st.sampled_from(["0x400000", "0x10000000"])))
            doc["memory"].append(item)
            continue
        if not paths:
            break
        if op == "plausible":
            # Integer fields only: most such documents still load, so memory gets mapped.
            paths = [p for p in paths if _is_int(_parent(doc, p)[p[-1]])] or paths
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        if op == "delete":
            del parent[path[-1]]
        elif op == "unknown" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "Size", "cr33", "path", "data"]))] = draw(values)
        else:
            new = {"replace": values, "int": ints, "string": strings, "plausible": plausible}
            parent[path[-1]] = draw(new.get(op, values))
    cut = draw(st.one_of(st.none(), st.integers(0, len(FULL_SIDE_FILES["full.bin"]))))
    if draw(st.integers(0, 9)) == 0:
        blob = bytearray(json.dumps(doc).encode())
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(blob)))
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=3))
        return bytes(blob), cut
    return doc, cut


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=mutated())
def test_mutations_load_or_raise_kctx_error(case: tuple[Any, int | None]) -> None:
    doc, cut = case
    files = dict(FULL_SIDE_FILES)
    if cut is not None:
        files["full.bin"] = files["full.bin"][:cut]
    with tempfile.TemporaryDirectory() as tmp:
        snap = write_snapshot(Path(tmp), doc, "fuzz.json", files)
        try:
            loaded = load_snapshot(snap)
        except KctxError:
            return
        if isinstance(doc, dict):
            # Anything the loader takes, the schema takes too.
            VALIDATOR.validate(json.loads(json.dumps(doc)))
        try:
            mem = loaded.open_memory()
        except KctxError:
            return
        try:
            for base, size in mem.contiguous_ranges():
                mem.read(base, min(size, 16))
                mem.read(base + size - 1, 1)
        finally:
            mem.close()
        try:
            KernelContext.from_snapshot(loaded).close()  # GDT/IDT/TSS and page tables
        except KctxError:
            pass
