"""Typed field access into untrusted JSON, with errors that name the JSON path.

Every getter takes the object, the key and the path of the object, and raises
``SnapshotError("cpu.cr3", "expected an integer …")`` on anything unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import SnapshotError

__all__ = [
    "MAX_FREE_FORM_DEPTH",
    "Fields",
    "check_free_form",
    "hex_int",
    "object_pairs",
    "parse_int",
]

MAX_FREE_FORM_DEPTH = 64

_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,32}\Z")
_MISSING = object()


def parse_int(value: Any, where: str, bits: int = 64) -> int:
    """An unsigned integer given as a JSON number or a ``"0x…"`` string, below ``2**bits``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SnapshotError(where, f"expected an integer or a '0x…' string, got {_kind(value)}")
    if isinstance(value, str):
        if not _HEX.match(value):
            raise SnapshotError(where, f"expected a '0x…' hex string, got {value[:40]!r}")
        value = int(value, 16)
    if value < 0 or value >> bits:
        raise SnapshotError(where, f"{value:#x} does not fit in {bits} unsigned bits")
    return value


def hex_int(value: int) -> str:
    return f"{value:#x}"


class _Repeated(dict):
    """A JSON object that repeated a key; whoever reads it reports the key with its path."""

    repeated = ""


def object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` hook: keep the first repeated key so the error can name its JSON path."""
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    marked = _Repeated(out)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.repeated = key
            break
        seen.add(key)
    return marked


def check_free_form(value: Any, where: str) -> None:
    """Check free-form JSON (``source``): no repeated keys, at most MAX_FREE_FORM_DEPTH deep.

    Iterative, so a deep document cannot exhaust the Python stack here or when saved.
    """
    todo = [(value, where, 0)]
    while todo:
        item, path, depth = todo.pop()
        if depth > MAX_FREE_FORM_DEPTH:
            raise SnapshotError(path, f"nested deeper than {MAX_FREE_FORM_DEPTH} levels")
        if isinstance(item, _Repeated):
            raise SnapshotError(f"{path}.{item.repeated}", "duplicate key")
        if isinstance(item, dict):
            todo.extend((v, f"{path}.{k}", depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        float: "a fractional number",
        int: "a number",
    }.get(type(value), type(value).__name__)


class Fields:
    """A JSON object being read, which knows its own path and reports unknown keys."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, Mapping):
            raise SnapshotError(where, f"expected an object, got {_kind(obj)}")
        self.obj = obj
        self.where = where
        self._seen: set[str] = set()
        if isinstance(obj, _Repeated):
            raise SnapshotError(self.path(obj.repeated), "duplicate key")

    def path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.where}[{key}]"
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.obj

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        return self._value(key, default)[1]

    def _value(self, key: str, default: Any) -> tuple[bool, Any]:
        """(True, value) for a key that is present, (False, default) for an absent one.

        An explicit ``null`` counts as present, so it is checked like any other value.
        """
        self._seen.add(key)
        if key in self.obj:
            return True, self.obj[key]
        if default is _MISSING:
            raise SnapshotError(self.path(key), "required field is missing")
        return False, default

    def int(self, key: str, default: Any = _MISSING, bits: int = 64) -> int:
        given, value = self._value(key, default)
        return parse_int(value, self.path(key), bits) if given else value

    def str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> str:
        given, value = self._value(key, default)
        if not given:
            return value
        if not isinstance(value, str):
            raise SnapshotError(self.path(key), f"expected a string, got {_kind(value)}")
        if choices and value not in choices:
            raise SnapshotError(
                self.path(key), f"expected one of {', '.join(choices)}, got {value[:40]!r}"
            )
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        given, value = self._value(key, default)
        if given and not isinstance(value, bool):
            raise SnapshotError(self.path(key), f"expected true or false, got {_kind(value)}")
        return value

    def obj_field(self, key: str, default: Any = _MISSING) -> Fields | None:
        given, value = self._value(key, default)
        return Fields(value, self.path(key)) if given else value

    def list(self, key: str, default: Any = _MISSING, max_items: int = 1 << 20) -> list:
        given, value = self._value(key, default)
        if not given:
            return value
        if not isinstance(value, list):
            raise SnapshotError(self.path(key), f"expected an array, got {_kind(value)}")
        if len(value) > max_items:
            raise SnapshotError(self.path(key), f"{len(value)} items, more than {max_items}")
        return value

    def done(self) -> None:
        """Reject keys nobody read: a typo must not be silently ignored."""
        unknown = sorted(set(self.obj) - self._seen)
        if unknown:
            raise SnapshotError(self.path(unknown[0]), "unknown field")
