"""Watchpoints: accessing instruction, address, old/new values, and exact counts.

The instruction counts are worked out by hand from the code under test (one count per
instruction, SDM semantics: a faulting instruction does not retire); a watchpoint
stops after the accessing instruction completes, so RIP is the next instruction and
the count includes the access.
"""

from __future__ import annotations

import pytest
from test_traps_kit import KDATA, KTEXT, asm, build, load_abs, rel32, store_abs

from kctx_debug.errors import CommandError
from kctx_debug.pagetables.walk import AccessKind
from kctx_debug.traps.events import TrapKind

VALUE = 0x1122_3344_5566_7788
# nop; mov [KDATA+8], rax; nop; inc qword [KDATA+8]; mov rax, [KDATA+8]; hlt
INC = asm("48ff0425") + rel32(KDATA + 8)
CODE = asm("90") + store_abs(KDATA + 8) + asm("90") + INC + load_abs(KDATA + 8) + asm("f4")
STORE_AT, INC_AT = KTEXT + 1, KTEXT + 10
LOAD_AT, HLT_AT = INC_AT + len(INC), INC_AT + len(INC) + 8


def debugger(code: bytes = CODE):
    return build(code, regs={"rax": VALUE}).debugger()


def u64(dbg, va):
    return int.from_bytes(dbg.read_virtual(va, 8), "little")


def test_write_watch_reports_old_and_new_and_stops_after_the_instruction():
    dbg = debugger()
    wp = dbg.watch(KDATA + 8)
    event = dbg.cont()
    assert (event.kind, event.rip, event.icount) == (TrapKind.WATCHPOINT, STORE_AT, 2)
    hit = dbg.watch_hits[0]
    assert (hit.kind, hit.address, hit.size, hit.old, hit.new, hit.pc) == (
        AccessKind.WRITE, KDATA + 8, 8, 0, VALUE, STORE_AT,
    )  # fmt: skip
    assert (
        event.name
        == f"watchpoint 1: write of 8 bytes at {KDATA + 8:#x} by {STORE_AT:#x}: 0x0 -> {VALUE:#x}"
    )
    m = dbg.machine
    assert (m.reg_read("rip"), m.icount, u64(dbg, KDATA + 8)) == (STORE_AT + 8, 2, VALUE)
    # inc: a read-modify-write; the write watch sees the write, once; the increment
    # happens once (an emu_stop inside the hook would have re-run the instruction).
    event = dbg.cont()
    assert (event.rip, event.icount, dbg.watch_hits[0].old, dbg.watch_hits[0].new) == (
        INC_AT, 4, VALUE, VALUE + 1,
    )  # fmt: skip
    assert (m.reg_read("rip"), u64(dbg, KDATA + 8)) == (LOAD_AT, VALUE + 1)
    event = dbg.cont()  # the load is not a write
    assert (event.name, m.icount, m.reg_read("rax")) == ("halt", 6, VALUE + 1)
    assert wp.hits == 2


def test_read_and_access_watches():
    dbg = debugger()
    dbg.rwatch(KDATA + 8)
    event = dbg.cont()
    assert (event.rip, event.icount) == (INC_AT, 4)
    hit = dbg.watch_hits[0]
    assert (hit.kind, hit.old, hit.new) == (AccessKind.READ, VALUE, VALUE)
    event = dbg.cont()
    assert (event.rip, event.icount, dbg.watch_hits[0].old) == (LOAD_AT, 5, VALUE + 1)
    dbg = debugger()
    dbg.awatch(KDATA + 8)
    dbg.cont()
    event = dbg.cont()  # inc: a read and a write in one instruction, one stop
    assert [(h.kind, h.old, h.new) for h in dbg.watch_hits] == [
        (AccessKind.READ, VALUE, VALUE), (AccessKind.WRITE, VALUE, VALUE + 1),
    ]  # fmt: skip
    assert [e.kind for e in dbg.trap_log[-2:]] == [TrapKind.WATCHPOINT] * 2
    assert dbg.machine.icount == 4


def test_wide_access_overlapping_the_start_of_a_narrow_watch():
    dbg = debugger()
    dbg.watch(KDATA + 12, 1)  # inside the 8-byte store at KDATA + 8
    event = dbg.cont()
    assert (event.rip, dbg.watch_hits[0].address, dbg.watch_hits[0].size) == (
        STORE_AT,
        KDATA + 8,
        8,
    )
    dbg = debugger()
    dbg.watch(KDATA + 16, 8)  # next to it: not touched
    assert dbg.cont().name == "halt"


def test_stepping_onto_a_watched_access_and_counts_match_a_plain_run():
    dbg = debugger()
    dbg.watch(KDATA + 8)
    assert dbg.stepi().name == "budget"  # the nop
    event = dbg.stepi()  # the store: a watch stop after exactly one instruction
    assert (event.kind, dbg.machine.icount, dbg.machine.reg_read("rip")) == (
        TrapKind.WATCHPOINT, 2, STORE_AT + 8,
    )  # fmt: skip
    assert dbg.cont().icount == 4 and dbg.cont().icount == 6
    plain = build(CODE, regs={"rax": VALUE}).machine()
    plain.run()
    assert plain.icount == 6


def test_disable_and_delete():
    dbg = debugger()
    wp = dbg.watch(KDATA + 8)
    dbg.watchpoints.enable(wp.number, False)
    assert dbg.cont().name == "halt"
    dbg = debugger()
    wp = dbg.watch(KDATA + 8)
    dbg.cont()
    dbg.watchpoints.delete(wp.number)
    assert dbg.cont().name == "halt" and len(dbg.watchpoints) == 0
    with pytest.raises(CommandError):
        dbg.watchpoints.get(wp.number)


def test_a_faulting_access_is_not_a_watch_hit():
    # mov [KDATA+0xffc], rax straddles into the unmapped page: #PF, the store never
    # completes, so the watch on its first bytes reports nothing.
    dbg = debugger(store_abs(KDATA + 0xFFC) + asm("f4"))
    dbg.watch(KDATA + 0xFF8, 8)
    dbg.set_policy(14, "stop")
    event = dbg.cont()
    assert (event.kind, event.name, event.cr2, dbg.machine.icount) == (
        TrapKind.EXCEPTION, "#PF", KDATA + 0x1000, 0,
    )  # fmt: skip
    assert [e.kind for e in dbg.trap_log] == [TrapKind.EXCEPTION]


def test_bad_watch_requests():
    dbg = debugger()
    for size in (0, -1, 1 << 21):
        with pytest.raises(CommandError):
            dbg.watch(KDATA, size)
    with pytest.raises(CommandError, match="cannot watch"):
        dbg.watch(0x1234_5000)
