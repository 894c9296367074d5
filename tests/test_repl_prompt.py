"""The interactive prompt, headless: prompt-toolkit pipe input and DummyOutput.

Keys are typed into a real PromptSession (completion with Tab, Enter, Ctrl-C,
Ctrl-D, validation); completions are also asked for directly; SIGINT during a
``continue`` on an endless loop is sent to this process.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.repl.app import build_prompt, history_path, run_interactive, toolbar
from kctx_debug.repl.commands import default_registry
from kctx_debug.repl.completion import ReplCompleter
from kctx_debug.repl.dispatch import Dispatcher
from kctx_debug.repl.output import Printer
from kctx_debug.repl.runner import execute
from kctx_debug.repl.session import Session

# Keys as a terminal sends them.
ENTER, TAB, CTRL_C, CTRL_D = "\r", "\t", "\x03", "\x04"


@pytest.fixture
def dispatcher():
    session = Session.open(demo_snapshot_path())
    session.registry = default_registry()
    yield Dispatcher(session.registry, session)
    session.close()


def _type(dispatcher: Dispatcher, keys: str, later: str = "") -> tuple[int, str, str]:
    """Run the prompt loop on ``keys`` (and ``later`` 0.3 s later, once completions
    triggered by the keys have been computed); (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, color=False)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        timer = threading.Timer(0.3, pipe.send_text, (later,)) if later else None
        if timer is not None:
            timer.start()
        prompt = build_prompt(dispatcher, input=pipe, output=DummyOutput())
        code = run_interactive(dispatcher, printer, prompt_session=prompt)
        if timer is not None:
            timer.join()
    return code, out.getvalue(), err.getvalue()


def _completions(dispatcher: Dispatcher, text: str) -> list[str]:
    completer = ReplCompleter(dispatcher.registry, dispatcher.session)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]


def test_completion_of_commands_registers_symbols_and_flags(dispatcher):
    assert _completions(dispatcher, "inf") == ["info"]
    assert _completions(dispatcher, "info ") == ["breakpoints", "cpu", "gdt", "idt", "reg",
                                                 "registers", "symbol", "traps", "tss",
                                                 "watchpoints"]  # fmt: skip
    assert _completions(dispatcher, "pt w") == ["walk"]
    assert _completions(dispatcher, "x/8gx $rs") == ["$rsi", "$rsp"]
    assert _completions(dispatcher, "break bp_") == ["bp_count", "bp_handler"]
    assert _completions(dispatcher, "p 4 + user") == ["user_start"]
    assert _completions(dispatcher, "pt walk $rip --") == ["--access", "--json"]
    assert _completions(dispatcher, "trap policy 3 s") == ["stop"]
    assert _completions(dispatcher, "info registers con") == ["control"]
    assert _completions(dispatcher, "help pt ") == ["check", "dump", "find", "walk"]
    assert _completions(dispatcher, "help pri") == ["print"]


def test_tab_completes_and_enter_runs(dispatcher):
    # Completion runs asynchronously: Enter comes once it has been inserted.
    code, out, err = _type(dispatcher, "info registers ri" + TAB, later=ENTER + CTRL_D)
    assert (code, err) == (0, "")
    assert out == "rip            0x0000000000400000 <user_start>\n"


def test_empty_line_repeats_stepi_and_x(dispatcher):
    dispatcher.session.settings.context = False
    keys = "si" + ENTER + ENTER + "x/2xb user_start" + ENTER + ENTER + CTRL_D
    _code, out, _err = _type(dispatcher, keys)
    assert dispatcher.session.evaluate("$rip") == 0x40000E  # two steps
    lines = out.splitlines()
    assert "0x400000 <user_start>:\t0x48\t0xc7" in lines
    assert "0x400002 <user_start+0x2>:\t0xc0\t0x01" in lines  # x continued


def test_ctrl_c_clears_the_line_and_ctrl_d_quits(dispatcher):
    code, out, err = _type(dispatcher, "p 99" + CTRL_C + "p 2" + ENTER + CTRL_D)
    assert (code, out, err) == (0, "0x2  2\n", "")


def test_unknown_commands_are_rejected_before_they_run(dispatcher):
    # The validator keeps "bogus" in the buffer; Ctrl-C drops it, so it never runs.
    code, out, err = _type(dispatcher, "bogus" + ENTER + CTRL_C + "p 1" + ENTER + CTRL_D)
    assert (code, out, err) == (0, "0x1  1\n", "")


def test_errors_print_one_line_and_the_session_goes_on(dispatcher):
    code, out, err = _type(dispatcher, "p 1/0" + ENTER + "p 3" + ENTER + "quit" + ENTER)
    assert (code, out, err) == (0, "0x3  3\n", "error: division by zero in '/'\n")


def test_toolbar_shows_rip_cpl_paging_and_the_last_trap(dispatcher):
    text = "".join(t for _s, t in toolbar(dispatcher.session))
    assert (
        text == " rip 0x400000 <user_start> | CPL3 | 4-level paging | snapshot (nothing run yet) "
    )
    dispatcher.session.settings.context = False
    dispatcher.run("trap policy 3 stop")
    dispatcher.run("continue")
    text = "".join(t for _s, t in toolbar(dispatcher.session))
    assert text.endswith("| machine | last: #BP (vector 3) at 0x40000e, CPL3 ")


def test_history_lives_in_the_xdg_state_folder(tmp_path):
    assert history_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "kctx-debug" / "history"
    assert str(history_path({})) == os.path.expanduser("~/.local/state/kctx-debug/history")
    # A relative XDG_STATE_HOME is invalid (XDG spec): the default is used.
    assert history_path({"XDG_STATE_HOME": "rel"}).parts[-3:] == ("state", "kctx-debug", "history")


def test_sigint_during_continue_stops_the_machine(dispatcher):
    session = dispatcher.session
    session.settings.context = False
    dispatcher.run("set {u16} $rip = 0xfeeb")  # jmp $: an endless loop
    out, err = io.StringIO(), io.StringIO()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        ok = execute(dispatcher, Printer(out, err, color=False), "continue")
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    assert ok and err.getvalue() == ""
    assert out.getvalue().startswith("stopped: user-stop at 0x400000 <user_start>")
    assert 0.3 <= elapsed < 1.3
    # The machine is intact: it still reads and runs.
    assert session.evaluate("$rip") == 0x400000
    dispatcher.run("stepi")
    assert session.evaluate("$rip") == 0x400000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
