"""Descriptor decoding and encoding against the SDM figures, Linux's GDT and real CPUs.

Truth comes from three places: byte strings worked out by hand from SDM Vol. 3A
Figures 3-6, 3-8, 6-8, 7-4 and 7-11; a reference encoder below that follows
the figures' dword layout (written independently of the module's tables); and
CPUs that interpret descriptors themselves: QEMU's LSL/LAR through Unicorn, and
the host CPU's LAR/LSL on the running kernel's own GDT.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kctx_debug.arch.descriptors import (
    CodeSegmentType,
    DataSegmentType,
    IdtGate,
    SegmentDescriptor,
    Selector,
    SystemDescriptor,
    SystemDescriptorType,
    Tss64,
    describe_layout,
)
from kctx_debug.errors import DescriptorError

# --- reference encoders: the SDM figures as 32-bit words, low dword first ----------


def sdm_segment(base, limit, type, s, dpl, p, avl, l, db, g):  # noqa: E741
    """Figure 3-8 "Segment Descriptor"."""
    low = ((base & 0xFFFF) << 16) | (limit & 0xFFFF)
    high = (
        (base >> 24 & 0xFF) << 24
        | g << 23
        | db << 22
        | l << 21
        | avl << 20
        | (limit >> 16 & 0xF) << 16
        | p << 15
        | dpl << 13
        | s << 12
        | type << 8
        | (base >> 16 & 0xFF)
    )
    return struct.pack("<II", low, high)


def sdm_system(base, limit, type, dpl, p, avl, g):
    """Figure 7-4 "Format of TSS and LDT Descriptors in 64-bit Mode"."""
    low = sdm_segment(base & 0xFFFFFFFF, limit, type, 0, dpl, p, avl, 0, 0, g)
    return low + struct.pack("<II", base >> 32, 0)


def sdm_gate(offset, selector, ist, type, dpl, p):
    """Figure 6-8 "64-Bit IDT Gate Descriptors"."""
    dw0 = selector << 16 | (offset & 0xFFFF)
    dw1 = (offset & 0xFFFF0000) | p << 15 | dpl << 13 | type << 8 | ist
    return struct.pack("<IIII", dw0, dw1, offset >> 32, 0)


# --- Linux's GDT (arch/x86/include/asm/segment.h GDT_ENTRY_INIT values) -----------

LINUX_GDT = [
    # raw, kind, type, dpl, l, db, str
    (0x00AF9B000000FFFF, "code64", 0xB, 0, True, False, "code64 DPL0 P base=0x0 limit=0xfffff G L"),
    (0x00CF93000000FFFF, "data", 0x3, 0, False, True, "data DPL0 P base=0x0 limit=0xfffff G B"),
    (0x00AFFB000000FFFF, "code64", 0xB, 3, True, False, "code64 DPL3 P base=0x0 limit=0xfffff G L"),
    (0x00CFF3000000FFFF, "data", 0x3, 3, False, True, "data DPL3 P base=0x0 limit=0xfffff G B"),
    (0x00CF9B000000FFFF, "code32", 0xB, 0, False, True, "code32 DPL0 P base=0x0 limit=0xfffff G D"),
    (0x00CFFB000000FFFF, "code32", 0xB, 3, False, True, "code32 DPL3 P base=0x0 limit=0xfffff G D"),
]


@pytest.mark.parametrize(("raw", "kind", "type_", "dpl", "l", "db", "text"), LINUX_GDT)
def test_linux_gdt_entries(raw, kind, type_, dpl, l, db, text):  # noqa: E741
    desc = SegmentDescriptor.from_int(raw)
    assert (desc.base, desc.limit, desc.type, desc.dpl) == (0, 0xFFFFF, type_, dpl)
    assert (desc.s, desc.p, desc.g, desc.avl, desc.l, desc.db) == (True, True, True, False, l, db)
    assert desc.effective_limit == 0xFFFFFFFF
    assert desc.kind == kind
    assert desc.accessed and desc.readable
    assert desc.is_long_code == (kind == "code64")
    assert desc.writable == (kind == "data")
    assert not desc.conforming and not desc.expand_down and not desc.spans_two_slots
    assert str(desc) == text
    assert desc.raw == raw
    assert desc.to_bytes() == raw.to_bytes(8, "little")
    assert SegmentDescriptor.from_bytes(raw.to_bytes(8, "little")) == desc


def test_kernel_cs_built_from_fields():
    desc = SegmentDescriptor(
        limit=0xFFFFF,
        type=CodeSegmentType.CODE | CodeSegmentType.R | CodeSegmentType.A,
        s=True,
        p=True,
        l=True,
        g=True,
    )
    assert desc.to_bytes() == bytes.fromhex("ffff0000009baf00")
    assert desc.raw == 0x00AF9B000000FFFF


def test_segment_with_split_base_and_limit():
    # base 0x12345678, limit 0xabcde, read-only expand-down data, DPL2, P, B, G=0:
    # low dword  = base[15:0] 0x5678 : limit[15:0] 0xbcde         = 0x5678bcde
    # high dword = base[31:24] 0x12, B (bit 22), limit[19:16] 0xa, P, DPL 2, S,
    #              type 0x5 (E|A), base[23:16] 0x34                = 0x124ad534
    desc = SegmentDescriptor.from_bytes(struct.pack("<II", 0x5678BCDE, 0x124AD534))
    assert desc.base == 0x12345678
    assert desc.limit == desc.effective_limit == 0xABCDE
    assert desc.type == DataSegmentType.E | DataSegmentType.A
    assert (desc.s, desc.dpl, desc.p, desc.db, desc.g) == (True, 2, True, True, False)
    assert desc.expand_down and not desc.writable and desc.readable and desc.is_data
    assert str(desc) == "data DPL2 P base=0x12345678 limit=0xabcde B RO E"
    assert SegmentDescriptor(limit=0xABCDE, g=True).effective_limit == 0xABCDEFFF


def test_segment_rendering_of_unusual_bits():
    conforming_xo = SegmentDescriptor(type=CodeSegmentType.CODE | CodeSegmentType.C, s=True)
    assert str(conforming_xo) == "code16 DPL0 NP base=0x0 limit=0x0 C XO"
    assert conforming_xo.conforming and not conforming_xo.readable
    assert str(SegmentDescriptor()) == "null"
    assert SegmentDescriptor().is_null
    avl_data = SegmentDescriptor(type=DataSegmentType.W, s=True, p=True, avl=True)
    assert str(avl_data) == "data DPL0 P base=0x0 limit=0x0 AVL"


def test_legacy_system_descriptor_in_eight_bytes():
    low = SegmentDescriptor.from_bytes(bytes.fromhex("8740003000890000"))
    assert low.is_system and not low.is_code and not low.is_data
    assert low.system_type is SystemDescriptorType.TSS_AVAILABLE
    assert low.spans_two_slots
    assert not (low.readable or low.writable or low.accessed)
    assert str(low) == "tss-avail DPL0 P base=0x3000 limit=0x4087"
    reserved_type = SegmentDescriptor(type=8, p=True)
    assert reserved_type.system_type is None
    assert str(reserved_type) == "type=0x8 DPL0 P base=0x0 limit=0x0"


# A 64-bit TSS descriptor worked out from Figure 7-4: base 0xfffffe0000003000,
# limit 0x4087, type 9 (available), DPL0, P, G=0.
TSS_DESC = bytes.fromhex("87400030 00890000 00feffff 00000000")


def test_tss_descriptor_by_hand():
    desc = SystemDescriptor.from_bytes(TSS_DESC)
    assert desc.base == 0xFFFFFE0000003000
    assert desc.limit == desc.effective_limit == 0x4087
    assert desc.system_type is SystemDescriptorType.TSS_AVAILABLE
    assert (desc.dpl, desc.p, desc.g, desc.avl, desc.reserved) == (0, True, False, False, 0)
    assert desc.is_tss and not desc.is_busy
    assert str(desc) == "tss-avail DPL0 P base=0xfffffe0000003000 limit=0x4087"
    assert desc.to_bytes() == TSS_DESC
    built = SystemDescriptor(base=0xFFFFFE0000003000, limit=0x4087, type=9, p=True)
    assert built.to_bytes() == TSS_DESC

    busy = SystemDescriptor.from_bytes(TSS_DESC[:5] + b"\x8b" + TSS_DESC[6:])
    assert busy.is_busy and busy.kind == "tss-busy"
    ldt = SystemDescriptor.from_bytes(TSS_DESC[:5] + b"\x82" + TSS_DESC[6:])
    assert ldt.system_type is SystemDescriptorType.LDT and not ldt.is_tss


@pytest.mark.parametrize(
    ("index", "value", "why"),
    [
        (13, 0x09, "upper Type"),  # type field of the upper 8 bytes (bits 108:104)
        (13, 0x10, "upper Type"),  # its S position
        (5, 0x99, "S"),  # S=1: a code/data descriptor, not a system one
        (5, 0x8C, "not an LDT"),  # a call gate is 16 bytes but not a TSS/LDT
        (5, 0x80, "not an LDT"),
    ],
)
def test_bad_system_descriptors(index, value, why):
    bad = bytearray(TSS_DESC)
    bad[index] = value
    with pytest.raises(DescriptorError, match=why):
        SystemDescriptor.from_bytes(bytes(bad))


def test_system_descriptor_keeps_reserved_bits():
    data = bytearray(TSS_DESC)
    data[6] |= 0x60  # bits 54:53 (D/B and L positions), reserved here
    data[12] = 0xAB  # bits 103:96
    data[15] = 0xFF  # top of bits 127:109
    desc = SystemDescriptor.from_bytes(bytes(data))
    assert desc.reserved == 0b11 | 0xAB << 2 | 0xFF << (2 + 8 + 11)
    assert desc.to_bytes() == bytes(data)
    assert str(desc).endswith(f"limit=0x4087 reserved={desc.reserved:#x}")


# An interrupt gate worked out from Figure 6-8: offset 0xffffffff81a00b50,
# selector 0x10, IST 0, type 0xE, DPL0, P.
INT_GATE = bytes.fromhex("500b1000 008ea081 ffffffff 00000000")
# A trap gate: offset 0xffffffff81001230, selector 0x10, IST 3, type 0xF, DPL3, P.
TRAP_GATE = bytes.fromhex("30121000 03ef0081 ffffffff 00000000")


def test_interrupt_gate_by_hand():
    gate = IdtGate.from_bytes(INT_GATE)
    assert (gate.offset, gate.selector, gate.ist) == (0xFFFFFFFF81A00B50, 0x10, 0)
    assert (gate.type, gate.dpl, gate.p, gate.reserved) == (0xE, 0, True, 0)
    assert gate.is_interrupt_gate and not gate.is_trap_gate and gate.is_valid_64bit_type
    assert str(gate) == "int-gate sel=0x0010 off=0xffffffff81a00b50 ist=0 dpl=0 P"
    built = IdtGate(offset=0xFFFFFFFF81A00B50, selector=0x10, type=0xE, p=True)
    assert built.to_bytes() == INT_GATE
    assert built == gate


def test_trap_gate_by_hand():
    gate = IdtGate.from_bytes(TRAP_GATE)
    assert (gate.offset, gate.selector, gate.ist) == (0xFFFFFFFF81001230, 0x10, 3)
    assert (gate.type, gate.dpl, gate.p) == (SystemDescriptorType.TRAP_GATE, 3, True)
    assert gate.is_trap_gate and gate.is_valid_64bit_type
    assert str(gate) == "trap-gate sel=0x0010 off=0xffffffff81001230 ist=3 dpl=3 P"
    built = IdtGate(offset=0xFFFFFFFF81001230, selector=0x10, ist=3, type=0xF, dpl=3, p=True)
    assert built.to_bytes() == TRAP_GATE


def test_odd_gates_decode_and_say_so():
    empty = IdtGate.from_bytes(bytes(16))
    assert not empty.p and not empty.is_valid_64bit_type
    assert str(empty) == "type=0x0 sel=0x0000 off=0x0000000000000000 ist=0 dpl=0 NP"
    # S=1 (byte 5 = 0x9e): the type bits say "interrupt gate" but the CPU would #GP.
    s_set = IdtGate.from_bytes(INT_GATE[:5] + b"\x9e" + INT_GATE[6:])
    assert s_set.type == 0xE and not s_set.is_valid_64bit_type
    assert s_set.reserved == 1 << 5  # after the five reserved bits 39:35
    assert str(s_set).endswith("dpl=0 P reserved=0x20")
    # A 32-bit call gate type in a 64-bit IDT.
    assert not IdtGate(type=SystemDescriptorType.CALL_GATE).is_valid_64bit_type
    assert IdtGate(type=SystemDescriptorType.CALL_GATE).kind == "call-gate"


@pytest.mark.parametrize(
    ("raw", "index", "ti", "rpl", "text"),
    [
        (0x0010, 2, False, 0, "0x0010 (GDT[2] RPL0)"),  # Linux __KERNEL_CS
        (0x0033, 6, False, 3, "0x0033 (GDT[6] RPL3)"),  # Linux __USER_CS
        (0x002B, 5, False, 3, "0x002b (GDT[5] RPL3)"),  # Linux __USER_DS
        (0x000F, 1, True, 3, "0x000f (LDT[1] RPL3)"),
        (0xFFFF, 0x1FFF, True, 3, "0xffff (LDT[8191] RPL3)"),
        (0x0000, 0, False, 0, "0x0000 (null)"),
        (0x0003, 0, False, 3, "0x0003 (null RPL3)"),
    ],
)
def test_selectors(raw, index, ti, rpl, text):
    sel = Selector.from_int(raw)
    assert (sel.index, sel.ti, sel.rpl) == (index, ti, rpl)
    assert sel.raw == raw
    assert sel.table_offset == index * 8
    assert sel.is_null == (index == 0 and not ti)
    assert str(sel) == text
    assert Selector(index=index, ti=ti, rpl=rpl) == sel


def _tss_bytes() -> bytes:
    # Figure 7-11 offsets, written out here rather than taken from the module.
    buf = bytearray(104)
    buf[0x04:0x0C] = (0xFFFFC90000004000).to_bytes(8, "little")  # RSP0
    buf[0x0C:0x14] = (0x1111).to_bytes(8, "little")  # RSP1
    buf[0x14:0x1C] = (0x2222).to_bytes(8, "little")  # RSP2
    for n in range(1, 8):
        off = 0x24 + 8 * (n - 1)
        buf[off : off + 8] = (0xFFFFFE0000010000 + n * 0x1000).to_bytes(8, "little")
    buf[0x66:0x68] = (0x68).to_bytes(2, "little")  # I/O map base: no bitmap
    return bytes(buf)


def test_tss_by_hand():
    tss = Tss64.from_bytes(_tss_bytes())
    assert (tss.rsp0, tss.rsp1, tss.rsp2) == (0xFFFFC90000004000, 0x1111, 0x2222)
    assert tss.ist == tuple(0xFFFFFE0000010000 + n * 0x1000 for n in range(1, 8))
    assert tss.iomap_base == 0x68
    assert tss.reserved == bytes(22) and tss.tail == b""
    assert tss.ist_stack(1) == 0xFFFFFE0000011000 and tss.ist_stack(7) == 0xFFFFFE0000017000
    assert tss.rsp_for(0) == 0xFFFFC90000004000 and tss.rsp_for(2) == 0x2222
    assert tss.to_bytes() == _tss_bytes()
    assert str(Tss64(rsp0=0x10, ist=(0, 0x20, 0, 0, 0, 0, 0), iomap_base=0x68)) == (
        "rsp0=0x10 rsp1=0x0 rsp2=0x0 ist2=0x20 iomap_base=0x68"
    )


def test_tss_keeps_reserved_bytes_and_io_bitmap():
    data = bytearray(_tss_bytes())
    for off in (0x00, 0x03, 0x1C, 0x23, 0x5C, 0x64, 0x65):  # inside reserved ranges
        data[off] = 0xA5
    bitmap = bytes(range(256)) * 32 + b"\xff"  # 8 KiB I/O bitmap plus the final 0xff byte
    tss = Tss64.from_bytes(bytes(data) + bitmap)
    assert tss.rsp0 == 0xFFFFC90000004000 and tss.iomap_base == 0x68
    assert tss.tail == bitmap
    assert tss.to_bytes() == bytes(data) + bitmap
    assert tss.reserved.count(0xA5) == 7


def test_tss_bad_values():
    with pytest.raises(DescriptorError, match="at least 104 bytes, got 103"):
        Tss64.from_bytes(bytes(103))
    with pytest.raises(DescriptorError, match="7 stack pointers"):
        Tss64(ist=(0,) * 6)
    with pytest.raises(DescriptorError, match="rsp0"):
        Tss64(rsp0=-1)
    with pytest.raises(DescriptorError, match="ist3"):
        Tss64(ist=(0, 0, 1 << 64, 0, 0, 0, 0))
    with pytest.raises(DescriptorError, match="iomap_base"):
        Tss64(iomap_base=0x10000)
    with pytest.raises(DescriptorError, match="22 bytes"):
        Tss64(reserved=b"")
    with pytest.raises(DescriptorError, match="IST index must be 1-7, not 0"):
        Tss64().ist_stack(0)
    with pytest.raises(DescriptorError, match="CPL 0-2, not 3"):
        Tss64().rsp_for(3)


@pytest.mark.parametrize(
    ("cls", "size"), [(SegmentDescriptor, 8), (SystemDescriptor, 16), (IdtGate, 16), (Selector, 2)]
)
def test_bad_lengths(cls, size):
    for length in (0, size - 1, size + 1, 2 * size):
        with pytest.raises(DescriptorError, match=f"needs {size} bytes, got {length}"):
            cls.from_bytes(bytes(length))
    with pytest.raises(DescriptorError, match="must be decoded from bytes"):
        cls.from_bytes(size)  # bytes(size) would have been size zero bytes
    with pytest.raises(DescriptorError, match=f"not a {size * 8}-bit value"):
        cls.from_int(1 << (size * 8))
    with pytest.raises(DescriptorError, match=f"not a {size * 8}-bit value"):
        cls.from_int(-1)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (SegmentDescriptor, "dpl", 4),
        (SegmentDescriptor, "limit", 0x100000),
        (SegmentDescriptor, "base", 1 << 32),
        (SegmentDescriptor, "type", 16),
        (SegmentDescriptor, "g", 2),
        (SegmentDescriptor, "base", -1),
        (SegmentDescriptor, "base", "0"),
        (SystemDescriptor, "base", 1 << 64),
        (SystemDescriptor, "type", SystemDescriptorType.INTERRUPT_GATE),
        (SystemDescriptor, "reserved", 1 << 29),
        (IdtGate, "ist", 8),
        (IdtGate, "selector", 0x10000),
        (IdtGate, "offset", 1 << 64),
        (IdtGate, "dpl", -1),
        (Selector, "index", 0x2000),
        (Selector, "rpl", 4),
    ],
)
def test_field_ranges(cls, field, value):
    with pytest.raises(DescriptorError, match=field):
        cls(**{field: value})


def test_any_buffer_type_decodes():
    raw = (0x00AF9B000000FFFF).to_bytes(8, "little")
    expected = SegmentDescriptor.from_int(0x00AF9B000000FFFF)
    assert SegmentDescriptor.from_bytes(bytearray(raw)) == expected
    assert SegmentDescriptor.from_bytes(memoryview(b"xx" + raw)[2:]) == expected
    assert IdtGate.from_bytes(memoryview(INT_GATE)).offset == 0xFFFFFFFF81A00B50


def test_flags_are_bools_and_ints_compare_equal():
    desc = SegmentDescriptor(s=1, p=1, type=CodeSegmentType.CODE)
    assert desc.s is True and desc.p is True and type(desc.type) is int
    assert desc == SegmentDescriptor(s=True, p=True, type=8)


def test_describe_layout_matches_figure_3_8():
    assert describe_layout(SegmentDescriptor.from_int(0x00AF9B000000FFFF)) == (
        "bits   field                value\n"
        "63:56  Base Address 31:24   0x0\n"
        "55     G                    0x1\n"
        "54     D/B                  0x0\n"
        "53     L                    0x1\n"
        "52     AVL                  0x0\n"
        "51:48  Segment Limit 19:16  0xf\n"
        "47     P                    0x1\n"
        "46:45  DPL                  0x0\n"
        "44     S                    0x1\n"
        "43:40  Type                 0xb\n"
        "39:32  Base Address 23:16   0x0\n"
        "31:16  Base Address 15:0    0x0\n"
        "15:0   Segment Limit 15:0   0xffff"
    )


def test_describe_layout_of_classes():
    gate_rows = describe_layout(IdtGate).splitlines()
    assert gate_rows[0] == "bits    field"
    assert gate_rows[1:4] == ["127:96  Reserved", "95:64   Offset 63:32", "63:48   Offset 31:16"]
    assert "34:32   IST" in gate_rows
    system_rows = describe_layout(SystemDescriptor).splitlines()
    assert "108:104  upper Type (must be 0)" in system_rows
    assert "44       S (must be 0)" in system_rows
    tss_rows = describe_layout(Tss64).splitlines()
    assert tss_rows[0] == "bytes      field"
    assert tss_rows[1] == "0x67:0x66  iomap_base"
    assert tss_rows[-2:] == ["0x0b:0x04  rsp0", "0x03:0x00  reserved"]
    assert describe_layout(Tss64(rsp0=5)).splitlines()[-2] == "0x0b:0x04  rsp0        0x5"


# --- property tests ----------------------------------------------------------------

flag = st.booleans()
segment_fields = st.fixed_dictionaries(
    {
        "base": st.integers(0, 2**32 - 1),
        "limit": st.integers(0, 2**20 - 1),
        "type": st.integers(0, 15),
        "s": flag,
        "dpl": st.integers(0, 3),
        "p": flag,
        "avl": flag,
        "l": flag,
        "db": flag,
        "g": flag,
    }
)
system_fields = st.fixed_dictionaries(
    {
        "base": st.integers(0, 2**64 - 1),
        "limit": st.integers(0, 2**20 - 1),
        "type": st.sampled_from([2, 9, 11]),
        "dpl": st.integers(0, 3),
        "p": flag,
        "avl": flag,
        "g": flag,
    }
)
gate_fields = st.fixed_dictionaries(
    {
        "offset": st.integers(0, 2**64 - 1),
        "selector": st.integers(0, 0xFFFF),
        "ist": st.integers(0, 7),
        "type": st.integers(0, 15),
        "dpl": st.integers(0, 3),
        "p": flag,
    }
)
u64 = st.integers(0, 2**64 - 1)


@given(segment_fields)
def test_segment_fields_match_sdm_encoding(fields):
    desc = SegmentDescriptor(**fields)
    assert desc.to_bytes() == sdm_segment(**fields)
    assert SegmentDescriptor.from_bytes(desc.to_bytes()) == desc
    assert SegmentDescriptor.from_int(desc.raw) == desc


@given(st.binary(min_size=8, max_size=8))
def test_segment_any_bytes_round_trip(data):
    assert SegmentDescriptor.from_bytes(data).to_bytes() == data


@given(system_fields, st.integers(0, 2**29 - 1))
def test_system_fields_match_sdm_encoding(fields, reserved):
    desc = SystemDescriptor(**fields)
    assert desc.to_bytes() == sdm_system(**fields)
    assert SystemDescriptor.from_bytes(desc.to_bytes()) == desc
    with_reserved = SystemDescriptor(**fields, reserved=reserved)
    assert SystemDescriptor.from_bytes(with_reserved.to_bytes()) == with_reserved


@given(st.binary(min_size=16, max_size=16), st.sampled_from([0x2, 0x9, 0xB]))
def test_system_valid_bytes_round_trip(data, type_):
    data = bytearray(data)
    data[5] = (data[5] & 0xE0) | type_  # S=0 and a long-mode LDT/TSS type
    data[13] &= 0xE0  # upper Type/S must be zero
    assert SystemDescriptor.from_bytes(bytes(data)).to_bytes() == bytes(data)


@given(gate_fields)
def test_gate_fields_match_sdm_encoding(fields):
    gate = IdtGate(**fields)
    assert gate.to_bytes() == sdm_gate(**fields)
    assert IdtGate.from_bytes(gate.to_bytes()) == gate


@given(st.binary(min_size=16, max_size=16))
def test_gate_any_bytes_round_trip(data):
    assert IdtGate.from_bytes(data).to_bytes() == data


@given(st.integers(0, 0xFFFF))
def test_selector_round_trip(raw):
    sel = Selector.from_int(raw)
    assert (sel.index << 3 | sel.ti << 2 | sel.rpl) == raw
    assert Selector.from_bytes(sel.to_bytes()) == sel


@given(u64, u64, u64, st.tuples(*[u64] * 7), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_tss_fields_round_trip(rsp0, rsp1, rsp2, ist, iomap_base, tail):
    tss = Tss64(rsp0=rsp0, rsp1=rsp1, rsp2=rsp2, ist=ist, iomap_base=iomap_base, tail=tail)
    data = tss.to_bytes()
    assert len(data) == 104 + len(tail)
    assert struct.unpack_from("<QQQ", data, 4) == (rsp0, rsp1, rsp2)
    assert struct.unpack_from("<7Q", data, 0x24) == ist
    assert struct.unpack_from("<H", data, 0x66) == (iomap_base,)
    assert Tss64.from_bytes(data) == tss


@given(st.binary(min_size=104, max_size=300))
def test_tss_any_bytes_round_trip(data):
    assert Tss64.from_bytes(data).to_bytes() == data


# --- CPUs as oracles -----------------------------------------------------------------

# lsl eax, ecx ; lar edx, ecx  (each run stops at the next instruction address)
_LSL_LAR = bytes.fromhex("0f03c1 0f02d1")
_ACCESS_RIGHTS = 0x00F0FF00  # LAR keeps these bits of the descriptor's high dword


class _UnicornCpu:
    """A Unicorn engine with a GDT at 0x2000, running LSL/LAR on selector 0x8."""

    CODE, GDT = 0x1000, 0x2000

    def __init__(self):
        unicorn = pytest.importorskip("unicorn")
        x86 = pytest.importorskip("unicorn.x86_const")
        self.x86 = x86
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc.mem_map(0, 0x4000)
        self.uc.mem_write(self.CODE, _LSL_LAR)
        self.uc.reg_write(x86.UC_X86_REG_GDTR, (0, self.GDT, 0xFFF, 0))

    def lsl_lar(self, entry: bytes) -> tuple[int | None, int | None]:
        """(LSL, LAR) for GDT slot 1 holding ``entry``; None where ZF says rejected."""
        x86 = self.x86
        self.uc.mem_write(self.GDT + 8, entry)
        results = []
        for insn in range(2):
            for reg in (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RDX):
                self.uc.reg_write(reg, 0xDEAD)
            self.uc.reg_write(x86.UC_X86_REG_RCX, 0x8)
            start = self.CODE + 3 * insn
            self.uc.emu_start(start, start + 3)
            zf = self.uc.reg_read(x86.UC_X86_REG_EFLAGS) & 0x40
            reg = x86.UC_X86_REG_RAX if insn == 0 else x86.UC_X86_REG_RDX
            results.append(self.uc.reg_read(reg) if zf else None)
        return results[0], results[1]


@pytest.fixture(scope="module")
def unicorn_cpu():
    return _UnicornCpu()


def _access_rights(desc: SegmentDescriptor) -> int:
    # The high-dword view of Figure 3-8, built from the decoded fields.
    return (
        desc.type << 8 | desc.s << 12 | desc.dpl << 13 | desc.p << 15
        | desc.avl << 20 | desc.l << 21 | desc.db << 22 | desc.g << 23
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=8, max_size=8))
def test_qemu_lsl_lar_agree_on_code_and_data(unicorn_cpu, data):
    data = data[:5] + bytes([data[5] | 0x10]) + data[6:]  # S=1: LSL/LAR accept any DPL at CPL0
    desc = SegmentDescriptor.from_bytes(data)
    limit, rights = unicorn_cpu.lsl_lar(data)
    assert limit == desc.effective_limit
    assert rights is not None and rights & _ACCESS_RIGHTS == _access_rights(desc)


@pytest.mark.parametrize("type_", [2, 9, 11])
def test_qemu_lsl_on_long_mode_system_descriptor(unicorn_cpu, type_):
    desc = SystemDescriptor(base=0xFFFFFE0000003000, limit=0x12345, type=type_, p=True, g=True)
    limit, rights = unicorn_cpu.lsl_lar(desc.to_bytes()[:8])
    assert limit == desc.effective_limit == 0x12345FFF
    assert rights is not None and rights & _ACCESS_RIGHTS == 0x00808000 | type_ << 8  # G, P, type


_HOST_PROBE = r"""
#include <stdio.h>
int main(void) {
    static const unsigned short sels[] = {0x23, 0x2b, 0x33};
    for (unsigned i = 0; i < sizeof sels / sizeof *sels; i++) {
        unsigned long sel = sels[i], lim = 0, ar = 0;
        unsigned char ok_lsl = 0, ok_lar = 0;
        __asm__ volatile("lsl %2, %0; setz %1" : "=r"(lim), "=q"(ok_lsl) : "r"(sel));
        __asm__ volatile("lar %2, %0; setz %1" : "=r"(ar), "=q"(ok_lar) : "r"(sel));
        printf("%#lx %d %#lx %d %#lx\n", sel, ok_lsl, lim, ok_lar, ar);
    }
    return 0;
}
"""


def test_host_cpu_agrees_with_linux_gdt_constants(tmp_path):
    """LAR/LSL work at CPL3: the running kernel's user segments match the constants above."""
    cc = shutil.which("cc") or pytest.skip("no C compiler")
    src, exe = tmp_path / "probe.c", tmp_path / "probe"
    src.write_text(_HOST_PROBE)
    subprocess.run([cc, "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    expected = {
        0x23: SegmentDescriptor.from_int(0x00CFFB000000FFFF),  # __USER32_CS
        0x2B: SegmentDescriptor.from_int(0x00CFF3000000FFFF),  # __USER_DS
        0x33: SegmentDescriptor.from_int(0x00AFFB000000FFFF),  # __USER_CS
    }
    seen = {}
    for line in out.splitlines():
        sel, ok_lsl, lim, ok_lar, ar = (int(x, 0) for x in line.split())
        assert ok_lsl == ok_lar == 1
        seen[sel] = (lim, ar & _ACCESS_RIGHTS)
    for sel, desc in expected.items():
        assert Selector.from_int(sel).rpl == 3
        assert seen[sel] == (desc.effective_limit, _access_rights(desc)), hex(sel)
