"""Text with semantic styles: what renderers return, and what only the output layer colours.

A :class:`Styled` is a list of ``(style, text)`` fragments, the shape prompt-toolkit's
``FormattedText`` uses, where a style is a *role* (``addr``, ``sym``, ``changed``) rather
than a colour. Renderers build them; :mod:`.output` maps roles to colours on a terminal
and drops them everywhere else, so the plain text is always ``str(styled)``.

>>> text = Styled().add("rip ", "reg").add("0x401000", "addr").add(" <f>", "sym")
>>> str(text)
'rip 0x401000 <f>'
>>> text.fragments[1]
('class:addr', '0x401000')
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["ROLES", "Styled", "join_lines"]

# Every role a renderer may use; the output layer gives each a colour.
ROLES = (
    "addr",  # an address
    "sym",  # <symbol+off>
    "reg",  # a register name
    "value",  # a plain value
    "changed",  # a value that changed since the last stop
    "heading",  # a section title
    "dim",  # secondary detail
    "flag",  # decoded flag names
    "error",
    "warning",
    "current",  # the instruction at RIP
    "trap",  # why the machine stopped
)


class Styled:
    """Fragments of ``(class:role, text)``; ``str()`` is the plain text."""

    __slots__ = ("fragments",)

    def __init__(self, text: str = "", role: str = "") -> None:
        self.fragments: list[tuple[str, str]] = []
        if text:
            self.add(text, role)

    def add(self, text: str, role: str = "") -> Styled:
        """Append ``text`` with ``role`` (one of :data:`ROLES`, or ``""`` for none)."""
        if text:
            self.fragments.append((f"class:{role}" if role else "", text))
        return self

    def extend(self, other: Styled | str) -> Styled:
        """Append another styled text (or plain string)."""
        if isinstance(other, Styled):
            self.fragments.extend(other.fragments)
        else:
            self.add(other)
        return self

    def newline(self) -> Styled:
        return self.add("\n")

    def __str__(self) -> str:
        return "".join(text for _style, text in self.fragments)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fragments)

    def __bool__(self) -> bool:
        return bool(self.fragments)

    def __repr__(self) -> str:
        return f"Styled({str(self)!r})"


def join_lines(parts: Iterable[Styled | str]) -> Styled:
    """The parts one per line (no trailing newline)."""
    out = Styled()
    for i, part in enumerate(parts):
        if i:
            out.newline()
        out.extend(part)
    return out
