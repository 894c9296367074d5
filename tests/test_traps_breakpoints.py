"""Breakpoints by int3 injection, and the run commands built on them.

The loop under test has a hand-computed trace: ``mov ecx, 10`` then ten iterations of
``add rax, rcx; dec rcx; jnz`` then ``hlt`` = 1 + 30 + 1 instructions, rax = 55. A
breakpoint must not change that count (our int3 is not a guest instruction), must
stop with RIP on the breakpoint, and must leave the original bytes visible.
"""

from __future__ import annotations

import threading

import pytest
from test_traps_kit import HANDLERS, KTEXT, KTEXT_ALIAS, KTEXT_PA, asm, build, gate

from kctx_debug.errors import CommandError
from kctx_debug.traps.breakpoints import INT3
from kctx_debug.traps.events import TrapKind

# mov ecx, 10 | L: add rax, rcx | dec rcx | jnz L | hlt
LOOP = asm("b90a000000 4801c8 48ffc9 75f8 f4")
L, DEC, JNZ, HLT = KTEXT + 5, KTEXT + 8, KTEXT + 11, KTEXT + 13


def loop_debugger(**kw):
    return build(LOOP, **kw).debugger()


def test_breakpoint_stops_at_its_address_and_hides_its_byte():
    dbg = loop_debugger()
    bp = dbg.break_at(L)
    event = dbg.cont()
    m = dbg.machine
    assert (event.kind, event.name, event.rip) == (TrapKind.BREAKPOINT, "breakpoint 1", L)
    assert (m.reg_read("rip"), m.reg_read("rcx"), m.icount, bp.hits) == (L, 10, 1, 1)
    assert m.read_virtual(L, 1) == bytes([INT3])  # the machine sees the int3 ...
    assert dbg.read_virtual(L, 3) == asm("4801c8")  # ... the debugger the original
    assert dbg.disassemble(L, 1)[0].text == "add rax, rcx"
    event = dbg.cont()  # steps the original add once, re-arms, next iteration
    assert (event.rip, m.reg_read("rcx"), m.reg_read("rax"), m.icount, bp.hits) == (L, 9, 10, 4, 2)
    assert m.read_virtual(L, 1) == bytes([INT3])


def test_breakpoints_do_not_change_the_result_or_the_count():
    dbg = loop_debugger()
    dbg.break_at(DEC)
    hits = 0
    while (event := dbg.cont()).kind is TrapKind.BREAKPOINT:
        hits += 1
    assert (hits, event.name, dbg.machine.reg_read("rax"), dbg.machine.icount) == (
        10,
        "halt",
        55,
        32,
    )


def test_condition_and_hit_count():
    dbg = loop_debugger()
    bp = dbg.break_at(L, condition="$rcx == 5 || *(u8*)$rip == 0")
    event = dbg.cont()
    # Five iterations (rcx 10..6) ran: mov + 5 * 3 instructions.
    assert (event.rip, dbg.machine.reg_read("rcx"), dbg.machine.icount, bp.hits) == (L, 5, 16, 1)
    dbg.condition(bp.number, None)
    assert dbg.cont().icount == 19 and bp.hits == 2
    with pytest.raises(CommandError):
        dbg.condition(bp.number, "$rcx ==")
    with pytest.raises(CommandError):
        dbg.break_at(DEC, condition="(")


def test_condition_that_cannot_be_evaluated_stops_with_a_message():
    dbg = loop_debugger()
    dbg.break_at(L, condition="no_such_symbol == 1")
    event = dbg.cont()
    assert event.kind is TrapKind.BREAKPOINT
    assert "no_such_symbol" in dbg.message


def test_temporary_disable_enable_delete():
    dbg = loop_debugger()
    tb = dbg.tbreak(DEC)
    assert dbg.cont().name == f"breakpoint {tb.number}"
    assert len(dbg.breakpoints) == 0
    assert dbg.machine.read_virtual(DEC, 1) == b"\x48"  # byte restored
    bp = dbg.break_at(L)
    dbg.disable(bp.number)
    assert dbg.machine.read_virtual(L, 1) == b"\x48"
    dbg.enable(bp.number)
    assert dbg.cont().rip == L
    dbg.delete(bp.number)
    assert dbg.cont().name == "halt" and dbg.machine.reg_read("rax") == 55
    with pytest.raises(CommandError):
        dbg.delete(bp.number)


def test_breakpoint_fires_at_both_aliases_of_a_physical_page():
    # Set through the alias, executed through KTEXT: the int3 is in the physical byte.
    dbg = loop_debugger()
    bp = dbg.break_at(KTEXT_ALIAS + (L - KTEXT))
    assert bp.phys == KTEXT_PA + (L - KTEXT)
    event = dbg.cont()
    assert (event.kind, event.rip, dbg.machine.reg_read("rip")) == (TrapKind.BREAKPOINT, L, L)
    # And the other way round: set at KTEXT, executed through the alias.
    dbg = loop_debugger(regs={"rip": KTEXT_ALIAS})
    dbg.break_at(L)
    event = dbg.cont()
    assert (event.rip, event.name) == (KTEXT_ALIAS + (L - KTEXT), "breakpoint 1")
    assert dbg.cont().rip == KTEXT_ALIAS + (L - KTEXT)


def test_breakpoint_planted_in_code_already_translated():
    dbg = loop_debugger()
    assert dbg.stepi(6).name == "budget"  # at the second jnz: the loop is translated
    dbg.break_at(L)
    event = dbg.cont()
    assert (event.rip, dbg.machine.reg_read("rcx"), dbg.machine.icount) == (L, 8, 7)


