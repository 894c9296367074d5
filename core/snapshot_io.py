"""Reading and writing snapshot documents (format v1, docs/snapshot-format.md).

Snapshots are untrusted: every field is type- and range-checked, errors name
the JSON path, side-file paths may not leave the snapshot's folder, and no
allocation is sized by a number that was not checked first. Saving is atomic.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .buildspec import (
    BuildSpec,
    GateSpec,
    GdtEntrySpec,
    GdtSpec,
    IdtSpec,
    MappingSpec,
    PageTableSpec,
    TssSpec,
)
from .errors import SnapshotError
from .jsonfields import Fields, check_free_form, hex_int, object_pairs, parse_int
from .physmem import MAX_PHYS_BITS, PAGE_SIZE, PhysicalMemory
from .snapshot import (
    CONTROL_REGISTERS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GENERAL_REGISTERS,
    KNOWN_MSRS,
    SEGMENT_REGISTERS,
    CpuState,
    MemoryRange,
    PagemapRecord,
    RangeKind,
    Segment,
    Snapshot,
    SymbolSource,
    TableRegister,
)

__all__ = [
    "check_output_path",
    "load_snapshot",
    "parse_snapshot",
    "save_snapshot",
    "snapshot_to_json",
    "write_atomic",
]

MAX_DOCUMENT_BYTES = 256 << 20
MAX_INLINE_BYTES = 16 << 20
MAX_RANGE_BYTES = 1 << 40  # Unicorn's physical limit; larger ranges are not real snapshots
PAGE_SIZES = {"4K": 1 << 12, "2M": 1 << 21, "1G": 1 << 30}
# Padded standard base64 only (RFC 4648 section 4): one spelling per byte string.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
# Leaf flag names accepted in build.page_tables.mappings[].flags (SDM vol. 3A Table 4-19).
_LEAF_FLAGS = {
    "RW": 1 << 1, "US": 1 << 2, "PWT": 1 << 3, "PCD": 1 << 4, "A": 1 << 5, "D": 1 << 6,
    "G": 1 << 8, "AVL9": 1 << 9, "AVL10": 1 << 10, "AVL11": 1 << 11, "XD": 1 << 63,
}  # fmt: skip


# -- loading -----------------------------------------------------------------------


def load_snapshot(path: str | os.PathLike[str], *, allow_outside: bool = False) -> Snapshot:
    """Read and validate a snapshot document; memory is not mapped yet.

    :raises SnapshotError: naming the JSON path and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        # Opening a FIFO would block forever; a device or folder is never a snapshot.
        raise SnapshotError(str(path), "not a regular file")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as e:
        raise SnapshotError(str(path), f"cannot read: {e.strerror}") from None
    if len(blob) > MAX_DOCUMENT_BYTES:
        raise SnapshotError(str(path), f"document larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    if blob.startswith(b"\x7fELF"):
        raise SnapshotError(str(path), "an ELF file, but not a QEMU dump-guest-memory core")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SnapshotError(str(path), f"not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=object_pairs, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        msg = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise SnapshotError(str(path), msg) from None
    except RecursionError:
        raise SnapshotError(str(path), "JSON nested too deeply") from None
    except SnapshotError as e:
        raise SnapshotError(str(path), e.reason) from None
    except ValueError as e:
        # An integer literal longer than Python's int-conversion limit (4300 digits).
        reason = str(e).split(":")[0]
        raise SnapshotError(str(path), f"invalid JSON: {reason}") from None
    try:
        return parse_snapshot(doc, origin=path, allow_outside=allow_outside)
    except SnapshotError as e:
        if e.where:
            raise
        raise SnapshotError(str(path), e.reason) from None  # the top level is not an object


def _no_constant(name: str) -> None:
    raise SnapshotError("", f"invalid JSON: {name} is not a JSON number")


def parse_snapshot(
    doc: Any, *, origin: Path | None = None, allow_outside: bool = False
) -> Snapshot:
    """Validate a decoded JSON document into a :class:`Snapshot`."""
    top = Fields(doc, "")
    fmt = top.str("format")
    if fmt != FORMAT_NAME:
        raise SnapshotError("format", f"expected {FORMAT_NAME!r}, got {fmt[:40]!r}")
    version = top.raw("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise SnapshotError(
            "version", f"unsupported version {repr(version)[:40]} (this tool reads 1)"
        )
    arch = top.str("arch", "x86_64", choices=("x86_64",))
    source = top.raw("source", {})
    if not isinstance(source, dict):
        raise SnapshotError("source", "expected an object")
    check_free_form(source, "source")
    cpu = _parse_cpu(top.obj_field("cpu"))
    memory = _parse_memory(top.list("memory"), "memory")
    build = _parse_build(top.obj_field("build", None))
    pagemap = _parse_pagemap(top.list("pagemap", []))
    symbols = _parse_symbols(top.list("symbols", []))
    top.done()
    return Snapshot(cpu, memory, source, build, pagemap, symbols, arch, origin, allow_outside)


def _parse_cpu(f: Fields) -> CpuState:
    regs_f = f.obj_field("regs")
    regs = {name: regs_f.int(name, 0) for name in GENERAL_REGISTERS}
    regs_f.done()
    optional = ("cr2", "cr8")
    control = {n: f.int(n, 0) if n in optional else f.int(n) for n in CONTROL_REGISTERS}
    msrs_f = f.obj_field("msrs", None)
    msrs = {}
    if msrs_f is not None:
        msrs = {name: msrs_f.int(name) for name in KNOWN_MSRS if msrs_f.has(name)}
        msrs_f.done()
    segments = {}
    seg_f = f.obj_field("segments", None)
    if seg_f is not None:
        for name in SEGMENT_REGISTERS:
            if seg_f.has(name):
                segments[name] = _parse_segment(seg_f.obj_field(name))
        seg_f.done()
    tables = {}
    for name in ("gdtr", "idtr"):
        t = f.obj_field(name, None)
        if t is not None:
            tables[name] = TableRegister(t.int("base"), t.int("limit", bits=16))
            t.done()
    system = {}
    for name in ("tr", "ldtr"):
        s = f.obj_field(name, None)
        if s is not None:
            system[name] = _parse_segment(s)
    f.done()
    return CpuState(regs=regs, msrs=msrs, segments=segments, **control, **tables, **system)


def _parse_segment(f: Fields) -> Segment:
    seg = Segment(
        selector=f.int("selector", bits=16),
        base=f.int("base", None),
        limit=f.int("limit", None, bits=32),
        attributes=f.int("attributes", None, bits=16),
    )
    f.done()
    return seg


def _parse_memory(items: list, where: str) -> tuple[MemoryRange, ...]:
    ranges = []
    for i, item in enumerate(items):
        f = Fields(item, f"{where}[{i}]")
        base = f.int("base", bits=MAX_PHYS_BITS)
        size = f.int("size")
        if size == 0 or size > MAX_RANGE_BYTES:
            raise SnapshotError(f.path("size"), f"{size:#x} is not between 1 byte and 1 TiB")
        if base % PAGE_SIZE or size % PAGE_SIZE:
            raise SnapshotError(f.where, f"range {base:#x}+{size:#x} is not 4 KiB aligned")
        if base + size > 1 << MAX_PHYS_BITS:
            raise SnapshotError(f.where, f"range ends beyond the {MAX_PHYS_BITS}-bit address space")
        kind = RangeKind(f.str("kind", choices=tuple(k.value for k in RangeKind)))
        if kind is RangeKind.INLINE:
            ranges.append(_parse_inline(f, base, size))
        elif kind is RangeKind.FILE:
            rel = _file_name(f, "path")
            ranges.append(MemoryRange(base, size, kind, path=rel, offset=f.int("offset", 0)))
        else:
            ranges.append(MemoryRange(base, size, kind))
        f.done()
    ordered = sorted(range(len(ranges)), key=lambda k: ranges[k].base)
    for a, b in itertools.pairwise(ordered):
        if ranges[b].base < ranges[a].end:
            raise SnapshotError(
                f"{where}[{max(a, b)}]",
                f"overlaps {where}[{min(a, b)}] at {ranges[b].base:#x}",
            )
    return tuple(ranges)


def _file_name(f: Fields, key: str) -> str:
    """A side-file path: non-empty, no NUL, and encodable as an OS file name."""
    name = f.str(key)
    try:
        os.fsencode(name)
    except UnicodeError:
        name = ""
    if not name or "\0" in name:
        raise SnapshotError(f.path(key), "not a usable file name (empty, NUL, lone surrogate)")
    return name


def _parse_inline(f: Fields, base: int, size: int) -> MemoryRange:
    if size > MAX_INLINE_BYTES:
        raise SnapshotError(f.path("size"), "inline data is limited to 16 MiB: use a side file")
    encoding = f.str("encoding", "hex", choices=("hex", "base64"))
    text = f.str("data")
    try:
        if encoding == "hex":
            data = bytes.fromhex(text)
        elif _BASE64.match(text):
            data = base64.b64decode(text, validate=True)
        else:
            raise ValueError(text)
    except (ValueError, binascii.Error):
        raise SnapshotError(f.path("data"), f"not valid {encoding}") from None
    if len(data) > size:
        raise SnapshotError(f.path("data"), f"{len(data)} bytes, more than size {size:#x}")
    # Short inline data is zero-padded to its declared size: fixtures stay readable.
    return MemoryRange(base, size, RangeKind.INLINE, data + bytes(size - len(data)), encoding)


def _parse_pagemap(items: list) -> tuple[PagemapRecord, ...]:
    out = []
    for i, item in enumerate(items):
        f = Fields(item, f"pagemap[{i}]")
        va = f.int("va")
        if va % PAGE_SIZE:
            raise SnapshotError(f.path("va"), f"{va:#x} is not page aligned")
        out.append(PagemapRecord(va, f.int("entry")))
        f.done()
    return tuple(out)


def _parse_symbols(items: list) -> tuple[SymbolSource, ...]:
    out = []
    for i, item in enumerate(items):
        f = Fields(item, f"symbols[{i}]")
        kind = f.str("kind", choices=("elf", "system.map", "kallsyms", "inline"))
        offset = f.int("offset", 0)
        if kind == "inline":
            entries = []
            for j, pair in enumerate(f.list("entries")):
                e = Fields(pair, f"{f.where}.entries[{j}]")
                entries.append((e.str("name"), e.int("address")))
                e.done()
            out.append(SymbolSource(kind, entries=tuple(entries), offset=offset))
        else:
            out.append(SymbolSource(kind, path=_file_name(f, "path"), offset=offset))
        f.done()
    return tuple(out)


def _parse_build(f: Fields | None) -> BuildSpec | None:
    if f is None:
        return None
    spec = BuildSpec(
        page_tables=_parse_page_tables(f.obj_field("page_tables", None)),
        gdt=_parse_gdt(f.obj_field("gdt", None)),
        idt=_parse_idt(f.obj_field("idt", None)),
        tss=_parse_tss(f.obj_field("tss", None)),
    )
    f.done()
    return spec


def _page_size(value: Any, where: str) -> int:
    if isinstance(value, str) and value in PAGE_SIZES:
        return PAGE_SIZES[value]
    try:
        size = parse_int(value, where)
    except SnapshotError:
        size = None
    if size not in PAGE_SIZES.values():
        raise SnapshotError(where, f"page size must be 4K, 2M or 1G, got {repr(value)[:40]}")
    return size


def _parse_page_tables(f: Fields | None) -> PageTableSpec | None:
    if f is None:
        return None
    levels = f.raw("levels", 4)
    if type(levels) is not int or levels not in (4, 5):
        raise SnapshotError(f.path("levels"), f"expected 4 or 5, got {repr(levels)[:40]}")
    area = f.obj_field("tables")
    table_base, table_size = area.int("base", bits=MAX_PHYS_BITS), area.int("size")
    area.done()
    if table_base % PAGE_SIZE or table_size % PAGE_SIZE or not table_size:
        raise SnapshotError(area.where, "table area must be a non-empty 4 KiB-aligned range")
    mappings = []
    for i, item in enumerate(f.list("mappings")):
        m = Fields(item, f"{f.path('mappings')}[{i}]")
        flags = 0
        pat = False
        for j, name in enumerate(m.list("flags", [])):
            if name == "PAT":
                pat = True
            elif isinstance(name, str) and name in _LEAF_FLAGS:
                flags |= _LEAF_FLAGS[name]
            else:
                raise SnapshotError(
                    f"{m.path('flags')}[{j}]",
                    f"unknown flag {str(name)[:20]!r} (known: {', '.join(_LEAF_FLAGS)}, PAT)",
                )
        mappings.append(
            MappingSpec(
                va=m.int("va"),
                pa=m.int("pa", bits=MAX_PHYS_BITS),
                size=m.int("size"),
                page_size=_page_size(m.raw("page_size", "4K"), m.path("page_size")),
                flags=flags,
                pkey=m.int("pkey", 0, bits=4),
                pat=pat,
                where=m.where,
            )
        )
        m.done()
    f.done()
    return PageTableSpec(levels, table_base, table_size, tuple(mappings))


_GDT_KINDS = ("null", "code64", "code32", "data", "tss", "ldt", "raw")


def _parse_gdt(f: Fields | None) -> GdtSpec | None:
    if f is None:
        return None
    entries = []
    for i, item in enumerate(f.list("entries", max_items=8192)):
        e = Fields(item, f"{f.path('entries')}[{i}]")
        kind = e.str("kind", choices=_GDT_KINDS)
        raw = b""
        if kind == "raw":
            try:
                raw = bytes.fromhex(e.str("bytes"))
            except ValueError:
                raise SnapshotError(e.path("bytes"), "not valid hex") from None
            if len(raw) not in (8, 16):
                raise SnapshotError(e.path("bytes"), f"{len(raw)} bytes, expected 8 or 16")
        index = e.int("index", bits=13)
        if kind in ("null", "raw"):
            # No dpl/base/limit: they would be ignored, and done() reports them as unknown.
            entries.append(GdtEntrySpec(index, kind, raw=raw, where=e.where))
        else:
            entries.append(
                GdtEntrySpec(
                    index=index,
                    kind=kind,
                    dpl=e.int("dpl", 0, bits=2),
                    base=e.int("base", 0),
                    limit=e.int("limit", 0xFFFFF, bits=20),
                    where=e.where,
                )
            )
        e.done()
    spec = GdtSpec(f.int("phys", bits=MAX_PHYS_BITS), tuple(entries))
    f.done()
    return spec


def _parse_idt(f: Fields | None) -> IdtSpec | None:
    if f is None:
        return None
    gates = []
    for i, item in enumerate(f.list("gates", max_items=256)):
        g = Fields(item, f"{f.path('gates')}[{i}]")
        gates.append(
            GateSpec(
                vector=g.int("vector", bits=8),
                handler=g.int("handler"),
                selector=g.int("selector", bits=16),
                gate_type=g.str("type", "interrupt", choices=("interrupt", "trap")),
                dpl=g.int("dpl", 0, bits=2),
                ist=g.int("ist", 0, bits=3),
                present=g.bool("present", True),
                where=g.where,
            )
        )
        g.done()
    spec = IdtSpec(f.int("phys", bits=MAX_PHYS_BITS), tuple(gates))
    f.done()
    return spec


def _parse_tss(f: Fields | None) -> TssSpec | None:
    if f is None:
        return None
    rsp = f.list("rsp", [0, 0, 0])
    ist = f.list("ist", [0] * 7)
    if len(rsp) != 3:
        raise SnapshotError(f.path("rsp"), f"expected 3 entries (RSP0-2), got {len(rsp)}")
    if len(ist) != 7:
        raise SnapshotError(f.path("ist"), f"expected 7 entries (IST1-7), got {len(ist)}")
    spec = TssSpec(
        phys=f.int("phys", bits=MAX_PHYS_BITS),
        rsp=tuple(parse_int(v, f"{f.path('rsp')}[{i}]") for i, v in enumerate(rsp)),
        ist=tuple(parse_int(v, f"{f.path('ist')}[{i}]") for i, v in enumerate(ist)),
        iomap_base=f.int("iomap_base", 104, bits=16),
    )
    f.done()
    return spec


# -- writing -----------------------------------------------------------------------


def snapshot_to_json(snap: Snapshot) -> dict:
    """The JSON document for ``snap``; addresses as ``"0x…"`` strings."""
    cpu = snap.cpu
    doc_cpu: dict[str, Any] = {
        "regs": {k: hex_int(v) for k, v in cpu.regs.items()},
        **{name: hex_int(getattr(cpu, name)) for name in CONTROL_REGISTERS},
        "msrs": {k: hex_int(v) for k, v in cpu.msrs.items()},
        "segments": {k: _segment_json(v) for k, v in cpu.segments.items()},
        "gdtr": {"base": hex_int(cpu.gdtr.base), "limit": hex_int(cpu.gdtr.limit)},
        "idtr": {"base": hex_int(cpu.idtr.base), "limit": hex_int(cpu.idtr.limit)},
        "tr": _segment_json(cpu.tr),
        "ldtr": _segment_json(cpu.ldtr),
    }
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": snap.arch,
        "source": snap.source,
        "cpu": doc_cpu,
        "memory": [_range_json(r) for r in snap.memory],
    }
    if snap.build is not None:
        doc["build"] = _build_json(snap.build)
    if snap.pagemap:
        doc["pagemap"] = [{"va": hex_int(p.va), "entry": hex_int(p.entry)} for p in snap.pagemap]
    if snap.symbols:
        doc["symbols"] = [_symbols_json(s) for s in snap.symbols]
    return doc


def _segment_json(seg: Segment) -> dict:
    out = {"selector": hex_int(seg.selector)}
    for name in ("base", "limit", "attributes"):
        value = getattr(seg, name)
        if value is not None:
            out[name] = hex_int(value)
    return out


def _range_json(r: MemoryRange) -> dict:
    out: dict[str, Any] = {"base": hex_int(r.base), "size": hex_int(r.size), "kind": r.kind.value}
    if r.kind is RangeKind.INLINE:
        data = r.data.rstrip(b"\0")
        out["encoding"] = r.encoding
        out["data"] = data.hex() if r.encoding == "hex" else base64.b64encode(data).decode()
    elif r.kind is RangeKind.FILE:
        out["path"] = r.path
        out["offset"] = hex_int(r.offset)
    return out


def _symbols_json(s: SymbolSource) -> dict:
    out: dict[str, Any] = {"kind": s.kind}
    if s.kind == "inline":
        out["entries"] = [{"name": n, "address": hex_int(a)} for n, a in s.entries]
    else:
        out["path"] = s.path
    if s.offset:
        out["offset"] = hex_int(s.offset)
    return out


def _build_json(b: BuildSpec) -> dict:
    out: dict[str, Any] = {}
    sizes = {v: k for k, v in PAGE_SIZES.items()}
    if b.page_tables is not None:
        pt = b.page_tables
        out["page_tables"] = {
            "levels": pt.levels,
            "tables": {"base": hex_int(pt.table_base), "size": hex_int(pt.table_size)},
            "mappings": [
                {
                    "va": hex_int(m.va),
                    "pa": hex_int(m.pa),
                    "size": hex_int(m.size),
                    "page_size": sizes[m.page_size],
                    "flags": [n for n, bit in _LEAF_FLAGS.items() if m.flags & bit]
                    + (["PAT"] if m.pat else []),
                    "pkey": m.pkey,
                }
                for m in pt.mappings
            ],
        }
    if b.gdt is not None:
        out["gdt"] = {
            "phys": hex_int(b.gdt.phys),
            "entries": [_gdt_entry_json(e) for e in b.gdt.entries],
        }
    if b.idt is not None:
        out["idt"] = {
            "phys": hex_int(b.idt.phys),
            "gates": [
                {
                    "vector": g.vector,
                    "handler": hex_int(g.handler),
                    "selector": hex_int(g.selector),
                    "type": g.gate_type,
                    "dpl": g.dpl,
                    "ist": g.ist,
                    "present": g.present,
                }
                for g in b.idt.gates
            ],
        }
    if b.tss is not None:
        out["tss"] = {
            "phys": hex_int(b.tss.phys),
            "rsp": [hex_int(v) for v in b.tss.rsp],
            "ist": [hex_int(v) for v in b.tss.ist],
            "iomap_base": b.tss.iomap_base,
        }
    return out


def _gdt_entry_json(e: GdtEntrySpec) -> dict:
    out: dict[str, Any] = {"index": e.index, "kind": e.kind}
    if e.kind == "raw":
        out["bytes"] = e.raw.hex()
    elif e.kind != "null":
        out.update(dpl=e.dpl, base=hex_int(e.base), limit=hex_int(e.limit))
    return out


def check_output_path(path: str | os.PathLike[str]) -> None:
    """Refuse to replace anything but a regular file (a device, FIFO, folder or link).

    :raises SnapshotError: naming the path.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise SnapshotError(str(path), "exists and is not a regular file: refusing to replace it")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_snapshot(
    snap: Snapshot, path: str | os.PathLike[str], mem: PhysicalMemory | None = None
) -> Snapshot:
    """Write ``snap`` to ``path`` atomically and return the snapshot as saved.

    Without ``mem`` the memory ranges are written as they are, side-file paths
    rewritten relative to the new folder. With ``mem`` (the current contents,
    e.g. after emulation) every region of ``mem``, inline ones included, is
    written to one sparse side file ``<name>.phys`` next to the document and
    becomes a ``FILE`` range, and the ``build`` section is dropped because its
    result is now part of memory.
    """
    path = Path(path).absolute()
    try:
        if mem is None:
            memory = tuple(
                _relocate(r, snap, path.parent, f"memory[{i}].path")
                for i, r in enumerate(snap.memory)
            )
            saved = replace(snap, memory=memory, origin=path)
        else:
            side = path.with_name(path.name.removesuffix(".json") + ".phys")
            check_output_path(path)
            memory = _write_side_file(mem, side)
            source = dict(snap.source, build_applied=True) if snap.build else snap.source
            saved = replace(snap, memory=memory, build=None, source=source, origin=path)
        blob = json.dumps(snapshot_to_json(saved), indent=1).encode() + b"\n"
        write_atomic(path, blob)
    except OSError as e:
        raise SnapshotError(str(path), f"cannot write: {e.strerror or e}") from None
    return saved


def _relocate(r: MemoryRange, snap: Snapshot, folder: Path, where: str) -> MemoryRange:
    if r.kind is not RangeKind.FILE:
        return r
    target = snap.resolve(r.path, where)
    return replace(r, path=os.path.relpath(target, folder))


def _write_side_file(mem: PhysicalMemory, side: Path) -> tuple[MemoryRange, ...]:
    """Write every region of ``mem`` (inline, zero and file-backed alike) into ``side``.

    Regions go back to back in address order; all-zero 1 MiB chunks are left as
    holes, so the file is sparse. The file appears atomically (temporary file and
    rename). Returns one ``FILE`` range per region, pointing into ``side``.
    """
    check_output_path(side)
    ranges = []
    fd, tmp = tempfile.mkstemp(prefix=f".{side.name}.", dir=side.parent)
    chunk = 1 << 20
    try:
        with os.fdopen(fd, "wb") as f:
            offset = 0
            for region in mem.regions:
                view = region.view()
                for pos in range(0, region.size, chunk):
                    piece = view[pos : pos + chunk]
                    if np.frombuffer(piece, dtype=np.uint64).any():
                        f.seek(offset + pos)
                        f.write(piece)
                ranges.append(
                    MemoryRange(region.base, region.size, RangeKind.FILE, path=side.name,
                                offset=offset)
                )  # fmt: skip
                offset += region.size
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, side)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tuple(ranges)
