"""A small, safe expression language for breakpoint conditions and REPL arguments.

Values are unsigned 64-bit integers (arithmetic wraps, comparisons are unsigned,
truth values are 1 and 0). Operands: numbers (``0x10``, ``16``), registers
(``$rax``, ``$cr3``), symbols (``jiffies``, ``do_sys_open+0x10``), memory reads
``*(u8*)EXPR`` … ``*(u64*)EXPR`` (plain ``*EXPR`` reads a u64). Operators, loosest
first, as in C: ``||``, ``&&``, ``|``, ``^``, ``&``, ``== !=``, ``< <= > >=``,
``<< >>``, ``+ -``, ``* / %``, unary ``- ~ !`` and ``*``; parentheses group.

The text is parsed by hand into a tree of frozen dataclasses and evaluated by
walking it; nothing is ever handed to Python's ``eval``. Input is bounded (length
and nesting depth), and every mistake is a :class:`~kctx_debug.errors.CommandError`
that says where it is.

>>> env = MappingEnv(registers={"rax": 5}, symbols={"start": 0x1000})
>>> evaluate(parse_expression("$rax * 2 + start"), env) == 0x100A
True
>>> evaluate(parse_expression("$rax == 5 && !($rax & 1 == 0)"), env)
1
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kctx_debug.errors import CommandError, KctxError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Binary",
    "Deref",
    "Expr",
    "ExprEnv",
    "MappingEnv",
    "Number",
    "Register",
    "Symbol",
    "Unary",
    "describe_expression",
    "evaluate",
    "parse_expression",
]

MAX_LENGTH = 4096  # characters of expression text
MAX_DEPTH = 64  # nested operators/parentheses
_MASK = (1 << 64) - 1
_WIDTH = 64
# Memory-read casts: type name -> bytes read.
DEREF_SIZES: Mapping[str, int] = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}

# Binary operators by precedence level, loosest first (C's order).
_LEVELS: tuple[tuple[str, ...], ...] = (
    ("||",),
    ("&&",),
    ("|",),
    ("^",),
    ("&",),
    ("==", "!="),
    ("<", "<=", ">", ">="),
    ("<<", ">>"),
    ("+", "-"),
    ("*", "/", "%"),
)
_PRECEDENCE = {op: level for level, ops in enumerate(_LEVELS) for op in ops}
_UNARY = ("-", "~", "!", "*")

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>0[xX][0-9a-fA-F][0-9a-fA-F_]*|[0-9][0-9_]*)
  | (?P<register>\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<name>[A-Za-z_.][A-Za-z0-9_.@]*)
  | (?P<op>\|\||&&|==|!=|<=|>=|<<|>>|[-+*/%&|^~!<>()])
    """,
    re.VERBOSE,
)


# -- the tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: int


@dataclass(frozen=True)
class Register:
    name: str  # without the ``$``


@dataclass(frozen=True)
class Symbol:
    name: str


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Expr


@dataclass(frozen=True)
class Binary:
    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Deref:
    size: int  # bytes: 1, 2, 4 or 8
    address: Expr


Expr = Number | Register | Symbol | Unary | Binary | Deref


