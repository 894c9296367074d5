"""Running one line for a user: output printed, every failure one line, Ctrl-C stops a run.

Both the interactive prompt and batch mode go through :func:`execute`. A
:class:`~kctx_debug.errors.KctxError` is the command's own message; any other
exception is a bug, printed as one ``internal error`` line (``set debug on`` adds
the traceback), and the session goes on either way.

While a command runs, SIGINT (Ctrl-C) asks the machine to stop if a run is in
progress (the prompt comes back with the machine intact); otherwise it interrupts
the command as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from collections.abc import Iterator

from ..errors import KctxError
from .cmd_help import QuitRequest
from .dispatch import Dispatcher
from .output import Printer

__all__ = ["QuitRequest", "execute", "sigint_stops_runs"]


@contextlib.contextmanager
def sigint_stops_runs(dispatcher: Dispatcher) -> Iterator[None]:
    """Route SIGINT to ``session.interrupt()`` while a run is in progress.

    Outside the main thread (signals cannot be handled there) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    session = dispatcher.session

    def on_sigint(signum: int, frame: object) -> None:
        session.interrupted = True
        if session.running:
            session.interrupt()
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def execute(dispatcher: Dispatcher, printer: Printer, line: str) -> bool:
    """Run one line and print what it says; False when it failed.

    :raises QuitRequest: the line was ``quit``.
    """
    session = dispatcher.session
    session.interrupted = False
    try:
        with sigint_stops_runs(dispatcher):
            output = dispatcher.run(line)
    except QuitRequest:
        raise
    except KctxError as e:
        _flush_notices(session, printer)
        printer.error(str(e))
        return False
    except KeyboardInterrupt:
        session.interrupted = True
        printer.error("interrupted")
        return False
    except Exception as e:  # noqa: BLE001 - the REPL's top level: a bug must not end the session
        _flush_notices(session, printer)
        printer.error(f"internal error: {type(e).__name__}: {e}")
        if session.settings.debug:
            printer.show(traceback.format_exc().rstrip())
        return False
    _flush_notices(session, printer)
    printer.show(output)
    return True


def _flush_notices(session: object, printer: Printer) -> None:
    notices = getattr(session, "notices", [])
    for notice in notices:
        printer.notice(notice)
    notices.clear()
