"""The interactive prompt: prompt-toolkit session, history, completion, toolbar, validation.

Ctrl-C at the prompt clears the line; during a run it stops the machine (see
:mod:`.runner`); Ctrl-D on an empty line quits. The history file lives in the XDG
state folder (``$XDG_STATE_HOME/kctx-debug/history``, default
``~/.local/state/kctx-debug/history``).
"""

from __future__ import annotations

import os
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output as PtOutput
from prompt_toolkit.validation import ValidationError, Validator

from ..errors import KctxError
from .completion import ReplCompleter
from .dispatch import Dispatcher
from .output import STYLE, Printer
from .render import symbolize
from .runner import QuitRequest, execute
from .session import Session

__all__ = [
    "PROMPT",
    "CommandValidator",
    "build_prompt",
    "history_path",
    "run_interactive",
    "toolbar",
]

PROMPT = "(kctx) "


def history_path(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/kctx-debug/history``; ``~/.local/state`` when unset or relative."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "kctx-debug" / "history"


def _history(path: Path | None) -> tuple[History, str | None]:
    if path is None:
        return InMemoryHistory(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as e:
        return InMemoryHistory(), f"history not kept: cannot write {path}: {e.strerror}"
    return FileHistory(str(path)), None


def toolbar(session: Session) -> FormattedText:
    """``rip 0x400000 <user_start> | CPL3 | 4-level paging | snapshot | last: #BP …``."""
    try:
        target = session.target
        rip = target.reg("rip")
        parts = [
            f"rip {rip:#x}{symbolize(session.symbols, rip)}",
            f"CPL{target.cpl}",
            f"{len(target.mode.levels)}-level paging",
            "machine" if session.has_machine else "snapshot (nothing run yet)",
        ]
    except KctxError as e:
        parts = [f"state unreadable: {e}"]
    if session.last_stop is not None:
        parts.append(f"last: {session.last_stop.summary}")
    return FormattedText([("class:bottom-toolbar", " " + " | ".join(parts) + " ")])


class CommandValidator(Validator):
    """Rejects a line whose command is unknown before it is accepted (arguments are
    checked when it runs, where the error can name them)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def validate(self, document) -> None:  # type: ignore[no-untyped-def]
        text = document.text.strip()
        if not text or text.startswith("#"):
            return
        try:
            self.dispatcher.registry.parse(text)
        except KctxError as e:
            message = str(e)
            # Argument problems are reported when the command runs.
            if "unknown command" in message or "ambiguous" in message or "needs a sub" in message:
                raise ValidationError(message=message, cursor_position=len(document.text)) from None


def build_prompt(
    dispatcher: Dispatcher,
    *,
    history: History | None = None,
    input: Input | None = None,
    output: PtOutput | None = None,
) -> PromptSession:
    """The PromptSession the REPL reads lines with (tests pass pipe input and DummyOutput)."""
    session = dispatcher.session
    return PromptSession(
        history=history or InMemoryHistory(),
        completer=ReplCompleter(dispatcher.registry, session),
        complete_while_typing=False,
        bottom_toolbar=lambda: toolbar(session),
        validator=CommandValidator(dispatcher),
        validate_while_typing=False,
        style=STYLE,
        input=input,
        output=output,
    )


def run_interactive(
    dispatcher: Dispatcher,
    printer: Printer,
    *,
    history_file: Path | None = None,
    prompt_session: PromptSession | None = None,
) -> int:
    """Read and run lines until ``quit`` or Ctrl-D; 0 (errors do not end the session)."""
    if prompt_session is None:
        history, problem = _history(history_file)
        if problem:
            printer.notice(problem)
        prompt_session = build_prompt(dispatcher, history=history)
    while True:
        try:
            line = prompt_session.prompt(PROMPT)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        try:
            execute(dispatcher, printer, line)
        except QuitRequest:
            return 0
