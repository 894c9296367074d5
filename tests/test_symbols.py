"""Tests for kctx_debug.symbols against independent truth.

Oracles: this machine's /proc/kallsyms parsed here with plain ``str.split`` (never the module's
parser), GNU ``nm`` on binaries compiled by gcc during the test, hand-written tables whose
answers follow from the documented lookup rules, and synthetic 200k-symbol tables.
"""

from __future__ import annotations

import bisect
import doctest
import random
import re
import shutil
import struct
import subprocess
from collections import Counter, defaultdict
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

import kctx_debug.symbols as symbols_module
from kctx_debug.errors import SymbolError
from kctx_debug.symbols import (
    DEFAULT_MAX_DISTANCE,
    Symbol,
    SymbolHit,
    SymbolTable,
    load_symbols,
)

KALLSYMS = Path("/proc/kallsyms")

# -- this machine's /proc/kallsyms ------------------------------------------------------------


@pytest.fixture(scope="module")
def kallsyms_text() -> str:
    try:
        text = KALLSYMS.read_text()
    except OSError as exc:
        pytest.skip(f"cannot read {KALLSYMS}: {exc}")
    if not any(int(line.split()[0], 16) for line in text.splitlines() if line.strip()):
        pytest.skip(f"{KALLSYMS} addresses are all zero (kptr_restrict or not root)")
    return text


@pytest.fixture(scope="module")
def kallsyms_rows(kallsyms_text: str) -> list[tuple[int, str, str, str | None]]:
    """(address, type, name, module) per line, parsed independently of the module."""
    rows = []
    for line in kallsyms_text.splitlines():
        parts = line.split()
        module = parts[3].strip("[]") if len(parts) == 4 else None
        rows.append((int(parts[0], 16), parts[1], parts[2], module))
    return rows


@pytest.fixture(scope="module")
def kallsyms_table(kallsyms_text: str) -> SymbolTable:
    return load_symbols(KALLSYMS)


def test_kallsyms_every_symbol_is_loaded(kallsyms_rows, kallsyms_table):
    assert len(kallsyms_table) == len(kallsyms_rows)
    expected = Counter(kallsyms_rows)
    got = Counter((s.address, s.type, s.name, s.module) for s in kallsyms_table)
    assert got == expected
    addresses = [s.address for s in kallsyms_table]
    assert addresses == sorted(addresses)


def test_kallsyms_lookup_at_every_distinct_address(kallsyms_rows, kallsyms_table):
    at: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for address, kind, name, _module in kallsyms_rows:
        if kind not in "AaUwv":
            at[address].append((kind, name))
    for address, candidates in at.items():
        hit = kallsyms_table.lookup(address)
        assert hit is not None and hit.offset == 0 and hit.symbol.address == address
        # Documented alias rule: global, text, (sizes all unknown), shorter name, name.
        rank = {(k, n): (k.islower(), k not in "Tt", len(n), n) for k, n in candidates}
        assert (hit.symbol.type, hit.symbol.name) == min(candidates, key=rank.__getitem__)


