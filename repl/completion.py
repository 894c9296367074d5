"""Tab completion from the command registry: command words, then registers, symbols, flags.

Like prompt-toolkit's ``NestedCompleter``, the first words complete command names
(``info`` then ``registers``, ``idt`` …); after a complete command the word under the
cursor completes as a ``--flag``, a ``$register``, one of the argument's choices
(register groups, settings, command names for ``help``), or a symbol
(:meth:`~kctx_debug.symbols.SymbolTable.names_with_prefix`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from ..arch.registers import ALL_REGISTERS
from ..errors import KctxError
from .evaluation import REGISTER_ALIASES
from .registry import Command, CommandRegistry
from .render import REGISTER_GROUPS
from .session import Session

__all__ = ["MAX_SYMBOL_COMPLETIONS", "ReplCompleter"]

MAX_SYMBOL_COMPLETIONS = 200
# The word being completed: a $register, a --flag, or a symbol-ish name.
_WORD = re.compile(r"(\$[\w]*|--[\w-]*|[\w.@]+)$")
_REGISTERS = tuple(sorted({*ALL_REGISTERS, *REGISTER_ALIASES}))
_POLICIES = ("stop", "deliver")


class ReplCompleter(Completer):
    """Completions for one registry and session (symbols come from the session)."""

    def __init__(self, registry: CommandRegistry, session: Session) -> None:
        self.registry = registry
        self.session = session

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        words = text.split()
        ends_with_space = not text or text[-1].isspace()
        done = words if ends_with_space else words[:-1]
        current = "" if ends_with_space else words[-1]
        head = [w.partition("/")[0] for w in done[:1]] + done[1:]
        cmd, used = self._command(head)
        if cmd is None:
            # Still naming the command: complete the next word of a command name.
            options = self.registry.subcommands(tuple(head))
            yield from _complete(options, current)
            return
        if cmd.name == "help":
            # help takes a command name: complete it word by word, as at the start.
            yield from _complete(self.registry.subcommands(tuple(done[used:])), current)
            return
        m = _WORD.search(current)
        word = m.group(1) if m else ""
        yield from _complete(self._candidates(cmd, word, len(done) - used), word)

    def _command(self, words: list[str]) -> tuple[Command | None, int]:
        for n in range(min(len(words), 3), 0, -1):
            try:
                cmd = self.registry.get(" ".join(words[:n]))
            except KctxError:
                continue
            return cmd, n
        return None, 0

    def _candidates(self, cmd: Command, word: str, position: int) -> Iterable[str]:
        if word.startswith("--"):
            return [f.option for f in cmd.flags]
        if word.startswith("$"):
            return [f"${name}" for name in _REGISTERS]
        if cmd.name == "info registers":
            return [*REGISTER_GROUPS, *_REGISTERS]
        if cmd.name == "set" and position == 0:
            return [name.replace("_", "-") for name in self.session.settings.names()]
        if cmd.name == "trap policy" and position == 1:
            return _POLICIES
        arg = cmd.args[min(position, len(cmd.args) - 1)] if cmd.args else None
        if arg is not None and arg.choices:
            return arg.choices
        if not word:
            return []
        return self.session.symbols.names_with_prefix(word, MAX_SYMBOL_COMPLETIONS)


def _complete(options: Iterable[str], word: str) -> Iterator[Completion]:
    for option in options:
        if option.startswith(word) and option != word:
            yield Completion(option, start_position=-len(word))
