"""x86-64 architecture facts: registers, flag bits, descriptors, exception vectors.

Pure data and decoders with no I/O, shared by the snapshot loader, the
page-table walker, the emulator and the REPL. Submodules:

- :mod:`~kctx_debug.arch.registers`: register names, groups, MSR numbers, ``eax``-style aliases
- :mod:`~kctx_debug.arch.bits`: CR0/CR4/EFER/RFLAGS flags, :func:`decode_flags`
- :mod:`~kctx_debug.arch.address`: canonical addresses
- :mod:`~kctx_debug.arch.descriptors`: selectors, GDT descriptors, IDT gates, the TSS
- :mod:`~kctx_debug.arch.vectors`: exception vectors (Table 6-1)
"""

from __future__ import annotations

from kctx_debug.arch.address import canonicalize, is_canonical, va_bits_for
from kctx_debug.arch.bits import (
    CR0,
    CR4,
    EFER,
    RFLAGS,
    RFLAGS_IOPL,
    BitField,
    decode_flags,
    describe_flags,
)
from kctx_debug.arch.descriptors import (
    CodeSegmentType,
    DataSegmentType,
    IdtGate,
    SegmentDescriptor,
    Selector,
    SystemDescriptor,
    SystemDescriptorType,
    Tss64,
    describe_idt_gate,
    describe_layout,
    describe_segment_descriptor,
    describe_selector,
    describe_system_descriptor,
    describe_tss,
)
from kctx_debug.arch.registers import (
    MSR,
    Register,
    RegisterGroup,
    lookup_register,
    msr_number,
)
from kctx_debug.arch.vectors import (
    EXCEPTIONS,
    ExceptionClass,
    ExceptionVector,
    Vector,
    exception_info,
    exception_name,
    pushes_error_code,
)

__all__ = [
    "CR0",
    "CR4",
    "EFER",
    "EXCEPTIONS",
    "MSR",
    "RFLAGS",
    "RFLAGS_IOPL",
    "BitField",
    "CodeSegmentType",
    "DataSegmentType",
    "ExceptionClass",
    "ExceptionVector",
    "IdtGate",
    "Register",
    "RegisterGroup",
    "SegmentDescriptor",
    "Selector",
    "SystemDescriptor",
    "SystemDescriptorType",
    "Tss64",
    "Vector",
    "canonicalize",
    "decode_flags",
    "describe_flags",
    "describe_idt_gate",
    "describe_layout",
    "describe_segment_descriptor",
    "describe_selector",
    "describe_system_descriptor",
    "describe_tss",
    "exception_info",
    "exception_name",
    "is_canonical",
    "lookup_register",
    "msr_number",
    "pushes_error_code",
    "va_bits_for",
]
