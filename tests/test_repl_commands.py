"""Every REPL command, run as batch lines on the demo snapshot and the fixture kernels.

Expected values come from the fixtures' sources and the SDM, not from running the
REPL: the demo's layout is fixtures/make_demo.py (user text at 0x400000 -> phys
0x300000, US only; TSS.RSP0 0xffffc90000004000; IST1 0xffffc90000008000; the #BP gate
DPL3), its code fixtures/src/demo.S (``mov rax, 1`` = 48 c7 c0 01 00 00 00 …); the
trap frame is SDM vol. 3A 6.14.2 (SS, RSP, RFLAGS, CS, RIP pushed on RSP0); #PF error
codes are SDM vol. 3A 4.7 (P=1, W/R=2, U/S=4).
"""

from __future__ import annotations

import json

import pytest
from test_fixture_kernel import KERNEL_ELF, kernel_context, mix, reference_checksum

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.errors import CommandError, KctxError
from kctx_debug.repl.cmd_help import QuitRequest
from kctx_debug.repl.commands import default_registry
from kctx_debug.repl.dispatch import Dispatcher
from kctx_debug.repl.session import Session
from kctx_debug.symbols import load_symbols
from kctx_debug.traps.trace import read_trace

USER_START, BP_HANDLER, BP_COUNT = 0x400000, 0xFFFFFFFF81000000, 0xFFFFFFFF81200000
DEFAULT_HANDLER, PF_HANDLER = 0xFFFFFFFF81000020, 0xFFFFFFFF8100001A
RSP0, USER_RSP = 0xFFFFC90000004000, 0x7FFFFFFFFFF0
TRAPS = demo_snapshot_path().parent.parent.parent / "fixtures" / "traps"


class Repl:
    """Runs lines like the REPL does and returns the plain text each prints."""

    def __init__(self, session: Session) -> None:
        self.session = session
        session.registry = default_registry()
        self.dispatcher = Dispatcher(session.registry, session)

    def __call__(self, line: str) -> str:
        out = self.dispatcher.run(line)
        return "" if out is None else str(out)

    def value(self, expr: str) -> int:
        return self.session.evaluate(expr)

    def json(self, line: str):
        return json.loads(self(line))


@pytest.fixture
def demo():
    session = Session.open(demo_snapshot_path())
    repl = Repl(session)
    repl("set context off")
    yield repl
    session.close()


@pytest.fixture
def kernel():
    loaded = kernel_context()
    session = Session(loaded.ctx, symbols=load_symbols(KERNEL_ELF))
    repl = Repl(session)
    repl("set context off")
    yield repl, loaded
    session.close()


# -- registers and values ----------------------------------------------------------------


def test_info_registers_decodes_the_snapshot(demo):
    text = demo("info registers")
    assert "rip            0x0000000000400000 <user_start>" in text
    assert "rsp            0x00007ffffffffff0" in text
    # VMCS access rights 0xa0fb: code, DPL3, present, L (make_demo.py).
    assert (
        "cs             0x0033 (GDT[6] RPL3)  base=0x0 limit=0xffffffff "
        "attr=0xa0fb code64 DPL3 P G L" in text
    )
    assert "rflags         0x0000000000000202  [IF]" in text
    control = demo("info registers control msr")
    assert "cr0            0x0000000080050033  [PE|MP|ET|NE|WP|AM|PG]" in control
    assert "cr4            0x00000000001106a0  [PAE|PGE|OSFXSR|OSXMMEXCPT|FSGSBASE|SMEP]" in control
    assert "efer           0x0000000000000d01  [SCE|LME|LMA|NXE]" in control
    assert "star           0x0023001000000000  syscall cs=0x10 sysret base=0x23" in control
    assert "lstar          0xffffffff81000023 <syscall_entry>" in control


def test_info_registers_by_name_and_json(demo):
    assert demo("info registers eax cs").splitlines()[0].split() == ["eax", "0x0000000000000000"]
    regs = demo.json("info registers rip rsp cr3 efer --json")
    assert regs == {"rip": USER_START, "rsp": USER_RSP, "cr3": 0x100000, "efer": 0xD01}
    with pytest.raises(CommandError, match="unknown register 'bogus'"):
        demo("info registers bogus")


