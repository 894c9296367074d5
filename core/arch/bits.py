"""Control-register, EFER and RFLAGS bits, and a generic bit-field helper.

Every flag register is one :class:`enum.IntFlag` with the Intel SDM's bit names;
multi-bit fields (RFLAGS.IOPL, descriptor fields) are :class:`BitField` values.
:func:`decode_flags` turns a register value into the names of its set bits and
keeps any set bit it has no name for as one raw hex item, so nothing is hidden:

>>> decode_flags(0x80050033, CR0)
['PE', 'MP', 'ET', 'NE', 'WP', 'AM', 'PG']
>>> describe_flags(0x80000041, CR0)
'PE|PG|0x40'
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "CR0",
    "CR4",
    "EFER",
    "RFLAGS",
    "RFLAGS_IOPL",
    "BitField",
    "decode_flags",
    "describe_flags",
    "flag_names",
]


@dataclass(frozen=True)
class BitField:
    """A field of ``width`` bits starting at bit ``lo`` of a register or entry.

    >>> RFLAGS_IOPL.extract(0x3202)
    3
    >>> hex(RFLAGS_IOPL.insert(0x202, 1))
    '0x1202'
    """

    name: str
    lo: int
    width: int

    @property
    def hi(self) -> int:
        """The highest bit the field covers (inclusive, as the SDM figures number it)."""
        return self.lo + self.width - 1

    @property
    def max_value(self) -> int:
        """The largest value the field can hold."""
        return (1 << self.width) - 1

    @property
    def mask(self) -> int:
        """The field's bits in place."""
        return self.max_value << self.lo

    def extract(self, value: int) -> int:
        """The field's value read out of ``value``."""
        return (value >> self.lo) & self.max_value

    def insert(self, value: int, field: int) -> int:
        """``value`` with this field replaced by ``field``.

        :raises ValueError: ``field`` does not fit in the field's width.
        """
        if not 0 <= field <= self.max_value:
            raise ValueError(f"{self.name}={field:#x} does not fit in {self.width} bits")
        return (value & ~self.mask) | (field << self.lo)


class CR0(enum.IntFlag):
    """CR0 bits (SDM Vol. 3A 2.5 "Control Registers", Figure 2-7)."""

    PE = 1 << 0  # protection enable
    MP = 1 << 1  # monitor coprocessor
    EM = 1 << 2  # x87 emulation
    TS = 1 << 3  # task switched
    ET = 1 << 4  # extension type (always 1 on modern CPUs)
    NE = 1 << 5  # numeric error
    WP = 1 << 16  # write protect: supervisor writes honour read-only pages
    AM = 1 << 18  # alignment mask
    NW = 1 << 29  # not write-through
    CD = 1 << 30  # cache disable
    PG = 1 << 31  # paging


class CR4(enum.IntFlag):
    """CR4 bits (SDM Vol. 3A 2.5 "Control Registers"; bit 32 FRED from the FRED spec)."""

    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12  # five-level paging
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    KL = 1 << 19  # Key Locker
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22  # protection keys for user pages (PKRU)
    CET = 1 << 23
    PKS = 1 << 24  # protection keys for supervisor pages (IA32_PKRS)
    UINTR = 1 << 25  # user interrupts
    LAM_SUP = 1 << 28  # linear-address masking for supervisor pointers
    FRED = 1 << 32  # flexible return and event delivery


class EFER(enum.IntFlag):
    """IA32_EFER bits (SDM Vol. 3A 2.2.1, Table 2-1; SVME..TCE, AUTOIBRS: AMD APM Vol. 2 3.1.7)."""

    SCE = 1 << 0  # SYSCALL/SYSRET enable
    LME = 1 << 8  # long mode enable
    LMA = 1 << 10  # long mode active (read-only)
    NXE = 1 << 11  # execute-disable bit enable
    SVME = 1 << 12
    LMSLE = 1 << 13
    FFXSR = 1 << 14
    TCE = 1 << 15
    AUTOIBRS = 1 << 21


class RFLAGS(enum.IntFlag):
    """RFLAGS single-bit flags (SDM Vol. 1 3.4.3, Figure 3-8; IOPL is :data:`RFLAGS_IOPL`)."""

    CF = 1 << 0
    FIXED = 1 << 1  # reserved, always reads as 1; not listed by decode_flags
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21


# RFLAGS bits 13:12, the I/O privilege level (SDM Vol. 1 3.4.3.3).
RFLAGS_IOPL = BitField("IOPL", 12, 2)


@dataclass(frozen=True)
class _FlagExtras:
    """What decode_flags needs beyond the IntFlag: multi-bit fields, bits never listed."""

    fields: tuple[BitField, ...] = ()
    quiet: int = 0


_EXTRAS: Mapping[type[enum.IntFlag], _FlagExtras] = MappingProxyType(
    {RFLAGS: _FlagExtras(fields=(RFLAGS_IOPL,), quiet=int(RFLAGS.FIXED))}
)


def flag_names(flag_type: type[enum.IntFlag]) -> tuple[tuple[str, int], ...]:
    """The single-bit members of ``flag_type`` as (name, value), lowest bit first.

    Aliases and multi-bit members are left out.

    >>> flag_names(EFER)[:3]
    (('SCE', 1), ('LME', 256), ('LMA', 1024))
    """
    seen: dict[int, str] = {}
    for name, member in flag_type.__members__.items():
        value = int(member)
        if value > 0 and value & (value - 1) == 0 and value not in seen:
            seen[value] = name
    return tuple((name, value) for value, name in sorted(seen.items()))


def decode_flags(value: int, flag_type: type[enum.IntFlag]) -> list[str]:
    """The names of the bits set in ``value``, lowest bit first.

    Multi-bit fields appear as ``NAME=n`` when non-zero (RFLAGS: ``IOPL=3``), in bit
    order; set bits with no name are gathered into one hex item at the end.

    >>> decode_flags(0x3246, RFLAGS)
    ['PF', 'ZF', 'IF', 'IOPL=3']
    >>> decode_flags(0xd01 | (1 << 40), EFER)
    ['SCE', 'LME', 'LMA', 'NXE', '0x10000000000']

    :param value: the register value (non-negative).
    :param flag_type: one of :class:`CR0`, :class:`CR4`, :class:`EFER`, :class:`RFLAGS`
        or any other single-bit :class:`enum.IntFlag`.
    :raises ValueError: ``value`` is negative.
    """
    if value < 0:
        raise ValueError(f"register value {value} is negative")
    extras = _EXTRAS.get(flag_type, _FlagExtras())
    items: list[tuple[int, str]] = []
    # Plain ints throughout: ~ on an IntFlag complements within its named bits only.
    quiet = int(extras.quiet)
    known = quiet
    for name, bit in flag_names(flag_type):
        known |= bit
        if value & bit & ~quiet:
            items.append((bit.bit_length() - 1, name))
    for field in extras.fields:
        known |= field.mask
        if field.extract(value):
            items.append((field.lo, f"{field.name}={field.extract(value)}"))
    names = [name for _, name in sorted(items)]
    unknown = value & ~known
    if unknown:
        names.append(hex(unknown))
    return names


def describe_flags(value: int, flag_type: type[enum.IntFlag]) -> str:
    """:func:`decode_flags` joined with ``|``; ``0`` when nothing is set.

    >>> describe_flags(0x50200, CR4)
    'OSFXSR|FSGSBASE|OSXSAVE'
    """
    return "|".join(decode_flags(value, flag_type)) or "0"
