"""Disassembly of hand-assembled bytes: exact Intel and AT&T text, symbols, clean stops.

Every encoding and target below was worked out by hand from the SDM vol. 2 opcode
tables: ``E8 rel32`` targets the next instruction's address plus rel32, ``REX.W 8B /r``
with ModRM 05 is RIP + disp32 relative to the next instruction.
"""

from __future__ import annotations

import pytest

from kctx_debug.emulator.disasm import (
    DisassemblyError,
    Instruction,
    disassemble,
    format_instruction,
    read_instruction_bytes,
)
from kctx_debug.errors import UnbackedMemoryError
from kctx_debug.symbols import Symbol, SymbolTable

BASE = 0xFFFF_FFFF_8100_0000
PAGE = 0x1000
# 0x00 push rbp | 0x01 mov rbp, rsp | 0x04 call BASE+0x100 (rel32 = 0x100 - 0x09 = 0xf7)
# 0x09 mov rax, [rip + 0x1ff0] -> BASE+0x2000 (0x10 + 0x1ff0) | 0x10 ret
CODE = bytes.fromhex("55" "4889e5" "e8f7000000" "488b05f01f0000" "c3")  # fmt: skip
SYMBOLS = SymbolTable.from_entries(
    [
        Symbol("_start", BASE, 0x100, "T"),
        Symbol("printk", BASE + 0x100, 0x40, "T"),
        Symbol("jiffies", BASE + 0x2000, 8, "D"),
    ]
)


def reader(base: int, data: bytes):
    """A read_virtual over the pages holding ``data`` (zero-padded to whole pages).

    Like a page-table walk, any byte of another page raises, naming the first one.
    """
    first = base - base % PAGE
    image = bytes(base - first) + data
    image += bytes(-len(image) % PAGE)

    def read(va: int, size: int) -> bytes:
        for at in (va, va + size - 1):
            if not first <= at < first + len(image):
                raise UnbackedMemoryError(max(va, first + len(image)) if va >= first else va)
        return image[va - first : va - first + size]

    return read


def texts(listing) -> list[str]:
    return [insn.text for insn in listing]


def test_intel_text_with_symbols():
    listing = disassemble(reader(BASE, CODE), BASE, 5, SYMBOLS)
    assert texts(listing) == [
        "push rbp",
        "mov rbp, rsp",
        "call 0xffffffff81000100 <printk>",
        "mov rax, qword ptr [rip + 0x1ff0]  # 0xffffffff81002000 <jiffies>",
        "ret",
    ]
    assert [insn.address - BASE for insn in listing] == [0, 1, 4, 9, 0x10]
    assert listing.stop is None
    call, load = listing[2], listing[3]
    assert call.bytes == bytes.fromhex("e8f7000000")
    assert (call.mnemonic, call.op_str) == ("call", "0xffffffff81000100")
    assert call.target == BASE + 0x100 and call.is_call and call.next_address == BASE + 9
    assert load.memory_target == BASE + 0x2000 and load.target is None
    assert listing[4].is_return


def test_att_text():
    listing = disassemble(reader(BASE, CODE), BASE, 5, SYMBOLS, syntax="att")
    assert texts(listing) == [
        "pushq %rbp",
        "movq %rsp, %rbp",
        "callq 0xffffffff81000100 <printk>",
        "movq 0x1ff0(%rip), %rax  # 0xffffffff81002000 <jiffies>",
        "retq",
    ]


def test_without_symbols_targets_are_plain_hex():
    listing = disassemble(reader(BASE, CODE), BASE, 4)
    assert listing[2].text == "call 0xffffffff81000100"
    assert listing[3].text == "mov rax, qword ptr [rip + 0x1ff0]  # 0xffffffff81002000"