def test_info_cpu(demo):
    lines = dict(
        line.split(None, 1)
        for line in demo("info cpu").replace("pending trap", "pending_trap").splitlines()
    )
    assert lines == {
        "mode": "64-bit mode (IA-32e)",
        "CPL": "3",
        "paging": "4-level (WP NXE SMEP)",
        "IF": "1 (interrupts enabled)",
        "rip": "0x400000 <user_start>",
        "pending_trap": "none",
    }


def test_print_and_info_symbol(demo):
    assert demo("p $rsp + 8") == "0x7ffffffffff8  140737488355320"
    assert demo("print/x bp_handler + 4") == "0xffffffff81000004"
    assert demo("p/d 0 - 1") == "-1"
    assert demo("p/t 5") == "101"
    assert demo("p/a $pc + 0xe") == "0x40000e <user_start+0xe>"
    # REX.W of `mov rax, 1` and the whole `int3` (SDM vol. 2).
    assert demo.value("*(u8*)user_start") == 0x48
    assert demo.value("*(u8*)(user_start + 0xe)") == 0xCC
    assert demo("info symbol 0x400003") == "user_start+0x3  (user_start at 0x400000)"
    assert demo("info symbol 0x10") == "no symbol matches 0x10"
    with pytest.raises(CommandError, match="unknown symbol 'nosuch'"):
        demo("p nosuch")


def test_set_memory_register_and_settings(demo):
    demo("set {u64} $rsp = 0x1122334455667788")
    demo("set *(u16*)($rsp + 8) = 0xbeef")
    assert demo("x/2gx $rsp") == "0x7ffffffffff0:\t0x1122334455667788\t0x000000000000beef"
    assert not demo.session.has_machine  # memory writes need no machine
    demo("set $rax = 41 + 1")
    demo("set $bl = 0xff")
    assert demo.session.has_machine
    assert (demo.value("$rax"), demo.value("$rbx")) == (42, 0xFF)
    demo("set context-stack 3")
    assert "context-stack  3" in demo("set")
    with pytest.raises(CommandError, match="unknown setting 'colour'"):
        demo("set colour on")
    with pytest.raises(CommandError, match="cannot parse 'set rax 1 2'"):
        demo("set rax 1 2")


# -- memory ---------------------------------------------------------------------------------


def test_x_formats_on_known_code(demo):
    assert demo("x/8xb user_start") == (
        "0x400000 <user_start>:\t0x48\t0xc7\t0xc0\t0x01\t0x00\t0x00\t0x00\t0x48"
    )
    assert demo("x/2i user_start").splitlines() == [
        "=> 0x400000 <user_start>:  48 c7 c0 01 00 00 00  mov rax, 1",
        "   0x400007 <user_start+0x7>:  48 c7 c3 00 10 00 00  mov rbx, 0x1000",
    ]
    # An empty line continues after the last unit, in the same format.
    assert demo("").splitlines()[0] == "   0x40000e <user_start+0xe>:  cc                    int3"
    # 48 c7 c3 00 | 10 00 00 cc: dwords 0x00c3c748 and 0xcc000010 (negative as signed).
    assert demo("x/2dw user_start + 0x7") == (
        f"0x400007 <user_start+0x7>:\t{0x00C3C748}\t{0xCC000010 - (1 << 32)}"
    )
    assert demo("x/a $rsp") == "0x7ffffffffff0:\t0x0"


def test_x_stops_at_unmapped_memory(demo):
    # The user stack page ends at 0x800000000000, the non-canonical hole.
    text = demo("x/4gx $rsp")
    assert text.splitlines()[0] == "0x7ffffffffff0:\t0x0000000000000000\t0x0000000000000000"
    assert "cannot access memory at 0x800000000000" in text
    with pytest.raises(CommandError, match="cannot access memory at 0x1000"):
        demo("x/gx 0x1000")


