"""A corpus of malformed snapshots: each one fails with a KctxError naming the JSON path.

Three stages can reject a document: the loader (``load_snapshot``), mapping memory
(``Snapshot.open_memory``: side files), and building the kernel context
(``open_context``: GDT/IDT/TSS and page tables are materialized). Every message has
the form ``JSON.path: reason`` (or ``FILE: reason`` for a document that is not JSON).
The CLI turns each of them into one line on stderr and leaves the input untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import full_snapshot_doc, minimal_snapshot_doc, write_snapshot

from kctx_debug import snapshot_io
from kctx_debug.errors import KctxError, SnapshotError
from kctx_debug.snapshot_io import load_snapshot

FILE = "<file>"  # expected "path" meaning: the document's own file name

Mutator = Callable[[dict], "dict | str | bytes"]


@dataclass
class Case:
    id: str
    mutate: Mutator
    path: str  # the JSON path the message must start with (FILE: the document's path)
    reason: str  # a fragment of the reason
    base: Callable[[], dict] = minimal_snapshot_doc
    files: dict[str, bytes] = field(default_factory=dict)


def setp(path: str, value: Any) -> Mutator:
    """Set ``path`` (dots and [i], e.g. ``memory[0].size``) to ``value``."""

    def mutate(doc: dict) -> dict:
        parent, key = _locate(doc, path)
        parent[key] = value
        return doc

    return mutate


def delp(path: str) -> Mutator:
    def mutate(doc: dict) -> dict:
        parent, key = _locate(doc, path)
        del parent[key]
        return doc

    return mutate


def _locate(doc: Any, path: str) -> tuple[Any, Any]:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    for k in keys[:-1]:
        doc = doc[k]
    return doc, keys[-1]


def chain(*mutators: Mutator) -> Mutator:
    def mutate(doc: dict) -> Any:
        for m in mutators:
            doc = m(doc)
        return doc

    return mutate


def raw(text: str | bytes) -> Mutator:
    return lambda doc: text


def nested(depth: int) -> str:
    return '{"format": "kctx-snapshot", "source": {"x": ' + "[" * depth + "]" * depth + "}}"


def _ranges(*specs: tuple[int, int]) -> list[dict]:
    return [{"base": hex(b), "size": hex(s), "kind": "zero"} for b, s in specs]


def nested_list(depth: int) -> list:
    """``[[[…]]]``, ``depth`` lists deep."""
    out: list = []
    for _ in range(depth - 1):
        out = [out]
    return out


def _dup_source(doc: dict) -> str:
    text = json.dumps(doc)
    return text.replace('"source": {}', '"source": {"tool": "a", "tool": "b"}')


_CR3_TWICE = (
    '{"format": "kctx-snapshot", "version": 1, "memory": [],'
    ' "cpu": {"regs": {}, "cr0": 1, "cr3": 4096, "cr4": 32, "cr3": 8192}}'
)
_FULL_PT = "build.page_tables"

LOAD_CASES = [
    # -- types ------------------------------------------------------------------------
    Case(
        "cr3-array",
        setp("cpu.cr3", []),
        "cpu.cr3",
        "expected an integer or a '0x…' string, got an array",
    ),
    Case("cr3-float", setp("cpu.cr3", 4096.0), "cpu.cr3", "got a fractional number"),
    Case("rax-bool", setp("cpu.regs.rax", True), "cpu.regs.rax", "got a boolean"),
    Case("cr4-negative", setp("cpu.cr4", -1), "cpu.cr4", "-0x1 does not fit in 64 unsigned bits"),
    Case("cr0-2**64", setp("cpu.cr0", 2**64), "cpu.cr0", "0x10000000000000000 does not fit in 64"),
    Case("cr0-2**64-hex", setp("cpu.cr0", "0x10000000000000000"), "cpu.cr0", "does not fit in 64"),
    Case(
        "cr3-decimal-string",
        setp("cpu.cr3", "4096"),
        "cpu.cr3",
        "expected a '0x…' hex string, got '4096'",
    ),
    Case(
        "cr3-33-hex-digits",
        setp("cpu.cr3", "0x" + "0" * 33),
        "cpu.cr3",
        "expected a '0x…' hex string",
    ),
    Case("cr3-hex-newline", setp("cpu.cr3", "0x1000\n"), "cpu.cr3", "expected a '0x…' hex string"),
    Case("cr3-null", setp("cpu.cr3", None), "cpu.cr3", "got null"),
    Case("regs-string", setp("cpu.regs", "rax=1"), "cpu.regs", "expected an object, got a string"),
    Case("memory-object", setp("memory", {}), "memory", "expected an array, got an object"),
    Case("build-null", setp("build", None), "build", "expected an object, got null"),
    Case(
        "segment-base-null",
        setp("cpu.segments", {"cs": {"selector": 8, "base": None}}),
        "cpu.segments.cs.base",
        "got null",
    ),
    Case(
        "selector-17-bits",
        setp("cpu.segments", {"cs": {"selector": "0x10000"}}),
        "cpu.segments.cs.selector",
        "0x10000 does not fit in 16 unsigned bits",
    ),
    Case(
        "gdtr-limit-17-bits",
        setp("cpu.gdtr", {"base": 0, "limit": 0x10000}),
        "cpu.gdtr.limit",
        "does not fit in 16 unsigned bits",
    ),
    Case("format-wrong", setp("format", "kctx"), "format", "expected 'kctx-snapshot', got 'kctx'"),
    Case("arch-wrong", setp("arch", "aarch64"), "arch", "expected one of x86_64, got 'aarch64'"),
    Case("source-array", setp("source", []), "source", "expected an object"),
    Case("top-level-array", raw("[]"), FILE, "expected an object, got an array"),
    # -- required, unknown, version ------------------------------------------------------
    Case("cr0-missing", delp("cpu.cr0"), "cpu.cr0", "required field is missing"),
    Case("cpu-missing", delp("cpu"), "cpu", "required field is missing"),
    Case("memory-missing", delp("memory"), "memory", "required field is missing"),
    Case(
        "selector-missing",
        setp("cpu.tr", {"base": 0}),
        "cpu.tr.selector",
        "required field is missing",
    ),
    Case("version-2", setp("version", 2), "version", "unsupported version 2"),
    Case("version-string", setp("version", "1"), "version", "unsupported version '1'"),
    Case("version-float", setp("version", 1.0), "version", "unsupported version 1.0"),
    Case("version-true", setp("version", True), "version", "unsupported version True"),
    Case("typo-cpu-field", setp("cpu.cr33", 0), "cpu.cr33", "unknown field"),
    Case("typo-top-field", setp("pagemaps", []), "pagemaps", "unknown field"),
    Case(
        "unknown-msr",
        setp("cpu.msrs", {"efer": 0, "ia32_efer": 0}),
        "cpu.msrs.ia32_efer",
        "unknown field",
    ),
    Case("unknown-register", setp("cpu.regs.eax", 0), "cpu.regs.eax", "unknown field"),
    Case(
        "zero-range-with-path", setp("memory[0].path", "x.bin"), "memory[0].path", "unknown field"
    ),
    # -- memory ranges ---------------------------------------------------------------------
    Case(
        "ranges-overlap",
        setp("memory", _ranges((0, 0x2000), (0x1000, 0x2000))),
        "memory[1]",
        "overlaps memory[0] at 0x1000",
    ),
    Case(
        "ranges-overlap-unsorted",
        setp("memory", _ranges((0x5000, 0x1000), (0x4000, 0x2000))),
        "memory[1]",
        "overlaps memory[0] at 0x5000",
    ),
    Case(
        "ranges-duplicate",
        setp("memory", _ranges((0, 0x1000), (0, 0x1000))),
        "memory[1]",
        "overlaps memory[0] at 0x0",
    ),
    Case(
        "size-2**63",
        setp("memory[0].size", 2**63),
        "memory[0].size",
        "0x8000000000000000 is not between 1 byte and 1 TiB",
    ),
    Case(
        "size-zero",
        setp("memory[0].size", "0x0"),
        "memory[0].size",
        "is not between 1 byte and 1 TiB",
    ),
    Case(
        "base-unaligned",
        setp("memory[0].base", "0x1001"),
        "memory[0]",
        "range 0x1001+0x2000 is not 4 KiB aligned",
    ),
    Case("size-unaligned", setp("memory[0].size", 0x1800), "memory[0]", "is not 4 KiB aligned"),
    Case(
        "base-53-bits",
        setp("memory[0].base", 2**52),
        "memory[0].base",
        "does not fit in 52 unsigned bits",
    ),
    Case(
        "range-past-52-bits",
        setp("memory[0].base", hex(2**52 - 0x1000)),
        "memory[0]",
        "range ends beyond the 52-bit address space",
    ),
    Case(
        "kind-unknown",
        setp("memory[0].kind", "ram"),
        "memory[0].kind",
        "expected one of inline, file, zero",
    ),
    Case("kind-missing", delp("memory[0].kind"), "memory[0].kind", "required field is missing"),
    Case(
        "inline-not-hex",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "inline", "data": "zz"}),
        "memory[0].data",
        "not valid hex",
    ),
    Case(
        "inline-odd-hex",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "inline", "data": "0"}),
        "memory[0].data",
        "not valid hex",
    ),
    Case(
        "inline-bad-base64",
        setp(
            "memory[0]",
            {"base": 0, "size": 4096, "kind": "inline", "encoding": "base64", "data": "AAAA=="},
        ),
        "memory[0].data",
        "not valid base64",
    ),
    Case(
        "inline-larger-than-size",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "inline", "data": "00" * 4097}),
        "memory[0].data",
        "4097 bytes, more than size 0x1000",
    ),
    Case(
        "inline-over-16MiB",
        setp("memory[0]", {"base": 0, "size": "0x1001000", "kind": "inline", "data": ""}),
        "memory[0].size",
        "inline data is limited to 16 MiB",
    ),
    Case(
        "inline-encoding-unknown",
        setp(
            "memory[0]", {"base": 0, "size": 4096, "kind": "inline", "encoding": "b85", "data": ""}
        ),
        "memory[0].encoding",
        "expected one of hex, base64",
    ),
    Case(
        "file-path-empty",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "file", "path": ""}),
        "memory[0].path",
        "not a usable file name",
    ),
    Case(
        "file-path-nul",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "file", "path": "a\0b"}),
        "memory[0].path",
        "not a usable file name",
    ),
    Case(
        "file-path-lone-surrogate",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "file", "path": "a\ud800"}),
        "memory[0].path",
        "not a usable file name",
    ),
    Case(
        "file-offset-2**64",
        setp("memory[0]", {"base": 0, "size": 4096, "kind": "file", "path": "x", "offset": 2**64}),
        "memory[0].offset",
        "does not fit in 64 unsigned bits",
    ),
    # -- JSON text -------------------------------------------------------------------------
    Case("duplicate-key", raw(_CR3_TWICE), "cpu.cr3", "duplicate key"),
    Case(
        "duplicate-key-in-source",
        chain(setp("source", {}), _dup_source),
        "source.tool",
        "duplicate key",
    ),
    Case(
        "invalid-utf8",
        raw(b'{"format": "kctx-snapshot", "source": {"x": "\xff\xfe"}}'),
        FILE,
        "not UTF-8 (byte 45)",
    ),
    Case("nested-100000-lists", raw(nested(100_000)), FILE, "JSON nested too deeply"),
    Case(
        "source-nested-100",
        setp("source", {"x": nested_list(100)}),
        "source.x" + "[0]" * 64,
        "nested deeper than 64 levels",
    ),
    Case(
        "trailing-comma",
        raw('{"format": "kctx-snapshot",}'),
        FILE,
        "invalid JSON at line 1 column 28",
    ),
    Case("empty-file", raw(b""), FILE, "invalid JSON at line 1 column 1"),
    Case(
        "nan",
        raw('{"format": "kctx-snapshot", "source": {"x": NaN}}'),
        FILE,
        "NaN is not a JSON number",
    ),
    Case(
        "5000-digit-integer",
        raw('{"cr3": ' + "1" * 5000 + "}"),
        FILE,
        "invalid JSON: Exceeds the limit",
    ),
    # -- build ---------------------------------------------------------------------------
    Case(
        "levels-6",
        setp(f"{_FULL_PT}.levels", 6),
        f"{_FULL_PT}.levels",
        "expected 4 or 5, got 6",
        full_snapshot_doc,
    ),
    Case(
        "levels-float",
        setp(f"{_FULL_PT}.levels", 4.0),
        f"{_FULL_PT}.levels",
        "expected 4 or 5, got 4.0",
        full_snapshot_doc,
    ),
    Case(
        "table-area-empty",
        setp(f"{_FULL_PT}.tables.size", 0),
        f"{_FULL_PT}.tables",
        "table area must be a non-empty 4 KiB-aligned range",
        full_snapshot_doc,
    ),
    Case(
        "page-size-8K",
        setp(f"{_FULL_PT}.mappings[0].page_size", "8K"),
        f"{_FULL_PT}.mappings[0].page_size",
        "page size must be 4K, 2M or 1G, got '8K'",
        full_snapshot_doc,
    ),
    Case(
        "page-size-8192",
        setp(f"{_FULL_PT}.mappings[0].page_size", 8192),
        f"{_FULL_PT}.mappings[0].page_size",
        "page size must be 4K, 2M or 1G",
        full_snapshot_doc,
    ),
    Case(
        "flag-unknown",
        setp(f"{_FULL_PT}.mappings[1].flags", ["RW", "NX"]),
        f"{_FULL_PT}.mappings[1].flags[1]",
        "unknown flag 'NX'",
        full_snapshot_doc,
    ),
    Case(
        "pkey-16",
        setp(f"{_FULL_PT}.mappings[2].pkey", 16),
        f"{_FULL_PT}.mappings[2].pkey",
        "does not fit in 4 unsigned bits",
        full_snapshot_doc,
    ),
    Case(
        "gdt-null-with-dpl",
        setp("build.gdt.entries[0].dpl", 3),
        "build.gdt.entries[0].dpl",
        "unknown field",
        full_snapshot_doc,
    ),
    Case(
        "gdt-raw-9-bytes",
        setp("build.gdt.entries[0]", {"index": 0, "kind": "raw", "bytes": "00" * 9}),
        "build.gdt.entries[0].bytes",
        "9 bytes, expected 8 or 16",
        full_snapshot_doc,
    ),
    Case(
        "gdt-index-8192",
        setp("build.gdt.entries[1].index", 8192),
        "build.gdt.entries[1].index",
        "does not fit in 13 unsigned bits",
        full_snapshot_doc,
    ),
    Case(
        "gdt-dpl-4",
        setp("build.gdt.entries[3].dpl", 4),
        "build.gdt.entries[3].dpl",
        "does not fit in 2 unsigned bits",
        full_snapshot_doc,
    ),
    Case(
        "gate-vector-256",
        setp("build.idt.gates[0].vector", 256),
        "build.idt.gates[0].vector",
        "does not fit in 8 unsigned bits",
        full_snapshot_doc,
    ),
    Case(
        "gate-ist-8",
        setp("build.idt.gates[1].ist", 8),
        "build.idt.gates[1].ist",
        "does not fit in 3 unsigned bits",
        full_snapshot_doc,
    ),
    Case(
        "gate-type-task",
        setp("build.idt.gates[0].type", "task"),
        "build.idt.gates[0].type",
        "expected one of interrupt, trap, got 'task'",
        full_snapshot_doc,
    ),
    Case(
        "gate-present-1",
        setp("build.idt.gates[0].present", 1),
        "build.idt.gates[0].present",
        "expected true or false, got a number",
        full_snapshot_doc,
    ),
    Case(
        "gates-257",
        setp("build.idt.gates", [{}] * 257),
        "build.idt.gates",
        "257 items, more than 256",
        full_snapshot_doc,
    ),
    Case(
        "tss-rsp-2",
        setp("build.tss.rsp", [0, 0]),
        "build.tss.rsp",
        "expected 3 entries (RSP0-2), got 2",
        full_snapshot_doc,
    ),
    Case(
        "tss-ist-string",
        setp("build.tss.ist[6]", "top"),
        "build.tss.ist[6]",
        "expected a '0x…' hex string, got 'top'",
        full_snapshot_doc,
    ),
    # -- pagemap, symbols ------------------------------------------------------------------
    Case(
        "pagemap-unaligned",
        setp("pagemap", [{"va": "0x1001", "entry": 0}]),
        "pagemap[0].va",
        "0x1001 is not page aligned",
    ),
    Case(
        "symbols-kind",
        setp("symbols", [{"kind": "pdb", "path": "x"}]),
        "symbols[0].kind",
        "expected one of elf, system.map, kallsyms, inline, got 'pdb'",
    ),
    Case(
        "symbol-name-number",
        setp("symbols", [{"kind": "inline", "entries": [{"name": 1, "address": 0}]}]),
        "symbols[0].entries[0].name",
        "expected a string, got a number",
    ),
]


def _message_starts(err: KctxError, path: str, snapshot: Path) -> None:
    msg = str(err)
    where = str(snapshot) if path == FILE else path
    assert msg.startswith(f"{where}: "), msg
    assert "\n" not in msg


@pytest.mark.parametrize("case", LOAD_CASES, ids=lambda c: c.id)
def test_loader_rejects(case: Case, tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, case.mutate(case.base()), files=case.files)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(snap)
    _message_starts(info.value, case.path, snap)
    assert case.reason in str(info.value)


def test_corpus_is_large_and_ids_unique() -> None:
    ids = [c.id for c in LOAD_CASES + MEMORY_CASES + CONTEXT_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 25


def test_document_over_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = write_snapshot(tmp_path, minimal_snapshot_doc())
    monkeypatch.setattr(snapshot_io, "MAX_DOCUMENT_BYTES", snap.stat().st_size - 1)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(snap)
    assert str(info.value).startswith(f"{snap}: document larger than")


def test_missing_document(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError) as info:
        load_snapshot(tmp_path / "nope.json")
    assert str(info.value) == f"{tmp_path / 'nope.json'}: cannot read: No such file or directory"


# -- side files: rejected when memory is mapped -----------------------------------------------


def _file_range(path: str, size: int = 0x2000, offset: int = 0) -> Mutator:
    return setp("memory", [{"base": 0, "size": hex(size), "kind": "file", "path": path,
                            "offset": hex(offset)}])  # fmt: skip


MEMORY_CASES = [
    Case(
        "side-file-missing",
        _file_range("gone.bin"),
        "memory[0]",
        "cannot map side file: No such file",
    ),
    Case(
        "side-file-short",
        _file_range("short.bin"),
        "memory[0]",
        "file is 4096 bytes, shorter than the slice 0x0+0x2000",
        files={"short.bin": bytes(4096)},
    ),
    Case(
        "side-offset-past-end",
        _file_range("side.bin", 0x1000, 0x2000),
        "memory[0]",
        "shorter than the slice 0x2000+0x1000",
        files={"side.bin": bytes(0x2000)},
    ),
    Case(
        "side-offset-2**64-1",
        _file_range("side.bin", 0x1000, 2**64 - 1),
        "memory[0]",
        "shorter than the slice",
        files={"side.bin": bytes(0x2000)},
    ),
    Case(
        "path-dotdot",
        _file_range("../outside.bin"),
        "memory[0].path",
        "path '../outside.bin' leaves the snapshot's folder",
    ),
    Case(
        "path-dotdot-inside-then-out",
        _file_range("sub/../../outside.bin"),
        "memory[0].path",
        "leaves the snapshot's folder",
        files={"sub/keep": b""},
    ),
    Case(
        "path-absolute",
        _file_range("/etc/passwd"),
        "memory[0].path",
        "path '/etc/passwd' leaves the snapshot's folder",
    ),
    Case(
        "path-symlink-outside",
        _file_range("link.bin"),
        "memory[0].path",
        "path 'link.bin' leaves the snapshot's folder",
    ),
    Case(
        "path-directory",
        _file_range("sub"),
        "memory[0].path",
        "'sub' is not a regular file",
        files={"sub/keep": b""},
    ),
    Case("path-fifo", _file_range("fifo"), "memory[0].path", "'fifo' is not a regular file"),
]


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO side file would block ``open`` forever)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _prepare_outside(tmp_path: Path) -> Path:
    """A snapshot folder ``tmp_path/snap`` next to a file it must not reach."""
    (tmp_path / "outside.bin").write_bytes(bytes(range(256)) * 32)
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    os.mkfifo(folder / "fifo")
    return folder


@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: c.id)
def test_open_memory_rejects(case: Case, tmp_path: Path) -> None:
    folder = _prepare_outside(tmp_path)
    snap = write_snapshot(folder, case.mutate(case.base()), files=case.files)
    loaded = load_snapshot(snap)
    with deadline(10), pytest.raises(SnapshotError) as info:
        loaded.open_memory()
    _message_starts(info.value, case.path, snap)
    assert case.reason in str(info.value)


@pytest.mark.parametrize("rel", ["../outside.bin", "link.bin"])
def test_allow_outside_permits_escaping_paths(tmp_path: Path, rel: str) -> None:
    folder = _prepare_outside(tmp_path)
    snap = write_snapshot(folder, _file_range(rel)(minimal_snapshot_doc()))
    mem = load_snapshot(snap, allow_outside=True).open_memory()
    try:
        assert mem.read(0x100, 4) == bytes([0, 1, 2, 3])
        assert mem.read(0x1FFF, 1) == b"\xff"
    finally:
        mem.close()


# -- materialization: rejected by open_context (GDT/IDT/TSS tables, page tables) -----------


def context_doc() -> dict:
    """A small document that materializes cleanly: 1 MiB of RAM, GDT, IDT, TSS, page tables."""
    doc = minimal_snapshot_doc()
    doc["cpu"].update(
        cr3="0x10000",
        cr4="0x20",
        msrs={"efer": "0xd00"},
        gdtr={"base": "0x1000", "limit": "0x37"},
        idtr={"base": "0x2000", "limit": "0xfff"},
        tr={"selector": "0x28", "base": "0x3000", "limit": "0x67"},
    )
    doc["memory"] = [{"base": "0x0", "size": "0x100000", "kind": "zero"}]
    doc["build"] = {
        "page_tables": {
            "tables": {"base": "0x10000", "size": "0x10000"},
            "mappings": [
                {"va": "0x0", "pa": "0x0", "size": "0x100000", "flags": ["RW"]},
                {"va": "0xffffffff81000000", "pa": "0x80000", "size": "0x2000", "flags": ["G"]},
            ],
        },
        "gdt": {
            "phys": "0x1000",
            "entries": [
                {"index": 0, "kind": "null"},
                {"index": 1, "kind": "code64"},
                {"index": 2, "kind": "data"},
                {"index": 5, "kind": "tss", "base": "0x3000", "limit": "0x67"},
            ],
        },
        "idt": {
            "phys": "0x2000",
            "gates": [{"vector": 3, "handler": "0xffffffff81000000", "selector": "0x8"}],
        },
        "tss": {"phys": "0x3000", "rsp": ["0x8000", 0, 0]},
    }
    return doc


_GATE = "build.idt.gates[0].handler"
# Reasons for these come from the materializers; accept their likely wordings.
CONTEXT_CASES = [
    Case("gate-non-canonical", setp(_GATE, "0x0000800000000000"), _GATE, r"canonical", context_doc),
    Case(
        "gate-non-canonical-high",
        setp(_GATE, "0xff00000000000000"),
        _GATE,
        r"canonical",
        context_doc,
    ),
    Case(
        "gdtr-limit-beyond-memory",
        chain(
            setp("build.gdt.phys", "0xff000"),
            setp("cpu.gdtr", {"base": "0xff000", "limit": "0xffff"}),
        ),
        "cpu.gdtr",
        r"memory|backed|beyond|outside",
        context_doc,
    ),
    Case(
        "gdt-entry-beyond-memory",
        chain(setp("build.gdt.phys", "0xffff8"), setp("cpu.gdtr.limit", "0x7")),
        "build.gdt.entries[1]",
        r"cannot write|memory|backed|beyond|outside",
        context_doc,
    ),
    Case(
        "mapping-overlap",
        setp("build.page_tables.mappings[1].va", "0x1000"),
        "build.page_tables.mappings[1]",
        r"overlap|conflict|already",
        context_doc,
    ),
]


def test_context_doc_opens() -> None:
    """The base of CONTEXT_CASES is valid, so each case fails for its own reason."""
    from kctx_debug.pagetables.context import KernelContext
    from kctx_debug.snapshot_io import parse_snapshot

    ctx = KernelContext.from_snapshot(parse_snapshot(context_doc()))
    try:
        assert ctx.mem.read_u64(0x1008) != 0  # the code64 descriptor was written
    finally:
        ctx.close()


@pytest.mark.parametrize("case", CONTEXT_CASES, ids=lambda c: c.id)
def test_open_context_rejects(case: Case, tmp_path: Path) -> None:
    from kctx_debug.pagetables.context import open_context

    snap = write_snapshot(tmp_path, case.mutate(case.base()))
    with pytest.raises(KctxError) as info:
        open_context(snap).close()
    msg = str(info.value)
    assert case.path in msg, msg
    assert re.search(case.reason, msg), msg


# -- the CLI: one line on stderr, non-zero exit, input untouched --------------------------------

CLI_CASES = [
    next(c for c in LOAD_CASES if c.id == name)
    for name in ("trailing-comma", "ranges-overlap", "invalid-utf8", "nested-100000-lists")
] + [next(c for c in MEMORY_CASES if c.id == name) for name in ("path-dotdot", "side-file-short")]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_reports_one_line(case: Case, tmp_path: Path) -> None:
    folder = _prepare_outside(tmp_path)
    (folder / "fifo").unlink()
    snap = write_snapshot(folder, case.mutate(case.base()), files=case.files)
    before = {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }
    proc = subprocess.run(
        [sys.executable, "-m", "kctx_debug.cli", str(snap), "--batch"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    where = str(snap) if case.path == FILE else case.path
    assert f"{where}: " in lines[0] and case.reason in lines[0], lines[0]
    after = {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }
    assert after == before
