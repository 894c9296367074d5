"""help and quit; the help text comes from the registry (the same text docs/commands.md holds)."""

from __future__ import annotations

from ..errors import CommandError
from .registry import Arg, ArgKind, Args, Command, CommandRegistry, Output, command
from .session import Session
from .styled import Styled

__all__ = ["CATEGORIES", "COMMANDS", "QuitRequest", "describe_command"]

# Category -> heading, in the order help and the reference list them.
CATEGORIES = {
    "state": "Registers and values",
    "memory": "Memory",
    "paging": "Page tables",
    "tables": "Descriptor tables",
    "breakpoints": "Breakpoints and watchpoints",
    "running": "Running",
    "traps": "Traps, recording and snapshots",
    "stack": "Stack",
    "general": "General",
}


class QuitRequest(Exception):
    """Raised by ``quit``; the loop that runs commands ends the session."""


def describe_command(cmd: Command) -> str:
    """Full help: usage, summary, description, arguments, aliases, needs, examples."""
    lines = [f"usage: {cmd.usage()}", "", cmd.summary]
    if cmd.description:
        lines += ["", cmd.description]
    if cmd.args or cmd.flags:
        lines.append("")
        for arg in cmd.args:
            lines.append(f"  {arg.metavar:<14} {arg.help}{' (optional)' if arg.optional else ''}")
        for flag in cmd.flags:
            option = flag.option + (f" {flag.metavar}" if flag.metavar else "")
            lines.append(f"  {option:<14} {flag.help}")
    if cmd.aliases:
        lines += ["", "aliases: " + ", ".join(cmd.aliases)]
    if cmd.preconditions:
        lines += ["", "needs: " + "; ".join(cmd.preconditions)]
    lines += ["", "examples:", *(f"  {example}" for example in cmd.examples)]
    return "\n".join(lines)


def overview(registry: CommandRegistry) -> Styled:
    """Every command by category, one line each."""
    out = Styled()
    for category, heading in CATEGORIES.items():
        cmds = [c for c in registry if c.category == category]
        if not cmds:
            continue
        if out:
            out.newline().newline()
        out.add(heading, "heading")
        for cmd in cmds:
            out.newline().add(f"  {cmd.name:<20}", "reg").add(cmd.summary)
    return out.newline().newline().add("Type 'help COMMAND' for its arguments and examples.")


@command(
    "help",
    aliases=("h",),
    args=(Arg("name", ArgKind.TEXT, "a command", optional=True),),
    examples=("help", "help x", "help pt walk"),
    dont_repeat=True,
)
def help_command(session: Session, args: Args) -> Output:
    """List the commands, or show one command's usage, arguments and examples."""
    registry = session.registry
    if registry is None:
        raise CommandError("help is not available here")
    if not args.name:
        return overview(registry)
    return Styled(describe_command(registry.get(args.name.strip())))


@command("quit", aliases=("q", "exit"), examples=("quit",), dont_repeat=True)
def quit_command(session: Session, args: Args) -> Output:
    """Leave the debugger (Ctrl-D does the same); a recording in progress is finished."""
    raise QuitRequest


COMMANDS = (help_command, quit_command)