def test_xp_reads_physical_memory(demo):
    # make_demo.py: user text at physical 0x300000.
    assert demo.value("*(u64*)user_start") == int.from_bytes(
        bytes.fromhex("48c7c00100000048"), "little"
    )
    assert demo("xp/1gx 0x300000") == "0x300000:\t0x48000000" + "01c0c748"
    assert demo("xp/1xb 0x30000e") == "0x30000e:\t0xcc"
    # A breakpoint's int3 is not shown: `add rax, rax` starts with REX.W 0x48.
    demo("break user_start + 0xf")
    assert demo("xp/2xb 0x30000e") == "0x30000e:\t0xcc\t0x48"
    assert demo.session.machine.read_physical(0x30000F, 1) == b"\xcc"


def test_disassemble_with_symbols(demo):
    lines = demo("disassemble bp_handler 4").splitlines()
    assert lines[0] == "   0xffffffff81000000 <bp_handler>:  55                    push rbp"
    assert lines[1].endswith("48 89 e5              mov rbp, rsp")
    assert lines[2].endswith("50                    push rax")
    # A RIP-relative operand gets its absolute address and symbol.
    assert lines[3].endswith("mov rax, qword ptr [rip + 0x1ffff4]  # 0xffffffff81200000 <bp_count>")
    assert demo("disas").splitlines()[0].startswith("=> 0x400000 <user_start>:")
    demo("set syntax att")
    assert demo("disas user_start 1").endswith("movq $1, %rax")


# -- page tables ----------------------------------------------------------------------------


def test_pt_walk_user_text(demo):
    walk = demo.json("pt walk $rip --json")
    # 0x400000: PML4[0] PDPT[0] PD[2] PT[0]; leaf = phys 0x300000 | P | US (no RW, no XD).
    assert [step["index"] for step in walk["steps"]] == [0, 0, 2, 0]
    assert [step["level"] for step in walk["steps"]] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert walk["steps"][-1]["entry"] == 0x300005
    assert (walk["phys"], walk["user"], walk["writable"], walk["executable"]) == (
        0x300000, True, False, True,
    )  # fmt: skip
    text = demo("pt walk $rip")
    assert (
        text.splitlines()[-1] == "0x0000000000400000 -> phys 0x0000000000300000 (4K page) r-x user"
    )


def test_pt_walk_checks_an_access(demo):
    # A user write to a supervisor page: #PF with P|W|U = 7.
    text = demo("pt walk bp_count --access write,user")
    assert "#PF error code 0x7 (P|WR|US)" in text
    assert demo.json("pt walk bp_count --access write,user --json")["fault"]["error_code"] == 7
    assert demo("pt walk $rsp --access write,user").endswith("access allowed")


def test_pt_dump_and_find(demo):
    dump = demo("pt dump 0x400000-0x402000")
    assert dump.splitlines()[1] == (
        "0x0000000000400000-0x0000000000401000           4K USR ro                     x  pte"
    )
    ranges = demo.json("pt dump 0x400000 +0x1000 --json")
    assert [(r["start"], r["end"], r["phys"]) for r in ranges] == [(0x400000, 0x401000, 0x300000)]
    # GDT at physical 0x1000: the cpu entry area and the direct map (make_demo.py).
    assert demo.json("pt find 0x1000 --json")["vas"] == [0xFFFF888000001000, 0xFFFFFE0000001000]
    assert demo("pt find 0x300000") == "0x0000000000400000 <user_start>"
    assert demo("pt find 0x7000000") == "no virtual address maps physical 0x7000000"


def test_pt_check_needs_a_pagemap(demo, tmp_path):
    with pytest.raises(CommandError, match="holds no pagemap entries"):
        demo("pt check")
    from conftest import FULL_SIDE_FILES, full_snapshot_doc, write_snapshot

    path = write_snapshot(tmp_path, full_snapshot_doc(), files=FULL_SIDE_FILES)
    repl = Repl(Session.open(path))
    # pagemap: 0x400000 -> PFN 0x200 (present), 0x401000 not present; the tables map both.
    report = repl.json("pt check --json")
    assert report["counts"]["agree"] == 1 and report["counts"]["only-in-tables"] == 1
    assert report["disagreements"] == [
        {"va": 0x401000, "verdict": "only-in-tables", "table_pfn": 0x201, "pagemap_pfn": None}
    ]
    repl.session.close()


# -- descriptor tables ------------------------------------------------------------------------


