"""The REPL's command language: registry lookup and parsing, x/NFU, repeat, help, docs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kctx_debug.errors import CommandError
from kctx_debug.repl import docs
from kctx_debug.repl.commands import default_registry
from kctx_debug.repl.dispatch import parse_int, parse_vector
from kctx_debug.repl.formats import XFormat, format_string, format_units, parse_format
from kctx_debug.repl.output import Printer, want_color
from kctx_debug.repl.registry import Arg, ArgKind, Command, CommandRegistry, Flag
from kctx_debug.repl.styled import Styled

REGISTRY = default_registry()


def _cmd(name: str, *args: Arg, flags: tuple[Flag, ...] = (), aliases=()) -> Command:
    return Command(name, "s", "", (name,), run=lambda s, a: None, args=args, flags=flags,
                   aliases=aliases)  # fmt: skip


# -- lookup -------------------------------------------------------------------------------


def test_unique_prefixes_of_each_word_find_the_command():
    assert REGISTRY.parse("info reg rip").command.name == "info registers"
    assert REGISTRY.parse("i r").command.name == "info registers"
    assert REGISTRY.parse("info b").command.name == "info breakpoints"
    assert REGISTRY.parse("disas").command.name == "disassemble"
    assert REGISTRY.parse("pt w $rip").command.name == "pt walk"
    assert REGISTRY.parse("si").command.name == "stepi"
    assert REGISTRY.parse("c").command.name == "continue"


def test_exact_word_wins_over_longer_names():
    # "x" is a command and a prefix of "xp".
    assert REGISTRY.parse("x/4gx $rsp").command.name == "x"
    assert REGISTRY.parse("xp/4gx 0").command.name == "xp"


def test_ambiguous_and_unknown_commands_say_so():
    with pytest.raises(CommandError, match="ambiguous command 'info t': info traps, info tss"):
        REGISTRY.parse("info t")
    with pytest.raises(CommandError, match="unknown command 'frobnicate'"):
        REGISTRY.parse("frobnicate")
    with pytest.raises(CommandError, match="'pt' needs a subcommand: check, dump, find, walk"):
        REGISTRY.parse("pt")


def test_format_suffix_only_where_declared():
    line = REGISTRY.parse("x/8gx $rsp")
    assert (line.suffix, line.values) == ("/8gx", {"expr": "$rsp"})
    with pytest.raises(CommandError, match="info cpu takes no /FMT suffix"):
        REGISTRY.parse("info/x cpu")


# -- arguments ----------------------------------------------------------------------------


def test_last_expression_takes_the_rest_of_the_line():
    reg = CommandRegistry([_cmd("p", Arg("expr", ArgKind.EXPR, "e"))])
    assert reg.parse("p $rsp + 8 * (2 + 1)").values == {"expr": "$rsp + 8 * (2 + 1)"}


def test_flags_anywhere_and_with_values():
    json = Flag("json", "j")
    access = Flag("access", "a", "SPEC")
    reg = CommandRegistry([_cmd("walk", Arg("expr", ArgKind.EXPR, "e"), flags=(json, access))])
    line = reg.parse("walk --json $rip + 1 --access write,user")
    assert line.values == {"expr": "$rip + 1"}
    assert line.flags == {"json": True, "access": "write,user"}
    with pytest.raises(CommandError, match="unknown option --jsn"):
        reg.parse("walk $rip --jsn")
    with pytest.raises(CommandError, match="--access needs a value"):
        reg.parse("walk $rip --access")


def test_missing_and_extra_arguments_show_usage():
    reg = CommandRegistry([_cmd("until", Arg("where", ArgKind.LOCATION, "w"))])
    with pytest.raises(CommandError, match=r"missing WHERE \(usage: until WHERE\)"):
        reg.parse("until")
    reg = CommandRegistry([_cmd("stepi", Arg("n", ArgKind.INT, "n", optional=True))])
    with pytest.raises(CommandError, match="unexpected '2 3'"):
        reg.parse("stepi 1 2 3")


def test_choices_accept_unique_prefixes():
    policy = Arg("policy", ArgKind.WORD, "p", choices=("stop", "deliver"))
    reg = CommandRegistry([_cmd("pol", Arg("v", ArgKind.VECTOR, "v"), policy)])
    assert reg.parse("pol 3 del").values == {"v": "3", "policy": "deliver"}
    with pytest.raises(CommandError, match="'x' is not one of stop, deliver"):
        reg.parse("pol 3 x")


def test_literals_and_vector_names():
    assert [parse_int(t) for t in ("16", "0x10", "0o20", "0b10000", "1_0")] == [16] * 4 + [10]
    # SDM vol. 3A Table 6-1.
    assert [parse_vector(t) for t in ("#PF", "pf", "nmi", "#DF", "0x20", "255")] == [
        14, 14, 2, 8, 32, 255,
    ]  # fmt: skip
    with pytest.raises(CommandError, match="outside 0-255"):
        parse_vector("256")


def test_registry_rejects_duplicates_and_commands_without_examples():
    with pytest.raises(ValueError, match="declared twice"):
        CommandRegistry([_cmd("a"), _cmd("a")])
    with pytest.raises(ValueError, match="alias 'b'"):
        CommandRegistry([_cmd("a", aliases=("b",)), _cmd("c", aliases=("b",))])
    with pytest.raises(ValueError, match="no example"):
        Command("a", "s", "", (), run=lambda s, a: None)


# -- x/NFU ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        ("/8gx", XFormat(8, "x", 8)),
        ("/4i", XFormat(4, "i", 4)),
        ("/xb", XFormat(1, "x", 1)),
        ("/2a", XFormat(2, "a", 8)),  # a: pointer-sized
        ("/3c", XFormat(3, "c", 1)),  # c: bytes
        ("/s", XFormat(1, "s", 4)),
    ],
)
def test_parse_format(suffix, expected):
    assert parse_format(suffix) == expected


def test_parse_format_remembers_the_previous_size_and_letter():
    assert parse_format("/2", XFormat(1, "d", 2)) == XFormat(2, "d", 2)
    assert parse_format("", XFormat(8, "x", 8)) == XFormat(1, "x", 8)
    for bad, message in (("/8q", "unknown format letter 'q'"), ("/gb", "two unit sizes"),
                         ("/xd", "two formats"), ("/0x", "between 1")):  # fmt: skip
        with pytest.raises(CommandError, match=message):
            parse_format(bad)


def test_units_render_as_gdb_does():
    data = bytes([0xFF, 0x7F, 0x41, 0x00]) + (0x123).to_bytes(4, "little")
    assert str(format_units(0x10, data, XFormat(2, "x", 4))) == "0x10:\t0x00417fff\t0x00000123"
    assert str(format_units(0x10, data[:2], XFormat(2, "d", 1))) == "0x10:\t-1\t127"
    assert str(format_units(0x10, data[:2], XFormat(2, "u", 1))) == "0x10:\t255\t127"
    assert str(format_units(0, data[2:4], XFormat(1, "o", 2))) == "0x0:\t0101"
    assert str(format_units(0, data[:1], XFormat(1, "t", 1))) == "0x0:\t11111111"
    assert (
        str(format_units(0, data[:3], XFormat(3, "c", 1)))
        == "0x0:\t-1 '\\377'\t127 '\\177'\t65 'A'"
    )
    # Eight bytes per line for byte units, two per line for giant words.
    assert str(format_units(0, bytes(16), XFormat(16, "x", 1))).count("\n") == 1
    assert str(format_units(0, bytes(32), XFormat(4, "x", 8))).count("\n") == 1


def test_strings_escape_like_c():
    assert str(format_string(0x20, b'say "hi"\n')) == '0x20:\t"say \\"hi\\"\\n"'


# -- help, docs, output -----------------------------------------------------------------------


def test_every_command_has_a_summary_usage_and_an_example_that_parses():
    for cmd in REGISTRY:
        assert cmd.summary and cmd.examples, cmd.name
        for example in cmd.examples:
            assert REGISTRY.parse(example).command is cmd, example


def test_commands_from_the_brief_exist():
    wanted = """info registers|set|info cpu|x|xp|disassemble|pt walk|pt dump|pt find|pt check|
    info idt|info gdt|info tss|break|tbreak|delete|disable|enable|condition|info breakpoints|
    watch|rwatch|awatch|stepi|nexti|continue|finish|until|inject|idt set|trap policy|
    info traps|record start|record stop|save|bt|info symbol|print|help|quit"""
    for name in (w.strip() for w in wanted.split("|")):
        assert name in REGISTRY, name


def test_docs_commands_md_is_current():
    expected = docs.render_reference(REGISTRY)
    assert docs.DEFAULT_OUTPUT.read_text(encoding="utf-8") == expected, (
        "docs/commands.md is stale: run python -m kctx_debug.repl.docs"
    )


def test_docs_check_mode_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "commands.md"
    stale.write_text("old\n")
    run = [sys.executable, "-m", "kctx_debug.repl.docs", str(stale), "--check"]
    assert subprocess.run(run, capture_output=True).returncode == 1
    assert docs.main([str(stale)]) == 0
    assert subprocess.run(run, capture_output=True).returncode == 0


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_colour_only_on_a_terminal_without_no_color():
    assert want_color(_Tty(True), {}) is True
    assert want_color(_Tty(False), {}) is False
    assert want_color(_Tty(True), {"NO_COLOR": "1"}) is False
    assert want_color(_Tty(True), {"NO_COLOR": ""}) is True  # no-color.org: only non-empty
    assert want_color(_Tty(True), {"TERM": "dumb"}) is False


def test_plain_printer_writes_no_escape_codes_and_one_error_line(capsys):
    import io

    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, color=False)
    printer.show(Styled("rip ", "reg").add("0x10", "changed"))
    printer.error("first line\nsecond line")
    assert out.getvalue() == "rip 0x10\n"
    assert err.getvalue() == "error: first line\n"


def test_colour_printer_uses_ansi_for_roles():
    import io

    out = io.StringIO()
    Printer(out, out, color=True).show(Styled("x", "changed"))
    assert "\x1b[" in out.getvalue() and "x" in out.getvalue()