def test_guest_int3_is_a_trap_ours_is_a_breakpoint():
    code = asm("90 cc 90 f4")  # the guest's own int3 at KTEXT + 1
    kit = build(code, gates={3: gate(HANDLERS)}, handlers={HANDLERS: asm("48cf")})  # iretq
    dbg = kit.debugger()
    dbg.break_at(KTEXT + 2)
    event = dbg.cont()
    guest, ours = dbg.trap_log
    assert (guest.kind, guest.name, guest.rip, guest.handler) == (
        TrapKind.EXCEPTION, "#BP", KTEXT + 1, HANDLERS,
    )  # fmt: skip
    assert (ours.kind, ours.rip, event is ours) == (TrapKind.BREAKPOINT, KTEXT + 2, True)
    assert dbg.machine.icount == 3  # nop, int3, iretq: our int3 is not counted


def test_breakpoint_on_a_guest_int3_reports_ours_then_the_guest_trap():
    kit = build(asm("90 cc 90 f4"), gates={3: gate(HANDLERS)}, handlers={HANDLERS: asm("48cf")})
    dbg = kit.debugger()
    dbg.break_at(KTEXT + 1)
    assert dbg.cont().kind is TrapKind.BREAKPOINT
    dbg.cont()
    assert [(e.kind, e.rip) for e in dbg.trap_log] == [
        (TrapKind.BREAKPOINT, KTEXT + 1),
        (TrapKind.EXCEPTION, KTEXT + 1),
        (TrapKind.STOP, KTEXT + 4),
    ]


def test_write_under_a_breakpoint_becomes_the_original():
    dbg = loop_debugger()
    dbg.break_at(L)
    dbg.write_virtual(L, asm("4829c8"))  # sub rax, rcx
    assert dbg.read_virtual(L, 3) == asm("4829c8")
    assert dbg.machine.read_virtual(L, 1) == bytes([INT3])
    dbg.delete(1)
    assert dbg.machine.read_virtual(L, 3) == asm("4829c8")
    dbg.cont()
    assert dbg.machine.reg_read("rax") == (-55) & (2**64 - 1)


def test_unmapped_breakpoint_is_refused():
    with pytest.raises(CommandError, match="cannot set a breakpoint"):
        loop_debugger().break_at(0x1234_5000)


# -- stepping commands ----------------------------------------------------------------------

# call f; nop; hlt; f: mov eax, 5; ret
CALLS = asm("e802000000 90 f4 b805000000 c3")
CALL_F, AFTER_CALL, F = KTEXT, KTEXT + 5, KTEXT + 7


def test_stepi_steps_the_instruction_under_a_breakpoint():
    dbg = loop_debugger()
    dbg.break_at(L)
    dbg.cont()
    event = dbg.stepi()
    assert (event.name, event.rip, dbg.machine.reg_read("rax"), dbg.machine.icount) == (
        "budget", DEC, 10, 2,
    )  # fmt: skip
    # Stepping a range that crosses the breakpoint stops at it.
    assert dbg.stepi(5).kind is TrapKind.BREAKPOINT and dbg.machine.icount == 4
    with pytest.raises(CommandError):
        dbg.stepi(0)


def test_nexti_steps_over_a_call():
    dbg = build(CALLS).debugger()
    event = dbg.nexti()
    m = dbg.machine
    assert (event.name, m.reg_read("rip"), m.reg_read("rax"), m.icount) == (
        "until",
        AFTER_CALL,
        5,
        3,
    )
    assert dbg.nexti().rip == AFTER_CALL + 1  # not a call: one instruction


def test_finish_returns_to_the_caller():
    kit = build(CALLS)
    kit.symbols["f"] = F
    dbg = kit.debugger()
    dbg.stepi()  # into f: RIP is f's first byte, the return address at [rsp]
    rsp = dbg.machine.reg_read("rsp")
    event = dbg.finish()
    m = dbg.machine
    assert (event.name, m.reg_read("rip"), m.reg_read("rsp"), m.icount) == (
        "until", AFTER_CALL, rsp + 8, 3,
    )  # fmt: skip


def test_finish_uses_the_frame_pointer_inside_a_function():
    # call f; hlt; f: push rbp; mov rbp, rsp; nop; pop rbp; ret
    dbg = build(asm("e801000000 f4 55 4889e5 90 5d c3")).debugger()
    dbg.stepi(3)  # call, push rbp, mov rbp, rsp: inside f's body
    event = dbg.finish()
    assert (event.name, dbg.machine.reg_read("rip"), dbg.machine.icount) == ("until", KTEXT + 5, 6)


def test_until_an_address():
    dbg = loop_debugger()
    event = dbg.until(HLT)
    assert (event.name, dbg.machine.reg_read("rip"), dbg.machine.icount) == ("until", HLT, 31)
    assert dbg.until(HLT).icount == 31  # already there


def test_until_with_a_count_stops_at_whichever_comes_first():
    dbg = loop_debugger()
    event = dbg.until(HLT, count=10)
    assert (event.name, dbg.machine.icount) == ("budget", 10)
    event = dbg.until(HLT, count=100)
    assert (event.name, dbg.machine.reg_read("rip"), dbg.machine.icount) == ("until", HLT, 31)


def test_timeout_stop_from_another_thread_and_event_callbacks():
    dbg = build(asm("ebfe")).debugger()  # jmp $
    seen = []
    dbg.on_event.append(seen.append)
    event = dbg.cont(timeout=0.05)
    assert (event.kind, event.name, event.rip) == (TrapKind.STOP, "timeout", KTEXT)
    timer = threading.Timer(0.05, dbg.stop)
    timer.start()
    event = dbg.cont(timeout=10)
    timer.join()
    assert event.name == "user-stop"
    assert seen == dbg.trap_log and [e.seq for e in seen] == [0, 1]
    assert seen[1].icount == dbg.machine.icount > 0
