"""Flag decoding and canonical addresses.

Bit positions are checked against the kernel's own UAPI header
(<asm/processor-flags.h>, from linux-libc-dev) when it is installed; decoded
values against hand-decomposed SDM examples.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kctx_debug.arch.address import canonicalize, is_canonical, noncanonical_hole, va_bits_for
from kctx_debug.arch.bits import (
    CR0,
    CR4,
    EFER,
    RFLAGS,
    RFLAGS_IOPL,
    BitField,
    decode_flags,
    describe_flags,
    flag_names,
)

# 0x3506f0 = SMAP(21) SMEP(20) OSXSAVE(18) FSGSBASE(16) OSXMMEXCPT(10) OSFXSR(9)
#            PGE(7) MCE(6) PAE(5) PSE(4)
_CR4_LINUX = "PSE PAE MCE PGE OSFXSR OSXMMEXCPT FSGSBASE OSXSAVE SMEP SMAP".split()


@pytest.mark.parametrize(
    ("value", "flag_type", "names"),
    [
        # 0x80050033 = PG(31) | AM(18) | WP(16) | NE(5) | ET(4) | MP(1) | PE(0)
        (0x80050033, CR0, ["PE", "MP", "ET", "NE", "WP", "AM", "PG"]),
        (0x11, CR0, ["PE", "ET"]),  # Unicorn's reset value (PLATFORM-NOTES)
        (0x60000010, CR0, ["ET", "NW", "CD"]),  # the SDM's CR0 after reset (9.1.1)
        (0x80000041, CR0, ["PE", "PG", "0x40"]),  # bit 6 is reserved
        (0x80000141, CR0, ["PE", "PG", "0x140"]),  # unknown bits form one item
        (0x3506F0, CR4, _CR4_LINUX),
        (0x50200, CR4, ["OSFXSR", "FSGSBASE", "OSXSAVE"]),  # Unicorn's reset value
        (0x1000 | 0x8000, CR4, ["LA57", "0x8000"]),  # bit 15 is reserved
        (1 << 32 | 1 << 28, CR4, ["LAM_SUP", "FRED"]),
        (0xD01, EFER, ["SCE", "LME", "LMA", "NXE"]),  # a 64-bit Linux kernel's EFER
        (0x500, EFER, ["LME", "LMA"]),
        (0x2 | 0x200, EFER, ["0x202"]),
        (0x246, RFLAGS, ["PF", "ZF", "IF"]),  # bit 1 always reads 1 and is not listed
        (0x3202, RFLAGS, ["IF", "IOPL=3"]),
        (0x41202, RFLAGS, ["IF", "IOPL=1", "AC"]),  # IOPL sits at bits 13:12
        (0x400002, RFLAGS, ["0x400000"]),  # bit 22 is reserved
        (0, CR0, []),
    ],
)
def test_decode_flags(value, flag_type, names):
    assert decode_flags(value, flag_type) == names
    assert describe_flags(value, flag_type) == ("|".join(names) or "0")


def test_describe_flags_examples():
    assert describe_flags(0x80050033, CR0) == "PE|MP|ET|NE|WP|AM|PG"
    assert describe_flags(0x2, RFLAGS) == "0"
    assert describe_flags(0xD01 | 1 << 40, EFER) == "SCE|LME|LMA|NXE|0x10000000000"


def test_decode_flags_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        decode_flags(-1, CR0)


def test_flag_names_skips_aliases_and_masks():
    class Demo(enum.IntFlag):
        LOW = 1
        ALSO_LOW = 1
        BOTH = 3
        HIGH = 4

    assert flag_names(Demo) == (("LOW", 1), ("HIGH", 4))
    assert decode_flags(7, Demo) == ["LOW", "HIGH", "0x2"]


@given(st.integers(0, 2**64 - 1))
def test_decode_accounts_for_every_bit(value):
    """Named bits, IOPL and the hex remainder together give back the value."""
    total = 0
    for item in decode_flags(value, RFLAGS):
        if item.startswith("0x"):
            total |= int(item, 16)
        elif item.startswith("IOPL="):
            total |= RFLAGS_IOPL.insert(0, int(item[5:]))
        else:
            total |= int(RFLAGS[item])
    assert total == value & ~int(RFLAGS.FIXED)


_UAPI_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/processor-flags.h")
_HEADER_TYPES = {"EFLAGS": RFLAGS, "CR0": CR0, "CR4": CR4}


def test_bit_positions_match_linux_uapi_header():
    if not _UAPI_HEADER.exists():
        pytest.skip("linux-libc-dev's processor-flags.h is not installed")
    pattern = re.compile(r"#define\s+X86_(EFLAGS|CR0|CR4)_(\w+)_BIT\s+(\d+)")
    found = pattern.findall(_UAPI_HEADER.read_text())
    assert len(found) > 40
    for reg, name, bit in found:
        if (reg, name) == ("EFLAGS", "IOPL"):
            assert RFLAGS_IOPL.lo == int(bit)
        else:
            assert _HEADER_TYPES[reg][name] == 1 << int(bit), f"{reg}.{name}"


def test_bitfield():
    field = BitField("X", 4, 3)
    assert (field.hi, field.mask, field.max_value) == (6, 0x70, 7)
    assert field.extract(0xFF) == 7
    assert field.insert(0xFF, 2) == 0xAF
    with pytest.raises(ValueError, match="does not fit"):
        field.insert(0, 8)


@pytest.mark.parametrize(
    ("va", "va_bits", "canonical"),
    [
        (0x0000_7FFF_FFFF_FFFF, 48, True),
        (0x0000_8000_0000_0000, 48, False),
        (0xFFFF_7FFF_FFFF_FFFF, 48, False),
        (0xFFFF_8000_0000_0000, 48, True),
        (0xFFFF_FFFF_FFFF_FFFF, 48, True),
        (0x00FF_FFFF_FFFF_FFFF, 57, True),
        (0x0100_0000_0000_0000, 57, False),
        (0xFF00_0000_0000_0000, 57, True),
        (0xFEFF_FFFF_FFFF_FFFF, 57, False),
        (0x0000_8000_0000_0000, 57, True),
        (-1, 48, False),
        (1 << 64, 48, False),
    ],
)
def test_is_canonical(va, va_bits, canonical):
    assert is_canonical(va, va_bits) is canonical


def test_canonical_helpers():
    assert canonicalize(0x0000_8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert canonicalize(0x0100_0000_0000_0000, 57) == 0xFF00_0000_0000_0000  # bit 56 set
    assert canonicalize(0x0200_0000_0000_0000, 57) == 0  # bit 57 is dropped
    assert canonicalize(0x0080_0000_0000_0000, 57) == 0x0080_0000_0000_0000
    assert canonicalize(0xFFFF_0000_1234_5678) == 0x1234_5678
    assert noncanonical_hole() == (0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF)
    assert noncanonical_hole(57) == (0x0100_0000_0000_0000, 0xFEFF_FFFF_FFFF_FFFF)
    assert va_bits_for(la57=True) == 57 and va_bits_for(la57=False) == 48
    with pytest.raises(ValueError, match="va_bits=0"):
        is_canonical(0, 0)
    with pytest.raises(ValueError, match="no non-canonical hole"):
        noncanonical_hole(64)


@given(st.integers(0, 2**64 - 1), st.sampled_from([48, 57]))
def test_canonical_means_sign_extended(va, va_bits):
    top = va >> (va_bits - 1)  # bits 63..va_bits-1 must be all zeros or all ones
    assert is_canonical(va, va_bits) == (top in (0, (1 << (65 - va_bits)) - 1))
    assert is_canonical(canonicalize(va, va_bits), va_bits)
