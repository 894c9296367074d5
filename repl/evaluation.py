"""Expressions in commands: the trap engine's parser (traps/expr.py) over the session's state.

Registers come from the current target (the machine once built, else the snapshot),
with GDB's ``$pc``, ``$sp`` and ``$fp`` as aliases; symbols from the session's table;
``*(u64*)ADDR`` reads virtual memory through the current page tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CommandError
from ..traps.expr import evaluate as evaluate_tree
from ..traps.expr import parse_expression

if TYPE_CHECKING:
    from .session import Session

__all__ = ["REGISTER_ALIASES", "SessionEnv", "evaluate"]

# GDB's architecture-independent register names.
REGISTER_ALIASES = {"pc": "rip", "sp": "rsp", "fp": "rbp"}


class SessionEnv:
    """An :class:`~kctx_debug.traps.expr.ExprEnv` reading one session's target."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._target = session.target

    def register(self, name: str) -> int:
        return self._target.reg(REGISTER_ALIASES.get(name, name))

    def symbol(self, name: str) -> int:
        return self._session.symbols.address(name)

    def read(self, address: int, size: int) -> bytes:
        return self._target.read_virtual(address, size)


def evaluate(session: Session, text: str) -> int:
    """The value of ``text`` in ``session`` (unsigned 64-bit).

    :raises CommandError: see :func:`kctx_debug.traps.expr.evaluate`.
    """
    if not text or not text.strip():
        raise CommandError("an expression is needed")
    return evaluate_tree(parse_expression(text), SessionEnv(session))
