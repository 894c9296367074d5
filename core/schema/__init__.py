"""The JSON Schema (draft 2020-12) of the snapshot format, shipped as package data.

The loader (:mod:`kctx_debug.snapshot_io`) is the authority; the schema describes
the same rules for editors and other tools, minus the few it cannot express
(listed in its ``description`` and in docs/snapshot-format.md).
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["SNAPSHOT_SCHEMA_FILE", "snapshot_schema"]

SNAPSHOT_SCHEMA_FILE = "snapshot-v1.schema.json"


def snapshot_schema() -> dict:
    """The snapshot v1 schema as a fresh ``dict`` (callers may modify it)."""
    text = resources.files(__name__).joinpath(SNAPSHOT_SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)
