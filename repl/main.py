"""``kctx-debug [SNAPSHOT]``: the REPL's command-line entry, interactive or batch.

Commands given with ``-ex CMD`` and ``-x FILE`` run first, in the order given (a
file's lines one by one; ``#`` starts a comment). Then:

- with ``--batch``, the process exits (reading stdin first when no command was
  given and stdin is not a terminal);
- when stdin is not a terminal, its lines are run as commands, then it exits;
- otherwise the prompt opens.

In batch mode (and when reading stdin) the exit status is 1 when any command
failed, else 0; ``continue``, ``finish`` and ``until`` without ``--count`` stop
after a default budget of instructions (see :data:`.cmd_running.BATCH_BUDGET`),
so a script cannot hang. A Ctrl-C (SIGINT) there ends the script: the remaining
commands are not run and the exit status is 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ..errors import CommandError
from .commands import default_registry
from .dispatch import Dispatcher
from .output import Printer
from .runner import QuitRequest, execute
from .session import Session

__all__ = ["add_repl_arguments", "repl_main", "run_lines"]

PROG = "kctx-debug"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class _Ordered(argparse.Action):
    """Collects -ex and -x into one list of (kind, value), keeping their order."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def add_repl_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--batch``, ``-ex CMD``, ``-x FILE``, ``--echo`` and ``--no-history``."""
    parser.add_argument(
        "--batch",
        action="store_true",
        help="run the -ex/-x commands (or stdin's lines) without a prompt, then exit; "
        "exit status 1 if any command failed",
    )
    parser.add_argument(
        "-ex",
        dest="repl_commands",
        action=_Ordered,
        const="ex",
        metavar="CMD",
        help="run CMD (repeatable; in order with -x)",
    )
    parser.add_argument(
        "-x",
        dest="repl_commands",
        action=_Ordered,
        const="x",
        metavar="FILE",
        help="run the commands in FILE (repeatable)",
    )
    parser.add_argument(
        "--echo",
        action="store_true",
        help="print each command before its output, after the prompt (for transcripts)",
    )
    parser.add_argument(
        "--no-history",
        action="store_true",
        help="do not read or write the history file",
    )


def _script_lines(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CommandError(f"-x {path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"-x {path}: not a UTF-8 text file") from None
    return text.splitlines()


def _given_lines(items: Iterable[tuple[str, str]]) -> Iterator[str]:
    for kind, value in items:
        if kind == "ex":
            yield value
        else:
            yield from _script_lines(value)


def run_lines(
    dispatcher: Dispatcher, printer: Printer, lines: Iterable[str], *, echo: bool = False
) -> tuple[int, bool]:
    """Run lines in order; (how many failed, whether ``quit`` ended them).

    Empty lines are skipped here: repeating the last command is for the prompt.
    In batch mode a Ctrl-C ends them too (``session.interrupted`` tells which).
    """
    from .app import PROMPT

    failed = 0
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if echo:
            printer.show(PROMPT + line)
        try:
            if not execute(dispatcher, printer, line):
                failed += 1
        except QuitRequest:
            return failed, True
        if dispatcher.session.batch and dispatcher.session.interrupted:
            return failed, True
    return failed, False


def _open_session(args: argparse.Namespace, err: TextIO) -> Session:
    from ..cli import demo_snapshot_path

    path = getattr(args, "snapshot", None)
    if not path:
        path = demo_snapshot_path()
        print(f"(no snapshot given: opening the bundled demo {path})", file=err)
    return Session.open(
        path,
        allow_outside=getattr(args, "allow_outside_paths", False),
        cpu=getattr(args, "cpu", 0) or 0,
        symbols=getattr(args, "symbols", None),
    )


def repl_main(
    args: argparse.Namespace,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Open the snapshot and run the REPL as ``args`` say (see the module docstring).

    :raises KctxError: the snapshot cannot be opened, or a -x file cannot be read.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    session = _open_session(args, stderr)
    registry = default_registry()
    session.registry = registry
    dispatcher = Dispatcher(registry, session)
    printer = Printer(stdout, stderr)
    echo = getattr(args, "echo", False)
    interactive_stdin = _isatty(stdin)
    session.batch = bool(args.batch) or not interactive_stdin
    try:
        given = list(getattr(args, "repl_commands", None) or [])
        failed, quit_ = run_lines(dispatcher, printer, _given_lines(given), echo=echo)
        if quit_:
            return _batch_status(session, printer, failed)
        if args.batch and (given or interactive_stdin):
            return 1 if failed else 0
        if not interactive_stdin:
            more, _ = run_lines(dispatcher, printer, stdin, echo=echo)
            return _batch_status(session, printer, failed + more)
        from .app import history_path, run_interactive

        history = None if getattr(args, "no_history", False) else history_path()
        return run_interactive(dispatcher, printer, history_file=history)
    finally:
        session.close()


def _batch_status(session: Session, printer: Printer, failed: int) -> int:
    if session.batch and session.interrupted:
        printer.error("interrupted: the remaining commands were not run")
        return EXIT_INTERRUPTED
    return 1 if failed else 0


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
