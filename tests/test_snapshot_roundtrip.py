"""load -> save -> load keeps the model and every byte of memory; saving is atomic.

Also: saving the current memory (``mem=``) writes one sparse side file, and a
1 GiB sparse side file loads and reads without being read whole (peak RSS of a
child process, from /proc/self/status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FULL_SIDE_FILES, full_snapshot_doc, minimal_snapshot_doc, write_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from kctx_debug.errors import SnapshotError
from kctx_debug.physmem import PhysicalMemory
from kctx_debug.snapshot import MemoryRange, RangeKind, Snapshot
from kctx_debug.snapshot_io import load_snapshot, parse_snapshot, save_snapshot, snapshot_to_json


def _full(tmp_path: Path) -> Path:
    return write_snapshot(tmp_path / "snap", full_snapshot_doc(), "full.json", FULL_SIDE_FILES)


def assert_same_memory(a: PhysicalMemory, b: PhysicalMemory) -> None:
    """Same backed ranges, same bytes in each."""
    assert list(a.contiguous_ranges()) == list(b.contiguous_ranges())
    for base, size in a.contiguous_ranges():
        assert a.read(base, size) == b.read(base, size), hex(base)


def _memory(snap: Snapshot) -> PhysicalMemory:
    return snap.open_memory()


# -- load -> save -> load --------------------------------------------------------------------------


def test_roundtrip_same_model_and_bytes(tmp_path: Path) -> None:
    first = load_snapshot(_full(tmp_path))
    out = tmp_path / "snap" / "again.json"
    saved = save_snapshot(first, out)
    second = load_snapshot(out)
    assert second == first
    assert saved == first
    assert second.content_hash() == first.content_hash()
    m1, m2 = _memory(first), _memory(second)
    try:
        assert_same_memory(m1, m2)
        # full.bin from offset 0x1000 holds (0x1000 + i) % 251 = 80, 81, ... = "PQRS"
        assert m2.read(0x200000, 4) == b"PQRS" and m2.read(0x100000, 2) == b"\xcc\xf4"
    finally:
        m1.close()
        m2.close()


def test_saved_document_spells_integers_as_hex(tmp_path: Path) -> None:
    snap = load_snapshot(_full(tmp_path))
    out = tmp_path / "snap" / "again.json"
    save_snapshot(snap, out)
    doc = json.loads(out.read_text())
    assert doc["cpu"]["regs"]["rbx"] == "0x1"
    assert doc["cpu"]["regs"]["r12"] == "0xffffffffffffffff"
    assert doc["cpu"]["regs"]["r13"] == "0x0"  # absent registers are written as 0
    assert doc["cpu"]["cr3"] == "0x10000"
    assert doc["cpu"]["segments"]["ds"] == {"selector": "0x10"}
    assert doc["memory"][1] == {
        "base": "0x100000",
        "size": "0x2000",
        "kind": "inline",
        "encoding": "hex",
        "data": "ccf490900f0b",  # whitespace gone, zero padding trimmed
    }
    assert doc["memory"][3]["data"] == "a2N0eA=="
    assert doc["memory"][2] == {
        "base": "0x200000",
        "size": "0x2000",
        "kind": "file",
        "path": "full.bin",
        "offset": "0x1000",
    }
    gate = doc["build"]["idt"]["gates"][2]
    assert gate == {
        "vector": 255,
        "handler": "0xffffffff81000002",
        "selector": "0x8",
        "type": "interrupt",
        "dpl": 0,
        "ist": 0,
        "present": False,
    }
    assert doc["build"]["page_tables"]["mappings"][3]["flags"] == ["US", "XD", "PAT"]
    assert doc["build"]["page_tables"]["mappings"][3]["page_size"] == "4K"


def test_saving_elsewhere_rewrites_side_file_paths(tmp_path: Path) -> None:
    snap = load_snapshot(_full(tmp_path))
    out = tmp_path / "elsewhere" / "copy.json"
    out.parent.mkdir()
    save_snapshot(snap, out)
    doc = json.loads(out.read_text())
    assert doc["memory"][2]["path"] == "../snap/full.bin"
    with pytest.raises(SnapshotError, match=r"^memory\[2\]\.path: path '../snap/full.bin' leaves"):
        load_snapshot(out).open_memory()
    copy = load_snapshot(out, allow_outside=True)
    assert replace(copy, memory=snap.memory) == snap
    assert [replace(r, path="") for r in copy.memory] == [replace(r, path="") for r in snap.memory]
    m1, m2 = _memory(snap), _memory(copy)
    try:
        assert_same_memory(m1, m2)
    finally:
        m1.close()
        m2.close()


# -- saving the current memory ------------------------------------------------------------------


def test_save_with_mem_writes_sparse_side_file(tmp_path: Path) -> None:
    doc = full_snapshot_doc()
    doc["memory"].append({"base": "0x10000000", "size": "0x4000000", "kind": "zero"})  # 64 MiB
    snap = load_snapshot(write_snapshot(tmp_path, doc, "full.json", FULL_SIDE_FILES))
    mem = snap.open_memory()
    try:
        mem.write(0x5000, b"written into a zero range")
        mem.write(0x200FFE, b"\xaa\xbb\xcc\xdd")  # across two pages of the side file
        mem.write(0x13FFFFF8, b"12345678")
        saved = save_snapshot(snap, tmp_path / "after.json", mem=mem)
        side = tmp_path / "after.phys"
        assert side.stat().st_size == mem.total_size
        # Only non-zero MiB chunks take disk space: far less than the 64 MiB zero range.
        assert side.stat().st_blocks * 512 < 16 << 20
        assert saved.build is None and saved.source["build_applied"] is True
        assert all(r.kind is RangeKind.FILE and r.path == "after.phys" for r in saved.memory)
        reloaded = load_snapshot(tmp_path / "after.json")
        assert reloaded == saved
        m2 = reloaded.open_memory()
        try:
            assert_same_memory(mem, m2)
            assert m2.read(0x200FFE, 4) == b"\xaa\xbb\xcc\xdd"
            assert m2.read(0x13FFFFF8, 8) == b"12345678"
        finally:
            m2.close()
    finally:
        mem.close()
    # The original side file never saw the emulated writes (copy-on-write mapping).
    assert (tmp_path / "full.bin").read_bytes() == FULL_SIDE_FILES["full.bin"]


# -- atomic saving ------------------------------------------------------------------------------


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("mem", [False, True], ids=["document", "with-mem"])
def test_save_over_existing_leaves_no_temporaries(tmp_path: Path, mem: bool) -> None:
    path = _full(tmp_path)
    snap = load_snapshot(path)
    memory = snap.open_memory() if mem else None
    try:
        save_snapshot(snap, path, mem=memory)
    finally:
        if memory is not None:
            memory.close()
    expected = {"full.json", "full.bin", "kallsyms.txt"} | ({"full.phys"} if mem else set())
    assert {p.name for p in path.parent.iterdir()} == expected


@pytest.mark.parametrize("failing", ["replace", "fsync"])
@pytest.mark.parametrize("mem", [False, True], ids=["document", "with-mem"])
def test_failed_save_leaves_everything_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, mem: bool
) -> None:
    path = _full(tmp_path)
    snap = load_snapshot(path)
    before = _listing(path.parent)
    memory = snap.open_memory() if mem else None

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    try:
        with pytest.raises(SnapshotError) as info:
            save_snapshot(snap, path, mem=memory)
    finally:
        if memory is not None:
            memory.close()
    assert str(info.value) == f"{path}: cannot write: No space left on device"
    monkeypatch.undo()
    assert _listing(path.parent) == before
    assert load_snapshot(path) == snap


# -- random valid snapshots ---------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
spelled = st.one_of(u64, u64.map(hex), u64.map(lambda v: "0X" + format(v, "032X")))


@st.composite
def valid_docs(draw: st.DrawFn) -> dict:
    doc = minimal_snapshot_doc()
    names = ["rax", "rsp", "rip", "rflags", "r15"]
    doc["cpu"]["regs"] = {n: draw(spelled) for n in draw(st.lists(st.sampled_from(names)))}
    doc["cpu"]["cr2"] = draw(spelled)
    doc["cpu"]["msrs"] = {
        n: draw(spelled) for n in draw(st.lists(st.sampled_from(["efer", "pkru"])))
    }
    base, memory = 0, []
    for _ in range(draw(st.integers(0, 5))):
        base += draw(st.integers(0, 4)) * 4096
        pages = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["zero", "inline", "inline64"]))
        item = {"base": hex(base), "size": pages * 4096, "kind": kind[:6]}
        if kind != "zero":
            data = draw(st.binary(max_size=64))
            item["encoding"] = "base64" if kind == "inline64" else "hex"
            item["data"] = _encode(data, item["encoding"])
        memory.append(item)
        base += pages * 4096
    doc["memory"] = draw(st.permutations(memory))
    doc["pagemap"] = [{"va": hex(v * 4096), "entry": e} for v, e in draw(st.lists(st.tuples(
        st.integers(0, 2**52 - 1), u64), max_size=3))]  # fmt: skip
    doc["source"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    return doc


def _encode(data: bytes, encoding: str) -> str:
    import base64

    return data.hex() if encoding == "hex" else base64.b64encode(data).decode()


@settings(max_examples=100, deadline=None)
@given(doc=valid_docs())
def test_random_documents_roundtrip(doc: dict) -> None:
    first = parse_snapshot(doc)
    text = json.dumps(snapshot_to_json(first))
    second = parse_snapshot(json.loads(text))
    assert second == first
    m1, m2 = first.open_memory(), second.open_memory()
    try:
        assert_same_memory(m1, m2)
    finally:
        m1.close()
        m2.close()


# -- a 1 GiB sparse side file --------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys
    from kctx_debug.snapshot_io import load_snapshot

    mem = load_snapshot(sys.argv[1]).open_memory()
    reads = {hex(a): mem.read(a, 8).hex() for a in (0, 0x20000000, 0x3FFFFFF8, 0x12345000)}
    status = open("/proc/self/status").read()
    hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
    print(json.dumps({"reads": reads, "hwm_kib": hwm}))
    """
)