def test_info_idt(demo):
    text = demo("info idt 3").splitlines()
    assert text[0] == (
        "0x03 #BP         int-gate sel=0x0010 off=0xffffffff81000000 ist=0 dpl=3 P <bp_handler>"
    )
    assert text[1] == "Breakpoint (trap, no error code)"
    assert "46:45   DPL               0x3" in text
    gates = demo.json("info idt --json")
    assert len(gates) == 256 and sum(g["present"] for g in gates) == 32
    assert gates[8]["ist"] == 1 and gates[14]["symbol"] == "page_fault_handler"
    assert demo.json("info idt #PF --json")["offset"] == PF_HANDLER


def test_info_gdt_and_tss(demo):
    gdt = demo("info gdt").splitlines()
    assert "[  6] 0x0030  code64 DPL3 P base=0x0 limit=0xfffff G L" in gdt
    assert "[  8] 0x0040  tss-avail DPL0 P base=0xfffffe0000003000 limit=0x67" in gdt
    entries = {e["selector"]: e for e in demo.json("info gdt --json")}
    assert (entries[0x28]["kind"], entries[0x28]["dpl"]) == ("data", 3)
    tss = demo.json("info tss --json")
    assert tss["rsp"] == [RSP0, 0, 0] and tss["ist"][0] == 0xFFFFC90000008000
    assert "rsp0  0xffffc90000004000" in demo("info tss")


# -- breakpoints and running --------------------------------------------------------------


def test_break_continue_shows_the_trap_frame(demo):
    assert demo("break bp_handler+4") == "Breakpoint 1 at 0xffffffff81000004 <bp_handler+0x4>"
    text = demo("continue").splitlines()
    assert text[0] == (
        "#BP (vector 3) at 0x40000e <user_start+0xe>, CPL3 -> delivered to bp_handler "
        "(0xffffffff81000000)"
    )
    assert text[1] == "Breakpoint 1 at 0xffffffff81000004 <bp_handler+0x4>"
    # push rbp, then the frame the CPU pushed on RSP0: RIP, CS, RFLAGS, RSP, SS.
    assert demo.value("$rsp") == RSP0 - 6 * 8
    words = [demo.value(f"*(u64*)($rsp + {8 * i})") for i in range(6)]
    assert words == [0, USER_START + 0xF, 0x33, 0x202, USER_RSP, 0x2B]
    assert (
        demo("x/8gx $rsp").splitlines()[0]
        == "0xffffc90000003fd0:\t0x0000000000000000\t0x000000000040000f"
    )
    assert demo("bt").splitlines() == [
        "#0  0xffffffff81000004 <bp_handler+0x4>  sp=0xffffc90000003fd0  (rip)",
        "#1  0x000000000040000f <user_start+0xf>  sp=0x7ffffffffff0  (trap frame (#BP))",
    ]
    assert (
        demo("info breakpoints")
        == "1   breakpoint keep y 0xffffffff81000004 <bp_handler+0x4> hits=1"
    )
    demo("continue")
    # Second hit: rax doubled once, rbx decremented once, the first handler counted.
    assert (demo.value("$rax"), demo.value("$rbx"), demo.value("*(u64*)bp_count")) == (2, 0xFFF, 1)
    assert json.loads(demo("info breakpoints --json"))[0]["hits"] == 2


def test_break_at_the_handler_entry_shows_the_cpu_frame(demo):
    demo("break bp_handler")
    assert demo("continue").splitlines()[1] == "Breakpoint 1 at 0xffffffff81000000 <bp_handler>"
    # On RSP0 (16-byte aligned): SS, RSP, RFLAGS, CS, then RIP after the int3.
    assert demo("x/8gx $rsp").splitlines() == [
        "0xffffc90000003fd8:\t0x000000000040000f\t0x0000000000000033",
        "0xffffc90000003fe8:\t0x0000000000000202\t0x00007ffffffffff0",
        "0xffffc90000003ff8:\t0x000000000000002b\t0x0000000000000000",
        "0xffffc90000004008:\t0x0000000000000000\t0x0000000000000000",
    ]
    regs = demo("info registers segment").splitlines()
    # The hidden part comes from the GDT entry CS names (make_demo.py: code64, DPL0).
    assert regs[0] == (
        "cs             0x0010 (GDT[2] RPL0)  base=0x0 limit=0xffffffff "
        "attr=0xa09b code64 DPL0 P G L"
    )
    # A privilege change loads SS with a null selector (SDM vol. 3A 6.14.2).
    assert regs[5] == "ss             0x0000 (null)"
    # An interrupt gate clears IF; only the fixed bit 1 is left.
    assert demo("info registers rflags") == "rflags         0x0000000000000002  [ ]"


