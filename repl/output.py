"""The one place colours exist: printing styled text to a terminal, or plain text elsewhere.

Colour is on only when the stream is a terminal, ``NO_COLOR`` is unset or empty
(https://no-color.org) and ``TERM`` is not ``dumb``. Errors are one line, red on a
terminal, prefixed ``error:`` everywhere.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from prompt_toolkit import print_formatted_text
from prompt_toolkit.data_structures import Size
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.output import ColorDepth
from prompt_toolkit.output.vt100 import Vt100_Output
from prompt_toolkit.styles import Style

from .registry import Output
from .styled import Styled

__all__ = ["STYLE", "Printer", "want_color"]

# Role -> colour; roles are listed in .styled.ROLES.
STYLE = Style.from_dict(
    {
        "addr": "ansicyan",
        "sym": "ansiyellow",
        "reg": "ansigreen",
        "value": "",
        "changed": "ansired bold",
        "heading": "ansiblue bold",
        "dim": "ansibrightblack",
        "flag": "ansimagenta",
        "error": "ansired bold",
        "warning": "ansiyellow",
        "current": "ansigreen bold",
        "trap": "ansired bold",
        "bottom-toolbar": "noreverse bg:ansiblue fg:ansiwhite",
    }
)


def _size() -> Size:
    # Only used for cursor movement, which printing lines never does.
    return Size(rows=24, columns=80)


def want_color(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether to colour output written to ``stream`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Printer:
    """Writes command output and errors to one stream, coloured or not."""

    def __init__(
        self,
        stream: TextIO | None = None,
        errors: TextIO | None = None,
        color: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.errors = errors if errors is not None else sys.stderr
        self.color = want_color(self.stream) if color is None else color
        self.error_color = want_color(self.errors) if color is None else color

    def show(self, out: Output) -> None:
        """Print a command's output (nothing for None or empty text)."""
        self._write(self.stream, self.color, out)

    def _write(self, stream: TextIO, color: bool, out: Output) -> None:
        if out is None:
            return
        styled = out if isinstance(out, Styled) else Styled(out)
        if not styled:
            return
        if color:
            output = Vt100_Output(stream, _size, default_color_depth=ColorDepth.DEPTH_8_BIT)
            print_formatted_text(FormattedText(list(styled)), style=STYLE, output=output)
        else:
            stream.write(str(styled) + "\n")
        stream.flush()

    def error(self, message: str) -> None:
        """One line on the error stream: ``error: MESSAGE`` (a multi-line message's first)."""
        line = message.strip().splitlines()[0] if message.strip() else "unknown error"
        self.stream.flush()
        self._write(self.errors, self.error_color, Styled(f"error: {line}", "error"))

    def notice(self, message: str) -> None:
        """A warning line (machine notes) on the error stream."""
        self.stream.flush()
        self._write(self.errors, self.error_color, Styled(message, "warning"))