def test_one_gib_sparse_side_file_is_not_read_whole(tmp_path: Path) -> None:
    side = tmp_path / "big.phys"
    with open(side, "wb") as f:
        f.truncate(1 << 30)
        for offset, marker in (
            (0, b"first..."),
            (0x20000000, b"middle.."),
            (0x3FFFFFF8, b"...last"),
        ):
            f.seek(offset)
            f.write(marker)
    doc = minimal_snapshot_doc()
    doc["memory"] = [{"base": 0, "size": "0x40000000", "kind": "file", "path": "big.phys"}]
    snap = write_snapshot(tmp_path, doc)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(snap)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["reads"] == {
        "0x0": b"first...".hex(),
        "0x20000000": b"middle..".hex(),
        "0x3ffffff8": b"...last\0".hex(),
        "0x12345000": "00" * 8,
    }
    assert out["hwm_kib"] < 200 * 1024, out


def test_memory_range_repr_leaves_out_inline_data():
    # A failing assertion on a snapshot must not print megabytes of memory.
    r = MemoryRange(0x1000, 0x1000, RangeKind.INLINE, data=b"\xab" * 0x1000)
    assert repr(r) == (
        "MemoryRange(base=4096, size=4096, kind=<RangeKind.INLINE: 'inline'>, "
        "encoding='hex', path='', offset=0)"
    )
    assert r != replace(r, data=b"\xcd" * 0x1000)  # still compared