def test_conditional_temporary_disabled_breakpoints(demo):
    demo("break bp_handler+4 if $rbx == 0xffd")
    demo("continue")
    # The fourth delivery: rbx 0x1000, 0xfff, 0xffe, 0xffd; three handlers finished.
    assert (demo.value("$rbx"), demo.value("*(u64*)bp_count")) == (0xFFD, 3)
    demo("condition 1")
    assert "if" not in demo("info breakpoints")
    demo("disable 1")
    assert "stopped: budget at" in demo("continue --count 50")
    demo("delete")
    demo("tbreak bp_handler+4")
    assert "Breakpoint 2" in demo("continue")
    assert demo("info breakpoints") == "no breakpoints or watchpoints"


def test_watchpoints_report_old_and_new_values(demo):
    assert demo("watch *(u64*)bp_count") == "Watchpoint 1: 0xffffffff81200000 (8 bytes)"
    text = demo("continue")
    # bp_handler+0xf is `mov qword ptr [rip + ...], rax` (demo.S).
    assert (
        "watchpoint 1: write of 8 bytes at 0xffffffff81200000 by 0xffffffff8100000f: 0x0 -> 0x1"
        in text
    )
    demo("delete w1")
    demo("rwatch *(u64*)bp_count")
    assert (
        "watchpoint 2: read of 8 bytes at 0xffffffff81200000 by 0xffffffff81000005: value 0x1"
        in demo("c")
    )
    assert "w2   watch read y 0xffffffff81200000 size=8 hits=1" in demo("info breakpoints")
    demo("delete w2")
    demo("awatch bp_count --size 4")
    assert "watchpoint 3: write of 8 bytes at 0xffffffff81200000 by 0xffffffff8100000f" in demo("c")
    assert "watchpoint 3: read of 8 bytes at 0xffffffff81200000 by 0xffffffff81000005" in demo("c")


def test_stepi_repeats_on_an_empty_line(demo):
    demo("stepi")
    assert demo.value("$rip") == 0x400007
    demo("")
    assert demo.value("$rip") == 0x40000E
    demo("stepi 2")  # int3 (delivered to bp_handler), then push rbp
    assert demo.value("$rip") == BP_HANDLER + 1
    # Every stop is in the trap log: two steps, then the #BP and the step after it.
    log = demo("info traps").splitlines()
    assert log[0] == "#0    icount 1          stopped: budget at 0x400007 <user_start+0x7>"
    assert log[2].startswith("#2    icount 3          #BP (vector 3) at 0x40000e <user_start+0xe>")


def test_trap_policy_stop_leaves_the_trap_pending(demo):
    demo("trap policy 3 stop")
    assert demo("trap policy") == "default: deliver\n0x03 #BP         stop"
    text = demo("continue").splitlines()
    assert text[0] == "#BP (vector 3) at 0x40000e <user_start+0xe>, CPL3"
    assert text[1] == (
        "  pending: #BP -> handler 0xffffffff81000000 <bp_handler>; continue or stepi delivers it"
    )
    assert "pending trap  #BP (vector 3) at 0x40000e, CPL3" in demo("info cpu")
    assert demo.value("$cs") == 0x33
    demo("stepi")  # the delivery is the step: at the handler's entry, the frame pushed
    assert demo.value("$cs") == 0x10 and demo.value("$rsp") == RSP0 - 5 * 8
    assert demo.value("$rip") == 0xFFFFFFFF81000000
    demo("finish")  # through the handler's iretq, back after the int3
    assert (demo.value("$rip"), demo.value("$cs")) == (0x40000F, 0x33)


