"""Commands declared as data: name, aliases, help with an example, arguments, repeat rule.

One command is one function, wrapped by :func:`command` into a :class:`Command`; the
function's docstring is its help (first line the summary, the rest the description), as
in GDB. Each ``cmd_*`` module lists its commands in a ``COMMANDS`` tuple and
:class:`CommandRegistry` is built from those tuples explicitly: nothing registers itself
at import time.

Parsing a line (:meth:`CommandRegistry.parse`) finds the command by its words, each
word exact or a unique prefix (``info reg`` is ``info registers``), or by an alias
(``i r``, ``si``, ``c``); ``x/8gx $rsp`` splits the ``/8gx`` suffix off the name. The
arguments are then matched against the declared :class:`Arg` s and :class:`Flag` s:

- ``--name`` flags may appear anywhere; a flag with a ``metavar`` takes the next token;
- positional arguments take one token each, except an ``EXPR``/``LOCATION``/``TEXT``
  argument declared last, which takes the rest of the line (``x/2gx $rsp + 8``).

>>> show = Arg("what", ArgKind.WORD, "a register", optional=True)
>>> reg = CommandRegistry([Command("info registers", "Show registers.", "", ("info registers",),
...                                 run=lambda s, a: None, args=(show,), aliases=("i r",))])
>>> line = reg.parse("info reg rip")
>>> line.command.name, line.values
('info registers', {'what': 'rip'})
>>> reg.parse("i r").values
{}
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..errors import CommandError
from .styled import Styled

if TYPE_CHECKING:
    from .session import Session

__all__ = [
    "Arg",
    "ArgKind",
    "Args",
    "Command",
    "CommandFunction",
    "CommandRegistry",
    "Flag",
    "Output",
    "ParsedLine",
    "command",
]

Output = Styled | str | None
"""What a command returns: text to print (styled or plain), or nothing."""


class ArgKind(Enum):
    """How an argument's text is read."""

    WORD = "word"  # one token, a string (``choices`` restrict it)
    INT = "int"  # one token, an integer literal (0x.., 0o.., 0b.., decimal)
    VECTOR = "vector"  # one token, a vector number or exception name (``#PF``, ``pf``)
    EXPR = "expr"  # an expression, evaluated by the session to an integer
    LOCATION = "location"  # an expression naming a code address; a leading ``*`` is dropped
    TEXT = "text"  # the rest of the line, unparsed (a breakpoint condition)


_GREEDY = (ArgKind.EXPR, ArgKind.LOCATION, ArgKind.TEXT)


