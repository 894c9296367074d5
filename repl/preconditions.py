"""Preconditions as decorators: each checks the session and raises CommandError, never logs.

Put them under :func:`~.registry.command`; each adds a line to the command's help
(``Needs: …``) through the function's ``preconditions`` attribute.

>>> @requires_paging
... def walk(session, args): ...
>>> walk.preconditions
('paging enabled (CR0.PG)',)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..arch.bits import CR0
from ..errors import CommandError

if TYPE_CHECKING:
    from .registry import Args, CommandFunction, Output
    from .session import Session

__all__ = [
    "requires_debugger",
    "requires_machine",
    "requires_paging",
    "requires_recording",
    "requires_symbols",
]


def _precondition(
    description: str, check: Callable[[Session], None]
) -> Callable[[CommandFunction], CommandFunction]:
    def decorate(fn: CommandFunction) -> CommandFunction:
        @functools.wraps(fn)
        def wrapper(session: Session, args: Args) -> Output:
            check(session)
            return fn(session, args)

        wrapper.preconditions = (  # type: ignore[attr-defined]
            *getattr(fn, "preconditions", ()),
            description,
        )
        return wrapper

    return decorate


def _machine(session: Session) -> None:
    session.machine  # noqa: B018 - builds it, or raises CommandError saying why not


def _debugger(session: Session) -> None:
    session.debugger  # noqa: B018 - builds it (and the machine)


def _paging(session: Session) -> None:
    if not session.target.cpu.cr0 & CR0.PG:
        raise CommandError("paging is off (CR0.PG = 0): there are no page tables to walk")


def _symbols(session: Session) -> None:
    if not len(session.symbols):
        raise CommandError("no symbols loaded (the snapshot names none)")


def _recording(session: Session) -> None:
    if session.recorder is None:
        raise CommandError("not recording (use 'record start FILE')")


requires_machine = _precondition("a machine (built from the snapshot on first use)", _machine)
requires_debugger = _precondition("the debugger (built with the machine on first use)", _debugger)
requires_paging = _precondition("paging enabled (CR0.PG)", _paging)
requires_symbols = _precondition("a symbol table", _symbols)
requires_recording = _precondition("a recording in progress", _recording)
