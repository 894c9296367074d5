"""Canonical linear addresses (SDM Vol. 1 3.3.7.1 "Canonical Addressing").

A linear address is canonical when bits 63 down to the highest implemented bit
(47 with four-level paging, 56 with five-level paging, CR4.LA57) are all copies
of that bit.

>>> is_canonical(0xffff800000000000)
True
>>> is_canonical(0x0000800000000000)
False
>>> hex(canonicalize(0x0000800000000000))
'0xffff800000000000'
"""

from __future__ import annotations

__all__ = [
    "ADDRESS_BITS",
    "VA_BITS_4LEVEL",
    "VA_BITS_5LEVEL",
    "canonicalize",
    "is_canonical",
    "noncanonical_hole",
    "va_bits_for",
]

# Linear addresses are 64-bit values; the implemented width depends on the paging mode.
ADDRESS_BITS = 64
VA_BITS_4LEVEL = 48
VA_BITS_5LEVEL = 57

_ADDRESS_MASK = (1 << ADDRESS_BITS) - 1


def _check_va_bits(va_bits: int) -> None:
    if not 1 <= va_bits <= ADDRESS_BITS:
        raise ValueError(f"va_bits={va_bits} is not between 1 and {ADDRESS_BITS}")


def va_bits_for(la57: bool) -> int:
    """The implemented linear-address width: 57 with CR4.LA57 set, else 48."""
    return VA_BITS_5LEVEL if la57 else VA_BITS_4LEVEL


def is_canonical(va: int, va_bits: int = VA_BITS_4LEVEL) -> bool:
    """Whether ``va`` (a 64-bit unsigned value) is canonical for ``va_bits``.

    >>> is_canonical(0x00ff000000000000, va_bits=57)
    True
    >>> is_canonical(0x00ff000000000000)
    False

    :param va: the address; values outside 0..2**64-1 are never canonical.
    :param va_bits: 48 for four-level paging, 57 for five-level (see :func:`va_bits_for`).
    :raises ValueError: ``va_bits`` is not between 1 and 64.
    """
    _check_va_bits(va_bits)
    if not 0 <= va <= _ADDRESS_MASK:
        return False
    return canonicalize(va, va_bits) == va


def canonicalize(va: int, va_bits: int = VA_BITS_4LEVEL) -> int:
    """Sign-extend bit ``va_bits - 1`` of ``va`` through bit 63.

    Page-table walkers build an address from table indices and need this to
    turn index 256 of the top level into ``0xffff800000000000``.

    :raises ValueError: ``va_bits`` is not between 1 and 64.
    """
    _check_va_bits(va_bits)
    low = va & ((1 << va_bits) - 1)
    if low >> (va_bits - 1):
        return (low | ~((1 << va_bits) - 1)) & _ADDRESS_MASK
    return low


def noncanonical_hole(va_bits: int = VA_BITS_4LEVEL) -> tuple[int, int]:
    """The first and last address of the non-canonical gap, inclusive.

    >>> [hex(a) for a in noncanonical_hole()]
    ['0x800000000000', '0xffff7fffffffffff']

    :raises ValueError: ``va_bits`` is not between 1 and 63 (at 64 there is no hole).
    """
    _check_va_bits(va_bits)
    if va_bits == ADDRESS_BITS:
        raise ValueError("a 64-bit address space has no non-canonical hole")
    first = 1 << (va_bits - 1)
    last = canonicalize(first, va_bits) - 1
    return first, last