def test_nexti_finish_until_on_the_fixture_kernel(kernel):
    repl, loaded = kernel
    # lea (7 bytes), lea (7), mov ecx (5), xor eax (2), xor r8d (3), mov edx (4): the call.
    call = loaded.symbols["_start"] + 0x1C
    repl("stepi 6")
    assert repl("x/i $rip").endswith(f"call {loaded.symbols['mix']:#x} <mix>")
    assert repl.value("$rip") == call
    repl("nexti")
    # The call ran to its return: rax = mix(0, table[0]).
    assert repl.value("$rip") == call + 5
    assert repl.value("$rax") == mix(0, loaded.table[0])
    repl("stepi 4")  # inc, cmp, jb, mov edx: at the next call
    repl("stepi")  # into mix
    assert repl.value("$rip") == loaded.symbols["mix"]
    assert repl("bt").splitlines()[1].startswith(f"#1  {call + 5:#018x} <_start+0x21>")
    repl("finish")
    assert repl.value("$rip") == call + 5
    assert repl.value("$rax") == mix(mix(0, loaded.table[0]), loaded.table[1])
    repl("until halt")
    assert repl.value("$rip") == loaded.symbols["halt"]
    assert repl.value("$rbx") == reference_checksum(loaded.table)


# -- traps ------------------------------------------------------------------------------------


def test_inject_through_a_missing_gate_raises_gp(demo):
    text = demo("inject 0x20 --force").splitlines()
    # Gate 0x20 not present: #GP with error code 0x20 * 8 | IDT | EXT = 0x103 (SDM 6.13).
    assert text[0].startswith("irq 0x20 (vector 32) at 0x400000 <user_start>, CPL3")
    assert text[1].startswith(
        "#GP (vector 13) at 0x400000 <user_start>, CPL3, error code 0x103 "
        "-> delivered to default_handler"
    )
    assert demo.value("*(u64*)$rsp") == 0x103


def test_inject_page_fault_with_error_code_and_cr2(demo):
    demo("inject #PF --error 6 --cr2 0x1000")
    assert demo.value("$rip") == PF_HANDLER
    assert demo.value("$cr2") == 0x1000
    # Error code, then RIP, CS, RFLAGS, RSP, SS (SDM vol. 3A 6.14.2); a fault's pushed
    # RFLAGS has RF set (the image of every fault but an instruction breakpoint does).
    assert [demo.value(f"*(u64*)($rsp + {8 * i})") for i in range(6)] == [
        6, USER_START, 0x33, 0x10202, USER_RSP, 0x2B,
    ]  # fmt: skip


def test_idt_set_redirects_the_breakpoint_gate(demo):
    assert demo("idt set 3 default_handler").endswith("dpl=3 P <default_handler>")
    assert demo.json("info idt 3 --json")["offset"] == DEFAULT_HANDLER
    text = demo("continue")
    assert "-> delivered to default_handler (0xffffffff81000020)" in text
    assert text.splitlines()[-2 if "=>" in text else -1].startswith("stopped: halt")


def test_page_fault_fixture_reports_error_code_and_cr2():
    repl = Repl(Session.open(TRAPS / "pagefault.json"))
    repl("set context off")
    repl("trap policy 14 stop")
    text = repl("continue").splitlines()
    # A CPL3 write to a not-present page: W/R | U/S = 6 (SDM vol. 3A 4.7).
    assert (
        text[0] == "#PF (vector 14) at 0x400007 <first_write>, CPL3, error code 0x6, CR2 0x600000"
    )
    assert "handler 0xffffffff81000000 <pf_handler>" in text[1]
    repl("stepi")
    assert repl("bt").splitlines()[1] == (
        "#1  0x0000000000400007 <first_write>  sp=0x7ffffffffff0  (trap frame (#PF))"
    )
    # The delivery was the step: at pf_handler's entry, the error code on top, RIP above.
    assert repl.value("$rip") == 0xFFFFFFFF81000000
    assert (repl.value("*(u64*)$rsp"), repl.value("*(u64*)($rsp + 8)")) == (6, 0x400007)
    repl.session.close()


