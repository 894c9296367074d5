"""Shared, generic snapshot helpers: plain functions, importable as ``from conftest import …``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = [
    "DATA",
    "FULL_SIDE_FILES",
    "full_snapshot_doc",
    "minimal_snapshot_doc",
    "write_snapshot",
]

DATA = Path(__file__).parent / "data"
# Side files tests/data/full-snapshot.json names: full.bin holds bytes i % 251 (no zero pages).
FULL_SIDE_FILES: dict[str, bytes] = {
    "full.bin": bytes(i % 251 for i in range(0x3000)),
    "kallsyms.txt": b"ffffffff81000000 T entry_int3\nffffffff81000002 T entry_pf\n",
}


def minimal_snapshot_doc() -> dict[str, Any]:
    """The smallest valid document: required fields only, one 8 KiB zero range at 0."""
    return {
        "format": "kctx-snapshot",
        "version": 1,
        "cpu": {"regs": {}, "cr0": "0x80050033", "cr3": "0x1000", "cr4": "0x20"},
        "memory": [{"base": "0x0", "size": "0x2000", "kind": "zero"}],
    }


def full_snapshot_doc() -> dict[str, Any]:
    """A fresh copy of tests/data/full-snapshot.json: every section and integer spelling."""
    return copy.deepcopy(_FULL)


def write_snapshot(
    folder: Path,
    doc: dict[str, Any] | str | bytes,
    name: str = "snapshot.json",
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``doc`` (a dict as JSON, or raw text/bytes) and ``files`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, blob in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(blob)
    if isinstance(doc, dict):
        doc = json.dumps(doc, indent=1)
    if isinstance(doc, str):
        doc = doc.encode()
    path = folder / name
    path.write_bytes(doc)
    return path


_FULL = json.loads((DATA / "full-snapshot.json").read_text())