# -- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # number, register, name, op, end
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise CommandError(f"unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(_Token(kind, m.group(), pos))
        pos = m.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


@dataclass
class _Parser:
    """Precedence climbing; every method returns (tree, tree depth)."""

    tokens: list[_Token]
    at: int = 0
    nesting: int = 0  # parentheses and unary operators open (parser recursion)

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def expect(self, text: str) -> None:
        token = self.take()
        if token.text != text:
            found = f"{token.text!r}" if token.kind != "end" else "end of expression"
            raise CommandError(f"expected {text!r} at column {token.pos + 1}, found {found}")

    @staticmethod
    def _check(depth: int, token: _Token) -> int:
        # Bounds the parser's recursion and the evaluator's (it walks the tree).
        if depth > MAX_DEPTH:
            raise CommandError(
                f"expression nested too deeply (more than {MAX_DEPTH} levels) "
                f"at column {token.pos + 1}"
            )
        return depth

    def expression(self, min_level: int = 0) -> tuple[Expr, int]:
        left, depth = self.unary()
        while True:
            token = self.peek()
            level = _PRECEDENCE.get(token.text) if token.kind == "op" else None
            if level is None or level < min_level:
                return left, depth
            self.take()
            right, right_depth = self.expression(level + 1)
            depth = self._check(max(depth, right_depth) + 1, token)
            left = Binary(token.text, left, right)

    def unary(self) -> tuple[Expr, int]:
        token = self.peek()
        if not (token.kind == "op" and token.text in _UNARY):
            return self.primary()
        self.take()
        self.nesting = self._check(self.nesting + 1, token)
        size = self._cast() if token.text == "*" else 0
        operand, depth = self.unary()
        self.nesting -= 1
        node: Expr = Deref(size, operand) if token.text == "*" else Unary(token.text, operand)
        return node, self._check(depth + 1, token)

    def _cast(self) -> int:
        """``(uN*)`` after a ``*``, if present: the size it names (default 8)."""
        if self.peek().text != "(":
            return 8
        following = self.tokens[self.at + 1 : self.at + 4]
        if len(following) < 3:
            return 8
        name, star, close = following
        if name.kind == "name" and star.text == "*" and close.text == ")":
            if name.text not in DEREF_SIZES:
                raise CommandError(
                    f"unknown type {name.text!r} at column {name.pos + 1} "
                    f"(use {', '.join(DEREF_SIZES)})"
                )
            self.at += 4
            return DEREF_SIZES[name.text]
        return 8

    def primary(self) -> tuple[Expr, int]:
        token = self.take()
        if token.kind == "number":
            digits = token.text.replace("_", "")
            value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
            if value > _MASK:
                raise CommandError(f"number {token.text} at column {token.pos + 1} exceeds 64 bits")
            return Number(value), 1
        if token.kind == "register":
            return Register(token.text[1:].lower()), 1
        if token.kind == "name":
            if token.text in DEREF_SIZES:
                raise CommandError(
                    f"type {token.text!r} at column {token.pos + 1} must follow '*(' as in "
                    f"*({token.text}*)ADDRESS"
                )
            return Symbol(token.text), 1
        if token.text == "(":
            self.nesting = self._check(self.nesting + 1, token)
            inner = self.expression()
            self.expect(")")
            self.nesting -= 1
            return inner
        if token.kind == "end":
            raise CommandError("expression ends where an operand was expected")
        raise CommandError(f"expected an operand at column {token.pos + 1}, found {token.text!r}")


def parse_expression(text: str) -> Expr:
    """Parse ``text`` into a tree (no names are resolved yet).

    :raises CommandError: empty, too long, too deeply nested, or malformed text; the
        message gives the column.
    """
    if not isinstance(text, str):
        raise CommandError(f"expression must be text, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise CommandError(f"expression is {len(text)} characters long (at most {MAX_LENGTH})")
    if not text.strip():
        raise CommandError("empty expression")
    parser = _Parser(_tokenize(text))
    tree, _depth = parser.expression()
    token = parser.peek()
    if token.kind != "end":
        raise CommandError(f"unexpected {token.text!r} at column {token.pos + 1}")
    return tree


# -- evaluation -----------------------------------------------------------------------------


class ExprEnv(Protocol):
    """What an expression reads: registers, symbols and memory (each may raise KctxError)."""

    def register(self, name: str) -> int: ...
    def symbol(self, name: str) -> int: ...
    def read(self, address: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class MappingEnv:
    """An :class:`ExprEnv` over plain dicts and a read function (tests, the doctest)."""

    registers: Mapping[str, int] = field(default_factory=dict)
    symbols: Mapping[str, int] = field(default_factory=dict)
    reader: Callable[[int, int], bytes] | None = None

    def register(self, name: str) -> int:
        if name not in self.registers:
            raise CommandError(f"unknown register ${name}")
        return self.registers[name]

    def symbol(self, name: str) -> int:
        if name not in self.symbols:
            raise CommandError(f"unknown symbol {name!r}")
        return self.symbols[name]

    def read(self, address: int, size: int) -> bytes:
        if self.reader is None:
            raise CommandError(f"cannot read memory at {address:#x}: no memory")
        return self.reader(address, size)


def _compare(op: str, a: int, b: int) -> int:
    return int({"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])


def _arith(op: str, a: int, b: int) -> int:
    if op in ("/", "%") and b == 0:
        raise CommandError(f"division by zero in '{op}'")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b
    if op == "%":
        return a % b
    if op in ("<<", ">>"):
        if not 0 <= b < _WIDTH:
            signed = b - (1 << _WIDTH) if b >> (_WIDTH - 1) == 1 and b <= _MASK else b
            raise CommandError(f"shift count {signed} is outside 0-{_WIDTH - 1}")
        return a << b if op == "<<" else a >> b
    if op == "&":
        return a & b
    if op == "|":
        return a | b
    if op == "^":
        return a ^ b
    return _compare(op, a, b)


def evaluate(expr: Expr, env: ExprEnv) -> int:
    """The unsigned 64-bit value of ``expr`` (``&&``/``||`` short-circuit).

    :raises CommandError: an unknown register or symbol, unreadable memory, division
        by zero (any :class:`KctxError` from ``env`` becomes a CommandError).
    """
    try:
        return _eval(expr, env) & _MASK
    except CommandError:
        raise
    except KctxError as e:
        raise CommandError(str(e)) from None


def _eval(expr: Expr, env: ExprEnv) -> int:
    if isinstance(expr, Number):
        return expr.value
    if isinstance(expr, Register):
        return env.register(expr.name) & _MASK
    if isinstance(expr, Symbol):
        return env.symbol(expr.name) & _MASK
    if isinstance(expr, Deref):
        address = _eval(expr.address, env) & _MASK
        data = env.read(address, expr.size)
        if len(data) != expr.size:
            raise CommandError(f"cannot read {expr.size} bytes at {address:#x}")
        return int.from_bytes(data, "little")
    if isinstance(expr, Unary):
        value = _eval(expr.operand, env) & _MASK
        if expr.op == "-":
            return -value & _MASK
        if expr.op == "~":
            return ~value & _MASK
        return int(value == 0)
    assert isinstance(expr, Binary)
    left = _eval(expr.left, env) & _MASK
    if expr.op == "&&":
        return int(bool(left) and bool(_eval(expr.right, env) & _MASK))
    if expr.op == "||":
        return int(bool(left) or bool(_eval(expr.right, env) & _MASK))
    return _arith(expr.op, left, _eval(expr.right, env) & _MASK) & _MASK


def describe_expression(expr: Expr) -> str:
    """The expression fully parenthesized, e.g. ``(($rax + 1) == *(u32*)(sym + 0x10))``."""
    if isinstance(expr, Number):
        return f"{expr.value:#x}"
    if isinstance(expr, Register):
        return f"${expr.name}"
    if isinstance(expr, Symbol):
        return expr.name
    if isinstance(expr, Deref):
        return f"*(u{expr.size * 8}*){describe_expression(expr.address)}"
    if isinstance(expr, Unary):
        return f"{expr.op}{describe_expression(expr.operand)}"
    return f"({describe_expression(expr.left)} {expr.op} {describe_expression(expr.right)})"