def test_kallsyms_lookup_inside_gaps(kallsyms_rows, kallsyms_table):
    distinct = sorted({a for a, kind, _, _ in kallsyms_rows if kind not in "AaUwv"})
    assert kallsyms_table.lookup(distinct[0] - 1) is None
    step = max(1, len(distinct) // 5000)
    checked = 0
    for index in range(0, len(distinct) - 1, step):
        address, following = distinct[index], distinct[index + 1]
        gap = following - address
        for k in sorted({1, gap // 2, gap - 1}):
            if 0 < k <= DEFAULT_MAX_DISTANCE:
                hit = kallsyms_table.lookup(address + k)
                assert hit is not None
                assert (hit.symbol.address, hit.offset) == (address, k)
                checked += 1
        if gap > DEFAULT_MAX_DISTANCE + 1:
            assert kallsyms_table.lookup(address + DEFAULT_MAX_DISTANCE + 1) is None
    assert checked > 4000


def test_kallsyms_address_of_every_name(kallsyms_rows, kallsyms_table):
    definitions: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for address, kind, name, _module in kallsyms_rows:
        definitions[name].append((address, kind))
    ambiguous = 0
    for name, found in definitions.items():
        preferred = {a for a, kind in found if kind.isupper()} or {a for a, _ in found}
        if len(preferred) == 1:
            assert kallsyms_table.address(name) == preferred.pop()
        else:
            ambiguous += 1
            with pytest.raises(SymbolError, match=f"^ambiguous symbol '{re.escape(name)}'"):
                kallsyms_table.address(name)
        assert name in kallsyms_table
    assert ambiguous < len(definitions) // 10


def test_kallsyms_module_symbols_and_prefixes(kallsyms_rows, kallsyms_table):
    for address, _kind, _name, module in kallsyms_rows:
        if module is not None:
            hit = kallsyms_table.lookup(address)
            assert hit is not None and hit.symbol.module is not None
            assert str(hit).endswith(f" [{hit.symbol.module}]")
    names = sorted({name for _, _, name, _ in kallsyms_rows})
    for prefix in ("__x64_sys_", "sys_", "_text", "zz_no_such_symbol_", "a"):
        expected = [n for n in names if n.startswith(prefix)]
        assert kallsyms_table.names_with_prefix(prefix) == expected
        assert kallsyms_table.names_with_prefix(prefix, limit=3) == expected[:3]


# -- ELF files checked against GNU nm ---------------------------------------------------------

C_SOURCE = r"""
#include <stdio.h>
int global_counter = 42;
static int static_counter = 7;
const char greeting[] = "hello";
int zeroed[64];
static char buffer[128];
static int helper(int x) { return x * 3 + static_counter; }
int add(int a, int b) { return a + b + helper(a); }
__attribute__((weak)) int weak_fn(void) { return 1; }
__attribute__((weak)) int weak_obj = 5;
void aliased(void) {}
void alias2(void) __attribute__((alias("aliased")));
__asm__(
    ".text\n"
    ".globl gap_fn\n.type gap_fn, @function\n"
    "gap_fn: nop\n nop\n nop\n ret\n.size gap_fn, 4\n"
    ".skip 12, 0xcc\n"
    ".globl after_gap\n.type after_gap, @function\n"
    "after_gap: ret\n.size after_gap, 1\n");
int main(void) {
    buffer[0] = 1;
    printf("%s %d\n", greeting, add(global_counter, zeroed[0]) + weak_fn() + weak_obj);
    return buffer[0];
}
"""


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    for tool in ("gcc", "nm", "strip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    work = tmp_path_factory.mktemp("elf")
    (work / "prog.c").write_text(C_SOURCE)
    _run("gcc", "-O0", "-o", str(work / "prog"), str(work / "prog.c"))
    _run("gcc", "-O0", "-shared", "-fPIC", "-o", str(work / "lib.so"), str(work / "prog.c"))
    _run("strip", "--strip-all", "-o", str(work / "stripped.so"), str(work / "lib.so"))
    return {"prog": work / "prog", "stripped": work / "stripped.so", "dir": work}


def _nm(*args: str) -> Counter[tuple[str, int, int, str]]:
    """(name, address, size, letter) of every defined symbol, from ``nm -S``."""
    rows: Counter[tuple[str, int, int, str]] = Counter()
    for line in _run("nm", "-S", "--defined-only", *args).splitlines():
        parts = line.split()
        size = int(parts[1], 16) if len(parts) == 4 else 0
        rows[(parts[-1], int(parts[0], 16), size, parts[-2])] += 1
    return rows


def _table_rows(table: SymbolTable) -> Counter[tuple[str, int, int, str]]:
    return Counter((s.name, s.address, s.size, s.type) for s in table)


def test_from_elf_matches_nm(built):
    expected = _nm(str(built["prog"]))
    assert len(expected) > 30
    table = SymbolTable.from_elf(built["prog"])
    assert _table_rows(table) == expected
    assert _table_rows(load_symbols(str(built["prog"]))) == expected


def test_from_elf_falls_back_to_dynsym(built):
    expected = _nm("-D", str(built["stripped"]))
    assert {name for name, *_ in expected} >= {"add", "gap_fn", "zeroed", "weak_obj"}
    assert _table_rows(SymbolTable.from_elf(built["stripped"])) == expected


def test_elf_lookup_respects_sizes(built):
    nm_rows = {name: (address, size) for name, address, size, _ in _nm(str(built["prog"]))}
    table = SymbolTable.from_elf(built["prog"])
    gap_fn, gap_size = nm_rows["gap_fn"]
    assert gap_size == 4 and nm_rows["after_gap"][0] == gap_fn + 16
    assert str(table.lookup(gap_fn + 3)) == "gap_fn+0x3"
    for inside_padding in range(gap_fn + 4, gap_fn + 16):
        assert table.lookup(inside_padding) is None
    assert table.format_address(gap_fn + 4) == f"{gap_fn + 4:#x}"
    assert str(table.lookup(gap_fn + 16)) == "after_gap"
    add, add_size = nm_rows["add"]
    hit = table.lookup(add + add_size - 1)
    assert hit == SymbolHit(Symbol("add", add, add_size, "T"), add_size - 1)
    # Aliases: both global text with the same size, so the shorter name represents them.
    assert nm_rows["alias2"][0] == nm_rows["aliased"][0]
    assert table.lookup(nm_rows["aliased"][0]).symbol.name == "alias2"
    assert table.address("aliased") == nm_rows["aliased"][0]


# -- malformed input --------------------------------------------------------------------------

GOOD = "ffffffff81000000 T _text\nffffffff81000010 t helper\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "ffffffff81000020 T\n", ":3: expected 'ADDRESS TYPE NAME [[module]]'"),
        (GOOD + "\n\nzzzz T foo\n", ":5: bad address 'zzzz' (expected 64-bit hex)"),
        ("-10 T foo\n", ":1: bad address '-10'"),
        ("1ffffffff81000000 T big\n", ":1: bad address '1ffffffff81000000'"),
        (GOOD + "ffffffff81000020 TT foo\n", ":3: bad type 'TT' (expected one letter)"),
        (GOOD + "ffffffff81000020 t foo\tmodname\n", ":3: expected '[module]', got 'modname'"),
        (GOOD + "ffffffff81000020 t foo [a] extra\n", ":3: expected 'ADDRESS TYPE NAME"),
        ("\n  \n", ": no symbols found"),
    ],
)
def test_malformed_kallsyms_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "kallsyms"
    path.write_text(text)
    with pytest.raises(SymbolError) as info:
        SymbolTable.from_kallsyms(path)
    assert str(info.value).startswith(f"{path}{message}")


def test_system_map_rejects_module_field(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(GOOD + "ffffffff81000020 t foo\t[mod]\n")
    with pytest.raises(SymbolError, match=r"System\.map:3: expected 'ADDRESS TYPE NAME', got "):
        SymbolTable.from_system_map(path)
    assert SymbolTable.from_system_map(GOOD).address("helper") == 0xFFFFFFFF81000010


def test_hidden_kallsyms_addresses(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _text\n0000000000000000 t helper\t[mod]\n")
    with pytest.raises(SymbolError, match="kptr_restrict") as info:
        load_symbols(path)
    assert str(info.value).startswith(f"{path}: all 2 symbol addresses are zero")


def test_unreadable_or_wrong_files(tmp_path):
    missing = tmp_path / "nope.map"
    for loader in (load_symbols, SymbolTable.from_kallsyms, SymbolTable.from_elf):
        with pytest.raises(SymbolError, match=f"^{missing}: symbol file not found$"):
            loader(missing)
    binary = tmp_path / "blob"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SymbolError, match=f"^{binary}: not a text symbol file"):
        load_symbols(binary)
    with pytest.raises(SymbolError, match=f"^{tmp_path}: cannot read symbol file"):
        load_symbols(tmp_path)


def _elf_header(shoff: int = 0, shnum: int = 0) -> bytes:
    """A little-endian ELF64 x86-64 executable header (ELF gABI field order)."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, shnum, 0)


def test_malformed_elf_files(tmp_path, built):
    no_sections = tmp_path / "nosyms.elf"
    no_sections.write_bytes(_elf_header())
    with pytest.raises(SymbolError, match=r"has no \.symtab or \.dynsym"):
        load_symbols(no_sections)
    dangling = tmp_path / "dangling.elf"
    dangling.write_bytes(_elf_header(shoff=0x10000, shnum=5))
    with pytest.raises(SymbolError, match=f"^{dangling}: malformed ELF file"):
        load_symbols(dangling)
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes(built["prog"].read_bytes()[:40])
    with pytest.raises(SymbolError, match=f"^{truncated}: malformed ELF file"):
        SymbolTable.from_elf(truncated)


@pytest.mark.parametrize(
    "bad",
    [
        Symbol("", 0x1000),
        Symbol("neg", -1),
        Symbol("huge", 2**64),
        Symbol("size", 0x1000, -4),
        Symbol("kind", 0x1000, 0, "TT"),
        Symbol("text_address", "0x1000"),  # type: ignore[arg-type]
        Symbol("float_address", 4096.0),  # type: ignore[arg-type]
        Symbol("module", 0x1000, 0, "t", 7),  # type: ignore[arg-type]
    ],
)
def test_invalid_entries(bad):
    with pytest.raises(SymbolError, match="invalid symbol"):
        SymbolTable.from_entries([Symbol("ok", 0x10), bad])


# -- lookup rules on hand-built tables --------------------------------------------------------


def test_sizes_and_max_distance():
    table = SymbolTable.from_entries(
        [Symbol("f", 0x1000, 0x10), Symbol("g", 0x2000)], max_distance=0x100
    )
    assert table.lookup(0xFFF) is None
    assert table.lookup(0x100F) == SymbolHit(Symbol("f", 0x1000, 0x10), 0xF)
    assert table.lookup(0x1010) is None
    assert table.lookup(0x2100) == SymbolHit(Symbol("g", 0x2000), 0x100)
    assert table.lookup(0x2101) is None
    assert (
        SymbolTable.from_entries([Symbol("g", 0)]).max_distance == DEFAULT_MAX_DISTANCE == 1 << 20
    )
    for bad in (-1, 0.5):
        with pytest.raises(SymbolError, match="max_distance must be an integer >= 0"):
            SymbolTable.from_entries([], max_distance=bad)  # type: ignore[arg-type]


def test_empty_table():
    table = SymbolTable.from_entries([])
    assert len(table) == 0 and list(table) == []
    assert table.lookup(0) is None and table.lookup(2**64 - 1) is None
    assert table.names_with_prefix("") == [] and table.get("x") is None
    assert table.format_address(0x10) == "0x10"


def test_alias_preference_is_deterministic():
    at = 0xFFFFFFFF81000000
    entries = [
        Symbol("local_text", at, 0, "t"),
        Symbol("global_data", at, 0, "D"),
        Symbol("zz_global_text", at, 0, "T"),
        Symbol("sized", at, 8, "T"),
        Symbol("bb", at, 8, "T"),
        Symbol("aa", at, 8, "T"),
    ]
    expected_order = ["aa", "bb", "sized", "zz_global_text", "global_data", "local_text"]
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(entries)
        table = SymbolTable.from_entries(entries)
        assert [s.name for s in table] == expected_order
        assert str(table.lookup(at + 5)) == "aa+0x5"


def test_absolute_symbols_are_not_locations():
    table = SymbolTable.from_kallsyms(
        "0000000000001000 A ABS_VALUE\n0000000000000800 t code\n0000000000001000 U undefined\n"
    )
    assert str(table.lookup(0x1000)) == "code+0x800"
    assert table.address("ABS_VALUE") == 0x1000
    moved = table.relocated(0x10000)
    assert moved.address("ABS_VALUE") == 0x1000
    assert moved.address("code") == 0x10800


def test_hit_and_address_formatting():
    table = SymbolTable.from_kallsyms(
        "ffffffff81000000 T _text\nffffffffc0001000 t mod_fn\t[mymod]\n"
    )
    assert str(table.lookup(0xFFFFFFFF81000000)) == "_text"
    assert str(table.lookup(0xFFFFFFFF81000010)) == "_text+0x10"
    assert str(table.lookup(0xFFFFFFFFC0001010)) == "mod_fn+0x10 [mymod]"
    assert table.format_address(0xFFFFFFFF81000010) == "0xffffffff81000010 <_text+0x10>"
    assert table.format_address(0x1234) == "0x1234"
    assert table.get("mod_fn") == Symbol("mod_fn", 0xFFFFFFFFC0001000, 0, "t", "mymod")


def test_duplicate_names():
    table = SymbolTable.from_entries(
        [
            Symbol("dup_static", 0x3000, 0, "t"),
            Symbol("dup_static", 0x1000, 0, "t"),
            Symbol("mixed", 0x5000, 0, "t"),
            Symbol("mixed", 0x6000, 0, "T"),
            Symbol("same_place", 0x7000, 0, "t"),
            Symbol("same_place", 0x7000, 0, "d"),
        ]
    )
    with pytest.raises(SymbolError) as info:
        table.address("dup_static")
    assert (
        str(info.value) == "ambiguous symbol 'dup_static': defined at 2 addresses (0x1000, 0x3000)"
    )
    assert table.get("dup_static") == Symbol("dup_static", 0x1000, 0, "t")
    assert [s.address for s in table.get_all("dup_static")] == [0x1000, 0x3000]
    assert table.address("mixed") == 0x6000
    assert table.get("mixed") == Symbol("mixed", 0x6000, 0, "T")
    assert table.address("same_place") == 0x7000
    with pytest.raises(SymbolError) as info:
        table.address("foo")
    assert str(info.value) == "unknown symbol 'foo'"
    assert table.get("foo") is None and table.get_all("foo") == ()
    assert "foo" not in table and "mixed" in table


def test_relocated_merged_and_immutable():
    base = SymbolTable.from_entries([Symbol("f", 0x1000, 0x10), Symbol("g", 0x2000)])
    slid = base.relocated(0x20000000)
    assert slid.address("f") == 0x20001000 and base.address("f") == 0x1000
    assert str(slid.lookup(0x20001004)) == "f+0x4"
    with pytest.raises(SymbolError, match="address space"):
        base.relocated(-0x1001)
    with pytest.raises(SymbolError, match="address space"):
        base.relocated(2**64)
    extra = SymbolTable.from_entries(
        [Symbol("g", 0x2000, 0x40, "T"), Symbol("h", 0x3000), Symbol("g", 0x2000, 0, "t", "m")]
    )
    merged = base.merged(extra)
    assert [(s.name, s.address, s.size, s.module) for s in merged] == [
        ("f", 0x1000, 0x10, None),
        ("g", 0x2000, 0x40, None),
        ("g", 0x2000, 0, "m"),
        ("h", 0x3000, 0, None),
    ]
    assert len(SymbolTable.combine([base, base, base])) == 2
    with pytest.raises(AttributeError):
        base.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(FrozenInstanceError):
        Symbol("f", 1).address = 2  # type: ignore[misc]


def test_text_and_path_sources(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(GOOD)
    for source in (path, str(path), GOOD):
        table = SymbolTable.from_system_map(source)
        assert [(s.name, s.address, s.type) for s in table] == [
            ("_text", 0xFFFFFFFF81000000, "T"),
            ("helper", 0xFFFFFFFF81000010, "t"),
        ]


# -- scale --------------------------------------------------------------------------------------


def test_200k_symbols():
    rng = random.Random(2024)
    count = 200_000
    sizes = rng.choices((0, 0x10, 0x40), k=count)
    gaps = rng.choices((0x10, 0x30), k=count)  # always a gap past a sized symbol
    kinds = rng.choices("TtDdBbRr", k=count)
    entries, address = [], 0xFFFFFFFF81000000
    for i in range(count):
        entries.append(Symbol(f"sym_{i:06d}", address, sizes[i], kinds[i]))
        address += sizes[i] + gaps[i]
    shuffled = entries[:]
    rng.shuffle(shuffled)
    table = SymbolTable.from_entries(shuffled)
    parsed = SymbolTable.from_kallsyms(
        "".join(f"{s.address:x} {s.type} {s.name}\n" for s in shuffled)
    )
    assert len(table) == len(parsed) == count
    starts = [s.address for s in entries]
    for sym in entries[::13]:
        assert table.lookup(sym.address) == SymbolHit(sym, 0)
        if sym.size:
            assert table.lookup(sym.address + sym.size - 1) == SymbolHit(sym, sym.size - 1)
            assert table.lookup(sym.address + sym.size) is None
        else:
            following = starts[bisect.bisect_right(starts, sym.address)]
            assert table.lookup(following - 1) == SymbolHit(sym, following - 1 - sym.address)
        assert table.address(sym.name) == sym.address
        assert parsed.get(sym.name) == Symbol(sym.name, sym.address, 0, sym.type)
    assert table.names_with_prefix("sym_19999") == [f"sym_{i}" for i in range(199990, 200000)]


# -- documentation ------------------------------------------------------------------------------


def test_docstring_examples_and_exports():
    result = doctest.testmod(symbols_module)
    assert result.attempted >= 8 and result.failed == 0
    for name in symbols_module.__all__:
        assert hasattr(symbols_module, name)
