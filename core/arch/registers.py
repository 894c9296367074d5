"""x86-64 register names, groups, MSR numbers and sub-register aliases.

Names are lower case, as a snapshot's ``cpu`` object and the REPL's ``$name``
use them. :func:`lookup_register` resolves any name, including partial
registers, to the full register that holds it:

>>> reg = lookup_register("ah")
>>> reg.parent, reg.offset, reg.width
('rax', 8, 8)
>>> hex(reg.extract(0x1122334455667788))
'0x77'
>>> MSR.IA32_LSTAR == 0xC0000082, msr_number("kernel_gs_base") == 0xC0000102
(True, True)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from kctx_debug.arch.bits import BitField
from kctx_debug.errors import CommandError

__all__ = [
    "ALL_REGISTERS",
    "MSR",
    "MSR_REGISTERS",
    "REGISTERS",
    "SUBREGISTERS",
    "Register",
    "RegisterGroup",
    "lookup_register",
    "msr_number",
]


class RegisterGroup(enum.Enum):
    """Register groups; each value is the tuple of its register names, in display order."""

    GENERAL = (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags",
    )  # fmt: skip
    SEGMENT = ("cs", "ds", "es", "fs", "gs", "ss")
    # CR1, CR5-CR7 are reserved; CR8 is the task-priority register (SDM Vol. 3A 2.5).
    CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8")
    # Memory-management registers (SDM Vol. 3A 2.4).
    TABLE = ("gdtr", "idtr", "tr", "ldtr")
    MSR = (
        "efer", "star", "lstar", "cstar", "sfmask", "fs_base", "gs_base",
        "kernel_gs_base", "tsc_aux", "sysenter_cs", "sysenter_esp", "sysenter_eip",
        "apic_base", "pat", "tsc", "misc_enable", "debugctl", "spec_ctrl",
        "u_cet", "s_cet", "pl0_ssp", "pl1_ssp", "pl2_ssp", "pl3_ssp",
        "interrupt_ssp_table_addr", "tsc_deadline", "pkrs", "xss",
    )  # fmt: skip
    # Registers that are neither MSRs nor control registers and have their own
    # access instructions: PKRU (RDPKRU/WRPKRU, SDM Vol. 3A 4.6.2) and XCR0
    # (XGETBV/XSETBV, SDM Vol. 1 13.3).
    SPECIAL = ("pkru", "xcr0")

    @property
    def names(self) -> tuple[str, ...]:
        return self.value


class MSR(enum.IntEnum):
    """Architectural MSR numbers (SDM Vol. 4, Table 2-2 "IA-32 Architectural MSRs")."""

    IA32_TIME_STAMP_COUNTER = 0x10
    IA32_APIC_BASE = 0x1B
    IA32_SPEC_CTRL = 0x48
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MISC_ENABLE = 0x1A0
    IA32_DEBUGCTL = 0x1D9
    IA32_PAT = 0x277
    IA32_U_CET = 0x6A0
    IA32_S_CET = 0x6A2
    IA32_PL0_SSP = 0x6A4
    IA32_PL1_SSP = 0x6A5
    IA32_PL2_SSP = 0x6A6
    IA32_PL3_SSP = 0x6A7
    IA32_INTERRUPT_SSP_TABLE_ADDR = 0x6A8
    IA32_TSC_DEADLINE = 0x6E0
    IA32_PKRS = 0x6E1
    IA32_XSS = 0xDA0
    IA32_EFER = 0xC0000080
    IA32_STAR = 0xC0000081
    IA32_LSTAR = 0xC0000082
    IA32_CSTAR = 0xC0000083
    IA32_FMASK = 0xC0000084
    SFMASK = 0xC0000084  # AMD APM name of IA32_FMASK (alias)
    IA32_FS_BASE = 0xC0000100
    IA32_GS_BASE = 0xC0000101
    IA32_KERNEL_GS_BASE = 0xC0000102
    IA32_TSC_AUX = 0xC0000103


# Snapshot/REPL name -> MSR, one entry per RegisterGroup.MSR name.
MSR_REGISTERS: Mapping[str, MSR] = MappingProxyType(
    {
        "efer": MSR.IA32_EFER,
        "star": MSR.IA32_STAR,
        "lstar": MSR.IA32_LSTAR,
        "cstar": MSR.IA32_CSTAR,
        "sfmask": MSR.IA32_FMASK,
        "fs_base": MSR.IA32_FS_BASE,
        "gs_base": MSR.IA32_GS_BASE,
        "kernel_gs_base": MSR.IA32_KERNEL_GS_BASE,
        "tsc_aux": MSR.IA32_TSC_AUX,
        "sysenter_cs": MSR.IA32_SYSENTER_CS,
        "sysenter_esp": MSR.IA32_SYSENTER_ESP,
        "sysenter_eip": MSR.IA32_SYSENTER_EIP,
        "apic_base": MSR.IA32_APIC_BASE,
        "pat": MSR.IA32_PAT,
        "tsc": MSR.IA32_TIME_STAMP_COUNTER,
        "misc_enable": MSR.IA32_MISC_ENABLE,
        "debugctl": MSR.IA32_DEBUGCTL,
        "spec_ctrl": MSR.IA32_SPEC_CTRL,
        "u_cet": MSR.IA32_U_CET,
        "s_cet": MSR.IA32_S_CET,
        "pl0_ssp": MSR.IA32_PL0_SSP,
        "pl1_ssp": MSR.IA32_PL1_SSP,
        "pl2_ssp": MSR.IA32_PL2_SSP,
        "pl3_ssp": MSR.IA32_PL3_SSP,
        "interrupt_ssp_table_addr": MSR.IA32_INTERRUPT_SSP_TABLE_ADDR,
        "tsc_deadline": MSR.IA32_TSC_DEADLINE,
        "pkrs": MSR.IA32_PKRS,
        "xss": MSR.IA32_XSS,
    }
)


@dataclass(frozen=True)
class Register:
    """A register name and where its bits live: ``width`` bits at ``offset`` of ``parent``.

    For a full register ``parent == name`` and ``offset == 0``.
    """

    name: str
    group: RegisterGroup
    parent: str
    offset: int
    width: int
    msr: MSR | None = None

    @property
    def is_alias(self) -> bool:
        """A partial view (``eax``, ``ah``) of a larger register."""
        return self.parent != self.name

    @property
    def _field(self) -> BitField:
        return BitField(self.name, self.offset, self.width)

    def extract(self, parent_value: int) -> int:
        """This register's value, read out of the parent register's value."""
        return self._field.extract(parent_value)

    def insert(self, parent_value: int, value: int) -> int:
        """The parent's value with this register's bits replaced by ``value``.

        This is a debugger write: the other bits of the parent are kept. (A CPU
        write to a 32-bit register zero-extends into the whole 64-bit register.)

        :raises CommandError: ``value`` does not fit in ``width`` bits.
        """
        if not 0 <= value <= self._field.max_value:
            raise CommandError(f"${self.name}: {value:#x} does not fit in {self.width} bits")
        return self._field.insert(parent_value, value)


# Widths of full registers by group (SDM Vol. 1 3.4; Vol. 3A 2.4): selectors and
# LDTR/TR are 16-bit selectors; GDTR/IDTR are a 16-bit limit plus a 64-bit base.
_GROUP_WIDTH: Mapping[RegisterGroup, int] = MappingProxyType(
    {
        RegisterGroup.GENERAL: 64,
        RegisterGroup.SEGMENT: 16,
        RegisterGroup.CONTROL: 64,
        RegisterGroup.MSR: 64,
    }
)
_SPECIAL_WIDTH: Mapping[str, int] = MappingProxyType(
    {"gdtr": 80, "idtr": 80, "tr": 16, "ldtr": 16, "pkru": 32, "xcr0": 64}
)


def _full_registers() -> dict[str, Register]:
    table: dict[str, Register] = {}
    for group in RegisterGroup:
        for name in group.names:
            width = _SPECIAL_WIDTH.get(name) or _GROUP_WIDTH[group]
            table[name] = Register(name, group, name, 0, width, MSR_REGISTERS.get(name))
    return table


# Partial registers (SDM Vol. 1 3.7.2.1, Table 3-2): (name, parent, offset, width).
_LEGACY_GPRS = (("a", "rax"), ("b", "rbx"), ("c", "rcx"), ("d", "rdx"))
_INDEX_GPRS = (("si", "rsi"), ("di", "rdi"), ("bp", "rbp"), ("sp", "rsp"))


def _subregisters() -> dict[str, Register]:
    specs: list[tuple[str, str, int, int]] = []
    for letter, parent in _LEGACY_GPRS:
        specs += [
            (f"e{letter}x", parent, 0, 32),
            (f"{letter}x", parent, 0, 16),
            (f"{letter}l", parent, 0, 8),
            (f"{letter}h", parent, 8, 8),
        ]
    for stem, parent in _INDEX_GPRS:
        specs += [(f"e{stem}", parent, 0, 32), (stem, parent, 0, 16), (f"{stem}l", parent, 0, 8)]
    for n in range(8, 16):
        specs += [(f"r{n}d", f"r{n}", 0, 32), (f"r{n}w", f"r{n}", 0, 16), (f"r{n}b", f"r{n}", 0, 8)]
    specs += [("eip", "rip", 0, 32), ("ip", "rip", 0, 16)]
    specs += [("eflags", "rflags", 0, 32), ("flags", "rflags", 0, 16)]
    return {
        name: Register(name, RegisterGroup.GENERAL, parent, offset, width)
        for name, parent, offset, width in specs
    }


REGISTERS: Mapping[str, Register] = MappingProxyType(_full_registers())
SUBREGISTERS: Mapping[str, Register] = MappingProxyType(_subregisters())
ALL_REGISTERS: tuple[str, ...] = (*REGISTERS, *SUBREGISTERS)


def lookup_register(name: str) -> Register:
    """The register called ``name`` (case-insensitive, without a ``$``).

    >>> reg = lookup_register("R9D")
    >>> reg.name, reg.parent, reg.offset, reg.width
    ('r9d', 'r9', 0, 32)

    :raises CommandError: no such register.
    """
    key = name.lower()
    found = REGISTERS.get(key) or SUBREGISTERS.get(key)
    if found is None:
        raise CommandError(f"unknown register {name!r}")
    return found


def msr_number(name: str) -> MSR:
    """The MSR for a register name (``lstar``) or an SDM name (``IA32_LSTAR``, ``sfmask``).

    :raises CommandError: not a known MSR name.
    """
    key = name.lower()
    if key in MSR_REGISTERS:
        return MSR_REGISTERS[key]
    try:
        return MSR[key.upper()]
    except KeyError:
        raise CommandError(f"unknown MSR {name!r}") from None
