"""Running one line: parse, evaluate the arguments, call the command, remember the repeat.

An empty line runs the last command again unless it opted out (``dont_repeat``), or
the line the command asked to repeat instead (``x`` continues after what it showed),
as GDB does. The :class:`Dispatcher` raises; printing is the caller's job
(:mod:`.app` and :mod:`.batch`).
"""

from __future__ import annotations

import re
from typing import Any

from ..arch.vectors import NUM_VECTORS, Vector
from ..errors import CommandError
from .registry import Arg, ArgKind, Args, CommandRegistry, Flag, Output, ParsedLine
from .session import Session

__all__ = ["Dispatcher", "parse_int", "parse_vector"]

# ``*(u64*)X`` reads memory; any other leading ``*`` marks a code address (GDB's ``break *ADDR``).
_CAST = re.compile(r"\*\s*\(\s*u(8|16|32|64)\s*\*")


def parse_int(text: str, what: str = "number") -> int:
    """An integer literal: ``16``, ``0x10``, ``0o20``, ``0b10000``.

    :raises CommandError: anything else.
    """
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise CommandError(f"expected a {what}, got {text!r}") from None


def parse_vector(text: str) -> int:
    """A vector number (``14``, ``0xe``) or exception mnemonic (``#PF``, ``pf``, ``NMI``).

    :raises CommandError: not a vector 0-255.
    """
    name = text.lstrip("#").upper()
    if name in Vector.__members__:
        return int(Vector[name])
    value = parse_int(text, "vector number or name (#PF)")
    if not 0 <= value < NUM_VECTORS:
        raise CommandError(f"vector {value} is outside 0-{NUM_VECTORS - 1}")
    return value


class Dispatcher:
    """Runs lines against one registry and session."""

    def __init__(self, registry: CommandRegistry, session: Session) -> None:
        self.registry = registry
        self.session = session
        self.repeat_line: str | None = None

    def run(self, line: str) -> Output:
        """Run ``line`` (an empty one repeats, see the module docstring).

        :raises KctxError: the command failed; the message is one line for the user.
        """
        text = line.strip()
        if not text or text.startswith("#"):
            if text or self.repeat_line is None:
                return None
            text = self.repeat_line
        parsed = self.registry.parse(text)
        args = self.evaluate(parsed)
        # A failed command is not repeated; one that succeeded decides what an empty line does.
        self.repeat_line = None
        result = parsed.command.run(self.session, args)
        cmd = parsed.command
        if not cmd.dont_repeat:
            self.repeat_line = cmd.repeat(self.session, args) if cmd.repeat else text
        return result

    def evaluate(self, parsed: ParsedLine) -> Args:
        """The parsed argument texts converted to values (expressions evaluated)."""
        values: dict[str, Any] = {}
        for arg in parsed.command.args:
            text = parsed.values.get(arg.name)
            values[arg.name] = None if text is None else self._convert(arg, text)
        for flag in parsed.command.flags:
            value = parsed.flags.get(flag.name, False if not flag.metavar else None)
            if flag.metavar and isinstance(value, str):
                value = self._convert(flag, value)
            values[flag.name] = value
        return Args(values, parsed.values, parsed.suffix)

    def _convert(self, spec: Arg | Flag, text: str) -> Any:
        kind = spec.kind
        if kind is ArgKind.INT:
            return parse_int(text, spec.name)
        if kind is ArgKind.VECTOR:
            return parse_vector(text)
        if kind is ArgKind.EXPR:
            return self.session.evaluate(text)
        if kind is ArgKind.LOCATION:
            stripped = text.strip()
            if stripped.startswith("*") and not _CAST.match(stripped):
                stripped = stripped[1:]
            return self.session.evaluate(stripped)
        return text
