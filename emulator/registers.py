"""Unicorn's identifiers for the registers kctx-debug names, and reading/writing them by name.

Names are :mod:`kctx_debug.arch.registers` names (``rax``, ``eax``, ``ah``, ``cr3``,
``lstar``, ``gdtr`` …). General, segment, control and debug registers have their own
Unicorn id; MSRs go through ``UC_X86_REG_MSR`` with an ``(index, value)`` tuple (there
is no ``UC_X86_REG_EFER``); GDTR/IDTR/TR/LDTR are ``(selector, base, limit, flags)``.

Integer encodings for the table registers, so every register reads as one ``int``:
``gdtr``/``idtr`` are ``limit | base << 16`` (the 10 bytes SGDT stores, SDM vol. 3A
2.4.1), ``tr``/``ldtr`` are their selectors. Segment registers read as selectors only:
Unicorn does not expose the hidden base/limit/attributes of CS..GS.

Segment attributes travel in two layouts: the snapshot's VMCS access-rights word
(SDM vol. 3C 25.4.1: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15) and
QEMU's cached ``flags``, which keeps the same bits where the descriptor's high dword
has them (SDM vol. 3A 3.4.5, Figure 3-8: type..P at 15:8, AVL..G at 23:20).

>>> hex(segment_flags(0xA09B))    # 64-bit ring-0 code, as KVM reports it
'0xa09b00'
>>> hex(segment_attributes(0xA09B00))
'0xa09b'
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from unicorn import Uc
from unicorn import x86_const as x86

from ..arch.bits import BitField
from ..arch.registers import REGISTERS, Register, RegisterGroup, lookup_register
from ..errors import CommandError
from ..qemu_dump import ACCESS_RIGHTS_MOVES, access_rights

__all__ = [
    "MSR_REGISTER",
    "TABLE_REGISTERS",
    "UC_REGISTER_IDS",
    "pack_table_register",
    "read_register",
    "segment_attributes",
    "segment_flags",
    "write_register",
]

UC_REGISTER_IDS: Mapping[str, int] = MappingProxyType(
    {
        **{
            name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in RegisterGroup.GENERAL.names
        },
        **{
            name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in RegisterGroup.SEGMENT.names
        },
        **{
            name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in RegisterGroup.CONTROL.names
        },
        **{f"dr{n}": getattr(x86, f"UC_X86_REG_DR{n}") for n in (0, 1, 2, 3, 6, 7)},
    }
)
TABLE_REGISTERS: Mapping[str, int] = MappingProxyType(
    {
        "gdtr": x86.UC_X86_REG_GDTR,
        "idtr": x86.UC_X86_REG_IDTR,
        "tr": x86.UC_X86_REG_TR,
        "ldtr": x86.UC_X86_REG_LDTR,
    }
)
MSR_REGISTER = x86.UC_X86_REG_MSR

# GDTR/IDTR as SGDT stores them: limit in bits 15:0, base in bits 79:16.
_TABLE_LIMIT = BitField("limit", 0, 16)
_TABLE_BASE_SHIFT = 16
_U64 = (1 << 64) - 1


def segment_flags(attributes: int) -> int:
    """QEMU/Unicorn segment flags (descriptor high dword) for a VMCS access-rights word."""
    flags = 0
    for in_flags, in_attributes in ACCESS_RIGHTS_MOVES:
        flags = in_flags.insert(flags, in_attributes.extract(attributes))
    return flags


def segment_attributes(flags: int) -> int:
    """The VMCS access-rights word for QEMU/Unicorn segment flags."""
    return access_rights(flags)


def pack_table_register(base: int, limit: int) -> int:
    """GDTR/IDTR as one integer: ``limit | base << 16``."""
    return _TABLE_LIMIT.insert(0, limit) | (base & _U64) << _TABLE_BASE_SHIFT


def _read_full(uc: Uc, reg: Register) -> int:
    name = reg.name
    if name in UC_REGISTER_IDS:
        return uc.reg_read(UC_REGISTER_IDS[name])
    if reg.msr is not None:
        return uc.reg_read(MSR_REGISTER, int(reg.msr))
    if name in TABLE_REGISTERS:
        selector, base, limit, _flags = uc.reg_read(TABLE_REGISTERS[name])
        if name in ("gdtr", "idtr"):
            return pack_table_register(base, limit)
        return selector
    raise CommandError(f"${name} is not available in the emulator")


def _write_full(uc: Uc, reg: Register, value: int) -> None:
    name = reg.name
    if name in UC_REGISTER_IDS:
        uc.reg_write(UC_REGISTER_IDS[name], value)
    elif reg.msr is not None:
        uc.reg_write(MSR_REGISTER, (int(reg.msr), value))
    elif name in ("gdtr", "idtr"):
        uc.reg_write(
            TABLE_REGISTERS[name],
            (0, value >> _TABLE_BASE_SHIFT & _U64, _TABLE_LIMIT.extract(value), 0),
        )
    else:
        raise CommandError(
            f"${name} cannot be written by value here"
            + (" (use Machine.set_table_register)" if name in TABLE_REGISTERS else "")
        )


def read_register(uc: Uc, name: str) -> int:
    """A register by name, partial registers included; MSRs Unicorn lacks read as 0.

    :raises CommandError: unknown name, or a register Unicorn has no access to
        (``pkru`` and ``xcr0`` are handled by :class:`~kctx_debug.emulator.machine.Machine`).
    """
    reg = lookup_register(name)
    parent = REGISTERS[reg.parent]
    return reg.extract(_read_full(uc, parent))


def write_register(uc: Uc, name: str, value: int) -> None:
    """Write a register by name; a partial register keeps the other bits of its parent.

    :raises CommandError: unknown name, a value that does not fit, or a register
        that cannot be written by value (TR/LDTR need a descriptor).
    """
    reg = lookup_register(name)
    parent = REGISTERS[reg.parent]
    if not reg.is_alias:
        if not 0 <= value < 1 << reg.width:
            raise CommandError(f"${reg.name}: {value:#x} does not fit in {reg.width} bits")
        _write_full(uc, parent, value)
        return
    _write_full(uc, parent, reg.insert(_read_full(uc, parent), value))
