"""The REPL's command set: every ``cmd_*`` module's ``COMMANDS``, gathered explicitly."""

from __future__ import annotations

from . import (
    cmd_breakpoints,
    cmd_help,
    cmd_memory,
    cmd_paging,
    cmd_running,
    cmd_stack,
    cmd_state,
    cmd_tables,
    cmd_traps,
)
from .registry import CommandRegistry

__all__ = ["default_registry"]

_MODULES = (
    cmd_state,
    cmd_memory,
    cmd_paging,
    cmd_tables,
    cmd_breakpoints,
    cmd_running,
    cmd_traps,
    cmd_stack,
    cmd_help,
)


def default_registry() -> CommandRegistry:
    """A new registry holding every command of the REPL."""
    return CommandRegistry(cmd for module in _MODULES for cmd in module.COMMANDS)