def test_info_traps_lists_the_log(demo):
    assert demo("info traps") == "the trap log is empty"
    demo("break bp_handler+4")
    demo("continue")
    events = demo.json("info traps --json")
    assert [(e["kind"], e["name"], e["rip"]) for e in events] == [
        ("exception", "#BP", 0x40000E),
        ("breakpoint", "breakpoint 1", BP_HANDLER + 4),
    ]
    assert events[0]["handler"] == BP_HANDLER and events[0]["handler_symbol"] == "bp_handler"
    # mov, mov, int3, push rbp, mov rbp, rsp: five instructions to bp_handler+4.
    assert demo("info traps 1").startswith("#1    icount 5")


def test_record_writes_a_readable_trace(demo, tmp_path):
    path = tmp_path / "run.ktrace.jsonl"
    with pytest.raises(CommandError, match="not recording"):
        demo("record stop")
    demo("break bp_handler+4")
    assert demo(f"record start {path}") == f"recording trap events to {path}"
    demo("continue")
    demo("continue")
    assert demo("record stop") == f"wrote 5 events to {path}"
    trace = read_trace(path)
    assert trace.header.snapshot == "demo.json"
    assert trace.header.snapshot_hash == demo.session.context.snapshot.content_hash()
    assert trace.header.options.breaks == (BP_HANDLER + 4,)
    assert [e.seq for e in trace.events] == [0, 1, 2, 3, 4]
    assert [e.name for e in trace.events] == [
        "#BP",
        "breakpoint 1",
        "#BP",
        "breakpoint 1",
        "record stop",
    ]
    assert trace.complete


def test_save_writes_the_machine_state_without_breakpoint_bytes(demo, tmp_path):
    demo("break bp_handler+4")
    demo("continue")
    demo("set {u64} bp_count = 0x77")
    out = tmp_path / "saved.json"
    assert demo(f"save {out}").startswith(f"saved {out}")
    saved = Repl(Session.open(out))
    assert saved.value("$rip") == BP_HANDLER + 4
    assert saved.value("$rsp") == RSP0 - 6 * 8
    assert saved.session.context.cpu.segments["cs"].selector == 0x10
    assert saved.value("*(u64*)bp_count") == 0x77
    assert saved.value("*(u8*)(bp_handler + 4)") == 0x50  # push rax, not our int3
    assert saved("info symbol $rip") == "bp_handler+0x4  (bp_handler at 0xffffffff81000000)"
    saved.session.close()
    with pytest.raises(CommandError, match=r"ends in \.json"):
        demo(f"save {tmp_path / 'x.bin'}")


# -- help, quit, context ----------------------------------------------------------------------


def test_help_and_quit(demo):
    assert demo("help").startswith("Registers and values\n  info cpu")
    text = demo("help x").splitlines()
    assert text[0] == "usage: x[/FMT] [EXPR]"
    assert "  x/8gx $rsp" in text
    assert demo("help pt walk").splitlines()[0] == "usage: pt walk EXPR [--access SPEC] [--json]"
    assert "needs: the debugger" in demo("help break")
    with pytest.raises(QuitRequest):
        demo("quit")


def test_context_display_on_a_stop(demo):
    demo("set context on")
    demo("break bp_handler+4")
    text = demo("continue")
    assert "── registers" in text and "── code" in text and "── stack" in text
    assert "=> 0xffffffff81000004 <bp_handler+0x4>:  50                    push rax" in text
    # Two instructions before RIP, from the symbol's start.
    assert "   0xffffffff81000000 <bp_handler>:  55                    push rbp" in text
    assert "0xffffc90000003fd8  +0x08  0x000000000040000f <user_start+0xf>" in text
    assert demo.session.changed_registers() >= {"rip", "rsp", "rflags"}


def test_errors_are_kctx_errors_with_one_line(demo):
    for line, message in (
        ("x/4gx nosuch", "unknown symbol 'nosuch'"),
        ("p 1 +", "expression ends where an operand was expected"),
        ("break 0x1000", "cannot set a breakpoint at 0x1000"),
        ("stepi 0", "count 0 must be between 1"),
        ("info idt 300", "outside 0-255"),
    ):
        with pytest.raises(KctxError, match=message) as caught:
            demo(line)
        assert "\n" not in str(caught.value)
