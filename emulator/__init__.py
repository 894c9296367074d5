"""A Unicorn machine in kernel context, built from a snapshot (imports Unicorn)."""

from .call import CallError, call
from .control import PageFaultInfo, StopEvent, StopKind, describe_stop
from .disasm import Disassembly, Instruction, disassemble, format_instruction
from .elfload import LoadedImage, LoadedModule, load_executable, load_relocatable
from .engine import EmulatorError
from .machine import Machine, MachineReport
from .relocate import EntryChange, Relocations

__all__ = [
    "CallError",
    "Disassembly",
    "EmulatorError",
    "EntryChange",
    "Instruction",
    "LoadedImage",
    "LoadedModule",
    "Machine",
    "MachineReport",
    "PageFaultInfo",
    "Relocations",
    "StopEvent",
    "StopKind",
    "call",
    "describe_stop",
    "disassemble",
    "format_instruction",
    "load_executable",
    "load_relocatable",
]
