"""The condition expression language: values as C computes them on uint64_t, and
hostile input rejected with a CommandError that names the problem (no eval, bounded
length and depth)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kctx_debug.errors import CommandError, KctxError
from kctx_debug.traps.expr import (
    MAX_DEPTH,
    MAX_LENGTH,
    Binary,
    Deref,
    MappingEnv,
    Number,
    Register,
    Symbol,
    describe_expression,
    evaluate,
    parse_expression,
)

MASK = 2**64 - 1
MEMORY = {0x1000: bytes(range(1, 9)), 0x2000: (0xFFFF_FFFF_FFFF_FFFE).to_bytes(8, "little")}


def read(address: int, size: int) -> bytes:
    for base, data in MEMORY.items():
        if base <= address and address + size <= base + len(data):
            return data[address - base : address - base + size]
    raise KctxError(f"cannot read {size} bytes at {address:#x}")


ENV = MappingEnv(
    registers={"rax": 5, "rbx": 0x1000, "rsp": 0x2000, "cr3": 0x10_0000},
    symbols={"jiffies": 0x1000, "table.cold": 0x2000},
    reader=read,
)


def value(text: str) -> int:
    return evaluate(parse_expression(text), ENV)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x10 + 16", 32),
        ("1_000", 1000),
        ("$rax * 3 - 1", 14),
        ("$RAX", 5),
        ("jiffies+0x10", 0x1010),
        ("table.cold", 0x2000),
        ("1 + 2 * 3", 7),  # * binds tighter than +
        ("(1 + 2) * 3", 9),
        ("1 << 4 + 1", 32),  # + binds tighter than <<
        ("7 & 3 == 3", 7 & (3 == 3)),  # == binds tighter than &, as in C
        ("6 ^ 3 | 8", (6 ^ 3) | 8),
        ("-1", MASK),
        ("~0", MASK),
        ("!0 + !5", 1),
        ("0 - 1 > 5", 1),  # unsigned: 2**64 - 1 > 5
        ("17 / 5 * 5 + 17 % 5", 17),
        ("1 << 63", 1 << 63),
        ("$cr3 >> 12", 0x100),
        ("*(u8*)jiffies", 1),
        ("*(u16*)$rbx", 0x0201),
        ("*(u32*)(jiffies + 4)", 0x08070605),
        ("*(u64*)jiffies", 0x0807060504030201),
        ("*$rsp + 2", 0),  # plain * reads a u64; wraps
        ("*(u8*)jiffies == 1 && $rax >= 5", 1),
        ("$rax < 5 || $rax <= 5", 1),
        ("$rax != 5", 0),
        ("0 && *(u64*)0xdead", 0),  # short-circuit: no read
        ("1 || 1 / 0", 1),
    ],
)
def test_values(text, expected):
    assert value(text) == expected


def test_tree_and_description():
    tree = parse_expression("*(u32*)(jiffies + 0x10) == $rax")
    assert tree == Binary(
        "==", Deref(4, Binary("+", Symbol("jiffies"), Number(0x10))), Register("rax")
    )
    assert describe_expression(tree) == "(*(u32*)(jiffies + 0x10) == $rax)"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1 +", "operand was expected"),
        ("(1 + 2", r"expected '\)' at column 7"),
        ("1 2", "unexpected '2' at column 3"),
        ("1 @ 2", "unexpected character '@' at column 3"),
        ("__import__('os')", "unexpected character"),
        ("$rax; import os", "unexpected character ';'"),
        ("0x", "unexpected 'x'"),
        ("*(u128*)0", "unknown type 'u128'"),
        ("u8", "must follow"),
        ("99999999999999999999999", "exceeds 64 bits"),
        ("(" * 100 + "1" + ")" * 100, "nested too deeply"),
        ("-" * 100 + "1", "nested too deeply"),
        ("+".join(["1"] * 100), "nested too deeply"),
        ("1" * (MAX_LENGTH + 1), "characters long"),
    ],
)
def test_malformed_input_is_a_command_error(text, match):
    with pytest.raises(CommandError, match=match):
        parse_expression(text)


def test_depth_limit_is_exact():
    parse_expression("(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1))
    with pytest.raises(CommandError):
        parse_expression("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("$rzz", r"unknown register \$rzz"),
        ("nosuch + 1", "unknown symbol 'nosuch'"),
        ("*(u64*)0xdead", "cannot read 8 bytes at 0xdead"),
        ("1 / ($rax - 5)", "division by zero"),
        ("1 % 0", "division by zero"),
        ("1 << 64", "shift count 64 is outside 0-63"),
        ("1 >> 100", "shift count 100 is outside 0-63"),
        ("1 << -1", "shift count -1 is outside 0-63"),
    ],
)
def test_evaluation_errors(text, match):
    with pytest.raises(CommandError, match=match):
        value(text)


def test_not_text():
    with pytest.raises(CommandError):
        parse_expression(b"1")  # type: ignore[arg-type]


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_command_error(text):
    try:
        tree = parse_expression(text)
    except CommandError:
        return
    try:
        result = evaluate(tree, ENV)
    except CommandError:
        return
    assert 0 <= result <= MASK


@given(st.integers(0, MASK), st.integers(0, MASK))
def test_arithmetic_matches_uint64(a, b):
    assert value(f"{a} + {b}") == (a + b) & MASK
    assert value(f"{a:#x} - {b:#x}") == (a - b) & MASK
    assert value(f"{a} * {b}") == (a * b) & MASK
    assert value(f"{a} < {b}") == int(a < b)
    assert value(f"{a} ^ {b}") == a ^ b