def test_symbol_offset_and_backward_branch():
    # jne rel8 -2 at BASE+0x104 loops on itself: 75 fe. Target printk+0x4.
    code = bytes(0x104) + bytes.fromhex("75fe")
    listing = disassemble(reader(BASE, code), BASE + 0x104, 1, SYMBOLS)
    assert listing[0].text == "jne 0xffffffff81000104 <printk+0x4>"
    assert listing[0].target == BASE + 0x104


def test_count_limits_output():
    listing = disassemble(reader(BASE, CODE), BASE, 2, SYMBOLS)
    assert texts(listing) == ["push rbp", "mov rbp, rsp"]
    assert listing.stop is None
    assert len(disassemble(reader(BASE, CODE), BASE, 0)) == 0


def test_stop_at_unmapped_between_instructions():
    # Two one-byte nops fill the page's end; the next page is unmapped.
    page = bytes(PAGE - 2) + b"\x90\x90"
    listing = disassemble(reader(BASE, page), BASE + PAGE - 2, 10)
    assert texts(listing) == ["nop", "nop"]
    assert listing.stop is not None
    assert listing.stop.address == BASE + PAGE
    assert "0xffffffff81001000" in listing.stop.reason


def test_stop_at_instruction_cut_by_unmapped_page():
    # nop, then 48 8b 05 .. whose disp32 lies on the unmapped next page.
    page = bytes(PAGE - 4) + bytes.fromhex("90488b05")
    listing = disassemble(reader(BASE, page), BASE + PAGE - 4, 10)
    assert texts(listing) == ["nop"]
    assert listing.stop.address == BASE + PAGE - 3
    assert listing.stop.reason.startswith(
        "instruction at 0xffffffff81000ffd runs into 0xffffffff81001000: "
    )


def test_start_on_unmapped_page():
    listing = disassemble(reader(BASE, CODE), BASE + 0x5000, 3)
    assert len(listing) == 0
    assert listing.stop.address == BASE + 0x5000
    assert str(listing.stop).startswith("stopped at 0xffffffff81005000: ")


def test_undecodable_byte_is_bad_and_decoding_continues():
    # 0x06 (push es) is invalid in 64-bit mode (SDM vol. 2 Table A-2, "i64").
    code = bytes.fromhex("06c3")
    listing = disassemble(reader(BASE, code + bytes(30)), BASE, 2)
    assert texts(listing) == ["(bad)", "ret"]
    assert listing[0].is_bad and listing[0].bytes == b"\x06"


def test_format_instruction_line():
    insn = disassemble(reader(BASE, CODE), BASE, 2)[1]
    assert format_instruction(insn, SYMBOLS) == (
        "0xffffffff81000001 <_start+0x1>:  48 89 e5              mov rbp, rsp"
    )
    first = disassemble(reader(BASE, CODE), BASE, 1)[0]
    assert format_instruction(first, SYMBOLS) == (
        "0xffffffff81000000 <_start>:  55                    push rbp"
    )
    assert format_instruction(first) == "0xffffffff81000000:  55                    push rbp"


def test_instruction_is_frozen():
    insn = disassemble(reader(BASE, CODE), BASE, 1)[0]
    assert isinstance(insn, Instruction)
    with pytest.raises(AttributeError):
        insn.address = 0  # type: ignore[misc]


def test_bad_requests():
    with pytest.raises(DisassemblyError, match="unknown syntax 'gas'"):
        disassemble(reader(BASE, CODE), BASE, 1, syntax="gas")
    with pytest.raises(DisassemblyError):
        disassemble(reader(BASE, CODE), BASE, -1)


def test_read_instruction_bytes_stops_at_an_unreadable_page():
    read = reader(BASE, CODE)  # one readable page at BASE
    assert read_instruction_bytes(read, BASE) == CODE[:15]
    # 4 bytes before the page's end: 15 would cross into the next page, so only 4 come back.
    assert read_instruction_bytes(read, BASE + PAGE - 4) == bytes(4)
    assert read_instruction_bytes(read, BASE + PAGE) == b""