@dataclass(frozen=True)
class Arg:
    """A positional argument: its name in usage text, how it is read, and its help."""

    name: str
    kind: ArgKind
    help: str
    optional: bool = False
    choices: tuple[str, ...] = ()

    @property
    def metavar(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        return self.name.upper()


@dataclass(frozen=True)
class Flag:
    """A ``--name`` option; with ``metavar`` it takes a value of ``kind``."""

    name: str
    help: str
    metavar: str = ""
    kind: ArgKind = ArgKind.WORD

    @property
    def option(self) -> str:
        return f"--{self.name}"


CommandFunction = Callable[["Session", "Args"], Output]


@dataclass(frozen=True)
class Command:
    """A REPL command: what it is called, what it takes, and the function that runs it.

    ``examples`` are full command lines (at least one: help and the reference show
    them). ``dont_repeat`` keeps an empty line from running it again (GDB's
    ``dont_repeat()``). ``repeat`` gives the line an empty line runs instead of the
    same one (``x`` continues after the last address). ``format_suffix`` allows
    ``/FMT`` after the name. ``preconditions`` lists, for help, what the precondition
    decorators on ``run`` check.
    """

    name: str
    summary: str
    description: str
    examples: tuple[str, ...]
    run: CommandFunction
    args: tuple[Arg, ...] = ()
    flags: tuple[Flag, ...] = ()
    aliases: tuple[str, ...] = ()
    dont_repeat: bool = False
    format_suffix: bool = False
    repeat: Callable[[Session, Args], str | None] | None = None
    category: str = "general"
    preconditions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError(f"command {self.name!r} has no example")
        greedy = [i for i, a in enumerate(self.args) if a.kind in _GREEDY]
        if any(i != len(self.args) - 1 and self.args[i].kind is ArgKind.TEXT for i in greedy):
            raise ValueError(f"command {self.name!r}: a TEXT argument must be the last")

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    def usage(self) -> str:
        """``x/FMT EXPR``, ``pt walk EXPR [--json]``: the synopsis line."""
        parts = [self.name + ("[/FMT]" if self.format_suffix else "")]
        for arg in self.args:
            parts.append(f"[{arg.metavar}]" if arg.optional else arg.metavar)
        for flag in self.flags:
            parts.append(f"[{flag.option}{' ' + flag.metavar if flag.metavar else ''}]")
        return " ".join(parts)

    def __call__(self, session: Session, args: Args) -> Output:
        return self.run(session, args)


def command(
    name: str,
    *,
    examples: Iterable[str],
    args: Iterable[Arg] = (),
    flags: Iterable[Flag] = (),
    aliases: Iterable[str] = (),
    dont_repeat: bool = False,
    format_suffix: bool = False,
    repeat: Callable[[Session, Args], str | None] | None = None,
    category: str = "general",
) -> Callable[[CommandFunction], Command]:
    """Declare a command; the decorated function's docstring is its help text."""

    def wrap(fn: CommandFunction) -> Command:
        doc = inspect.cleandoc(fn.__doc__ or "")
        summary, _, description = doc.partition("\n")
        if not summary:
            raise ValueError(f"command {name!r} has no docstring")
        return Command(
            name=name,
            summary=summary.strip(),
            description=description.strip(),
            examples=tuple(examples),
            run=fn,
            args=tuple(args),
            flags=tuple(flags),
            aliases=tuple(aliases),
            dont_repeat=dont_repeat,
            format_suffix=format_suffix,
            repeat=repeat,
            category=category,
            preconditions=tuple(getattr(fn, "preconditions", ())),
        )

    return wrap


@dataclass(frozen=True)
class ParsedLine:
    """A line matched to its command: the ``/FMT`` suffix, argument texts and flags."""

    command: Command
    suffix: str
    values: dict[str, str]  # argument name -> its text (absent when optional and missing)
    flags: dict[str, str | bool]
    line: str

    @property
    def positional(self) -> tuple[str, ...]:
        return tuple(self.values[a.name] for a in self.command.args if a.name in self.values)


class Args(Mapping[str, Any]):
    """A command's arguments, evaluated: ``args.addr``, ``args["json"]``, ``args.suffix``.

    Missing optional arguments read as None, switches as False.
    """

    def __init__(self, values: Mapping[str, Any], raw: Mapping[str, str], suffix: str = "") -> None:
        self._values = dict(values)
        self.raw = dict(raw)
        self.suffix = suffix

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return f"Args({self._values!r}, suffix={self.suffix!r})"


_TOKEN = re.compile(r"\S+")


class CommandRegistry:
    """The commands of one REPL, looked up by name, alias or unique prefix."""

    def __init__(self, commands: Iterable[Command]) -> None:
        self._commands: dict[str, Command] = {}
        self._entries: list[tuple[tuple[str, ...], Command]] = []
        for cmd in commands:
            if cmd.name in self._commands:
                raise ValueError(f"command {cmd.name!r} declared twice")
            self._commands[cmd.name] = cmd
            self._entries.append((cmd.words, cmd))
        self._aliases: dict[tuple[str, ...], Command] = {}
        for cmd in self._commands.values():
            for alias in cmd.aliases:
                key = tuple(alias.split())
                if key in self._aliases or " ".join(key) in self._commands:
                    raise ValueError(f"alias {alias!r} of {cmd.name!r} is taken")
                self._aliases[key] = cmd

    def __iter__(self) -> Iterator[Command]:
        return iter(sorted(self._commands.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def get(self, name: str) -> Command:
        """The command called ``name`` (full name, alias or unique prefix).

        :raises CommandError: unknown or ambiguous.
        """
        cmd, used = self._match(name.split())
        if cmd is None or used != len(name.split()):
            raise CommandError(f"unknown command {name!r} (try 'help')")
        return cmd

    def names(self) -> list[str]:
        """Every command name and alias."""
        return sorted([*self._commands, *(" ".join(a) for a in self._aliases)])

    def subcommands(self, prefix: tuple[str, ...]) -> list[str]:
        """The words that can follow ``prefix`` in some command name (for completion)."""
        n = len(prefix)
        return sorted(
            {ws[n] for ws, _ in self._entries if len(ws) > n and ws[:n] == prefix}
            | {a[n] for a in self._aliases if len(a) > n and a[:n] == prefix}
        )

    def _match(self, words: list[str]) -> tuple[Command | None, int]:
        """The command the leading ``words`` name, and how many words it used."""
        for n in range(min(len(words), 4), 0, -1):
            hit = self._aliases.get(tuple(words[:n]))
            if hit is not None:
                return hit, n
        found: tuple[Command | None, int] = (None, 0)
        entries = self._entries
        for i, word in enumerate(words[:4]):
            level = [(ws, c) for ws, c in entries if len(ws) > i]
            exact = [(ws, c) for ws, c in level if ws[i] == word]
            chosen = exact or [(ws, c) for ws, c in level if ws[i].startswith(word)]
            if not chosen:
                break
            spellings = sorted({ws[i] for ws, _ in chosen})
            if len(spellings) > 1:
                prefix = " ".join(words[:i])
                options = ", ".join(" ".join(filter(None, (prefix, s))) for s in spellings)
                raise CommandError(f"ambiguous command {' '.join(words[: i + 1])!r}: {options}")
            entries = chosen
            whole = [c for ws, c in entries if len(ws) == i + 1]
            if whole:
                found = (whole[0], i + 1)
        return found

    def parse(self, line: str) -> ParsedLine:
        """Match ``line`` to a command and split its arguments (not evaluated).

        :raises CommandError: unknown command, bad suffix, missing or extra arguments.
        """
        text = line.strip()
        words = text.split()
        if not words:
            raise CommandError("empty command")
        head, slash, suffix = words[0].partition("/")
        cmd, used = self._match([head, *words[1:]])
        if cmd is None:
            family = self.subcommands((head,))
            if family:
                raise CommandError(f"{head!r} needs a subcommand: {', '.join(family)}")
            raise CommandError(f"unknown command {head!r} (try 'help')")
        if slash and not cmd.format_suffix:
            raise CommandError(f"{cmd.name} takes no /FMT suffix")
        if slash and used > 1:
            raise CommandError(f"/FMT belongs after {cmd.name!r}")
        # The argument text starts after the words the command name used.
        spans = list(_TOKEN.finditer(text))
        rest = text[spans[used].start() :] if used < len(spans) else ""
        values, flags = _split_arguments(cmd, rest)
        return ParsedLine(cmd, slash + suffix if slash else "", values, flags, text)


def _split_arguments(cmd: Command, rest: str) -> tuple[dict[str, str], dict[str, str | bool]]:
    tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(rest)]
    flags: dict[str, str | bool] = {f.name: False for f in cmd.flags if not f.metavar}
    by_option = {f.option: f for f in cmd.flags}
    positional: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i][2]
        flag = by_option.get(tok)
        if flag is None and tok.startswith("--") and len(tok) > 2 and tok[2].isalpha():
            known = ", ".join(by_option) or "none"
            raise CommandError(f"{cmd.name}: unknown option {tok} (options: {known})")
        if flag is None:
            positional.append(tokens[i])
        elif flag.metavar:
            if i + 1 >= len(tokens):
                raise CommandError(f"{cmd.name}: {tok} needs a value ({flag.metavar})")
            flags[flag.name] = tokens[i + 1][2]
            i += 1
        else:
            flags[flag.name] = True
        i += 1
    values: dict[str, str] = {}
    pos = 0
    for n, arg in enumerate(cmd.args):
        if pos >= len(positional):
            if not arg.optional:
                raise CommandError(f"{cmd.name}: missing {arg.metavar} (usage: {cmd.usage()})")
            continue
        last = n == len(cmd.args) - 1
        if arg.kind in _GREEDY and last:
            values[arg.name] = rest[positional[pos][0] : positional[-1][1]]
            pos = len(positional)
        else:
            token = positional[pos][2]
            if arg.choices and token not in arg.choices:
                matches = [c for c in arg.choices if c.startswith(token)]
                if len(matches) != 1:
                    raise CommandError(
                        f"{cmd.name}: {token!r} is not one of {', '.join(arg.choices)}"
                    )
                token = matches[0]
            values[arg.name] = token
            pos += 1
    if pos < len(positional):
        extra = rest[positional[pos][0] :]
        raise CommandError(f"{cmd.name}: unexpected {extra!r} (usage: {cmd.usage()})")
    return values, flags
