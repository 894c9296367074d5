"""The trap fixture kernels (fixtures/traps): deterministic builds and hand-computed frames.

Independent truth: every expected value below is worked out by hand from the fixture's
assembly source and the SDM, with addresses taken from the committed ELF by pyelftools
(not from the snapshot or the emulator):

- SDM vol. 3A 6.14.2 and Figure 6-9: in 64-bit mode the processor aligns the new
  stack to 16 bytes and pushes SS, RSP, RFLAGS, CS, RIP, then the error code if the
  vector has one. The stack is TSS.RSP0 on a privilege change (CPL3 -> CPL0), the
  gate's IST slot when it names one, else the current one. On a privilege change SS
  becomes a null selector (6.14.4). Through an interrupt gate IF is cleared; TF, NT,
  RF are cleared always (6.12.1.2).
- RFLAGS.RF is set in the image pushed for a fault (SDM vol. 3A 18.3.1.1), not for a
  trap such as int3 or an interrupt, nor for #DF, an abort.
- #PF's error code (SDM vol. 3A 4.7): P=0 (not present), W/R=1 (write), U/S=1 (CPL3).
- #DF (6.15, Table 6-5): a #PF while delivering a #PF; error code 0; saved RIP that
  of the faulting instruction (the SDM calls it undefined; QEMU pushes the same,
  tests/test_qemu_frames.py).
- SYSCALL (SDM vol. 2B): RCX = next RIP, R11 = RFLAGS, RFLAGS &= ~IA32_FMASK, CS =
  STAR[47:32], SS = STAR[47:32] + 8, RSP unchanged; SYSRET: CS = STAR[63:48] + 16,
  SS = STAR[63:48] + 8.
- Instruction counts: each loop and handler counted from the source.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kctx_debug.emulator.machine import Machine
from kctx_debug.pagetables.context import open_context
from kctx_debug.traps.debugger import Debugger
from kctx_debug.traps.events import TrapKind
from kctx_debug.traps.trace import read_trace

TRAPS = Path(__file__).resolve().parent.parent / "fixtures" / "traps"
NAMES = ("int3", "pagefault", "doublefault", "syscall", "timer")
MASK64 = (1 << 64) - 1


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_traps", TRAPS / "make_traps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_traps", module)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
LAYOUT = sys.modules["layout"]
RSP0_TOP, IST1_TOP = LAYOUT.RSP0_TOP, LAYOUT.IST1_TOP
USER_STACK_TOP, STACKS_VA = LAYOUT.USER_STACK_TOP, LAYOUT.STACKS_VA
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS = 0x10, 0x18, 0x33, 0x2B
# RFLAGS bits (SDM vol. 1 3.4.3): bit 1 is always set.
FIXED, CF, PF, AF, SF, IF, RF = 0x2, 0x1, 0x4, 0x10, 0x80, 0x200, 0x10000
USER_FLAGS = FIXED | IF  # the snapshots start ring 3 with RFLAGS 0x202


def symbols(name: str) -> dict[str, int]:
    return LAYOUT.elf_symbols(TRAPS / "bin" / f"{name}.elf")


@pytest.fixture
def debugger() -> Iterator:
    opened = []

    def open_fixture(name: str) -> Debugger:
        ctx = open_context(TRAPS / f"{name}.json")
        opened.append(ctx)
        return Debugger(Machine.from_context(ctx))

    yield open_fixture
    for ctx in opened:
        ctx.close()


def frame_at_rsp(dbg: Debugger, words: int) -> bytes:
    return dbg.read_virtual(dbg.machine.reg_read("rsp"), 8 * words)


def qwords(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *(v & MASK64 for v in values))


def enter_handler(dbg: Debugger, handler: int) -> None:
    """Run on (every trap delivered) until the handler's first instruction."""
    if dbg.machine.reg_read("rip") == handler:
        dbg.stepi(1)
    event = dbg.until(handler)
    assert (event.kind, event.name, event.rip) == (TrapKind.STOP, "until", handler)


def assert_kernel_entry(dbg: Debugger, rsp: int, ss: int, rflags: int) -> None:
    m = dbg.machine
    assert (m.cpl, m.reg_read("cs"), m.reg_read("ss")) == (0, KERNEL_CS, ss)
    assert m.reg_read("rsp") == rsp
    assert m.reg_read("rflags") == rflags


# -- deterministic builds ------------------------------------------------------------------


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="needs GNU as/ld")
@pytest.mark.parametrize("name", NAMES)
def test_rebuild_gives_the_committed_bytes(tmp_path: Path, name: str) -> None:
    elf, snapshot = GEN.build_fixture(name, tmp_path)
    assert elf.read_bytes() == (TRAPS / "bin" / f"{name}.elf").read_bytes()
    assert snapshot.read_bytes() == (TRAPS / f"{name}.json").read_bytes()


def test_every_fixture_has_a_trace_naming_its_snapshot() -> None:
    assert sorted(GEN.FIXTURES) == sorted(NAMES)
    for name in NAMES:
        trace = read_trace(TRAPS / f"{name}.ktrace.jsonl")
        assert trace.header.snapshot == f"{name}.json"
        assert trace.complete


# -- int3: ring 3 -> DPL3 interrupt gate -> CPL0 on RSP0 -> iretq -------------------------------


def test_int3_frame(debugger) -> None:
    s = symbols("int3")
    dbg = debugger("int3")
    for hit in range(3):
        enter_handler(dbg, s["bp_handler"])
        # Privilege change: RSP0 (16-aligned), 5 quadwords, no error code; SS null.
        assert_kernel_entry(dbg, RSP0_TOP - 5 * 8, ss=0, rflags=FIXED)
        # int3 is a trap: the pushed RIP is the next instruction; RF clear in the image.
        expected = qwords(s["user_int3"] + 1, USER_CS, USER_FLAGS, USER_STACK_TOP, USER_DS)
        assert frame_at_rsp(dbg, 5) == expected
        assert dbg.machine.reg_read("rax") == 1 << hit  # add rax, rax once per loop


def test_int3_trace_events() -> None:
    s = symbols("int3")
    events = read_trace(TRAPS / "int3.ktrace.jsonl").events
    # mov rax,1 + int3 = 2; then 5 handler + 4 loop instructions per trap.
    assert [(e.kind, e.vector, e.icount, e.rip) for e in events] == [
        (TrapKind.EXCEPTION, 3, 2, s["user_int3"]),
        (TrapKind.EXCEPTION, 3, 11, s["user_int3"]),
        (TrapKind.EXCEPTION, 3, 20, s["user_int3"]),
        (TrapKind.STOP, None, 28, s["done"]),
    ]
    assert {(e.handler, e.error_code, e.cpl, e.cs) for e in events[:3]} == {
        (s["bp_handler"], None, 3, USER_CS)
    }


# -- pagefault: #PF, the handler maps the page, the access is retried ----------------------------


def test_pagefault_frames_and_retry(debugger) -> None:
    s = symbols("pagefault")
    dbg = debugger("pagefault")
    for faulting, cr2 in ((s["first_write"], 0x600000), (s["second_write"], 0x602000)):
        enter_handler(dbg, s["pf_handler"])
        assert_kernel_entry(dbg, RSP0_TOP - 6 * 8, ss=0, rflags=FIXED)
        # A fault: RIP of the faulting instruction, RF set; error code P=0 W=1 U=1.
        expected = qwords(0b110, faulting, USER_CS, USER_FLAGS | RF, USER_STACK_TOP, USER_DS)
        assert frame_at_rsp(dbg, 6) == expected
        assert dbg.machine.reg_read("cr2") == cr2
    final = dbg.until(s["done"])
    assert final.name == "until"
    assert dbg.read_virtual(0x600000, 8) == qwords(0x1234)
    assert dbg.read_virtual(0x602000, 8) == qwords(0x1234)
    # The handler gave out frames 0x302000 and 0x303000, in fault order.
    assert dbg.machine.virt_to_phys(0x600000) == 0x302000
    assert dbg.machine.virt_to_phys(0x602000) == 0x303000
    assert dbg.machine.reg_read("rbx") == 0x1234


def test_pagefault_trace_events() -> None:
    s = symbols("pagefault")
    events = read_trace(TRAPS / "pagefault.ktrace.jsonl").events
    assert [(e.kind, e.vector, e.error_code, e.cr2, e.rip) for e in events[:2]] == [
        (TrapKind.EXCEPTION, 14, 0b110, 0x600000, s["first_write"]),
        (TrapKind.EXCEPTION, 14, 0b110, 0x602000, s["second_write"]),
    ]
    # The second fault is a #PF, not the #DF Unicorn's nested-fault bookkeeping would make.
    assert [e.name for e in events] == ["#PF", "#PF", "until"]
    # mov rsi (1), then the first write faults without retiring.
    assert events[0].icount == 1


# -- doublefault: #PF while delivering #PF -> #DF on IST1 ------------------------------------------


def test_doublefault_frame_on_ist1(debugger) -> None:
    s = symbols("doublefault")
    dbg = debugger("doublefault")
    enter_handler(dbg, s["df_handler"])
    # IST1 (16-aligned), 6 quadwords with error code 0; no privilege change (CPL0 ->
    # CPL0), so SS is the one the #BP delivery left: null. #DF is an abort: no RF.
    assert_kernel_entry(dbg, IST1_TOP - 6 * 8, ss=0, rflags=FIXED)
    # The call that overflowed: RSP at the bottom of the mapped stack (guard page below).
    stack_bottom = STACKS_VA + 0x2000
    expected = qwords(0, s["recurse"], KERNEL_CS, FIXED, stack_bottom, 0)
    assert frame_at_rsp(dbg, 6) == expected
    assert dbg.machine.reg_read("cr2") == stack_bottom - 8  # the push that faulted


def test_doublefault_trace_events() -> None:
    s = symbols("doublefault")
    events = read_trace(TRAPS / "doublefault.ktrace.jsonl").events
    assert [(e.name, e.vector, e.error_code, e.cr2, e.rip, e.handler) for e in events] == [
        ("#BP", 3, None, None, s["user_start"], s["bp_handler"]),
        # Supervisor write, not present: error code 0b010; not delivered (no handler).
        ("#PF", 14, 0b010, STACKS_VA + 0x1FF8, s["recurse"], None),
        ("#DF", 8, 0, None, s["recurse"], s["df_handler"]),
        ("halt", None, None, None, s["df_halt"] + 1, None),
    ]


def test_doublefault_instruction_count() -> None:
    events = read_trace(TRAPS / "doublefault.ktrace.jsonl").events
    # int3 (1) + mov rbp, rsp (1) + (0x3fd8 - 0x2000) / 8 = 1019 calls that retired.
    assert events[1].icount == 1 + 1 + 1019


# -- syscall: LSTAR entry and sysretq -----------------------------------------------------------


def test_syscall_entry_state(debugger) -> None:
    s = symbols("syscall")
    dbg = debugger("syscall")
    m = dbg.machine
    sfmask = 0x47700
    for syscall_at, number in ((s["first_syscall"], 39), (s["second_syscall"], 102)):
        enter_handler(dbg, s["syscall_entry"])
        # CS = STAR[47:32] = 0x10, SS = 0x18; RSP is not switched by SYSCALL.
        assert_kernel_entry(dbg, USER_STACK_TOP, ss=KERNEL_DS, rflags=USER_FLAGS & ~sfmask)
        assert m.reg_read("rcx") == syscall_at + 2  # syscall is 0f 05
        assert m.reg_read("r11") == USER_FLAGS
        assert m.reg_read("rax") == number
    assert dbg.until(s["second_syscall"] + 2).name == "until"
    # SYSRET: CS = STAR[63:48] + 16 = 0x33, SS = STAR[63:48] + 8 = 0x2b, RFLAGS = R11.
    assert (m.cpl, m.reg_read("cs"), m.reg_read("ss")) == (3, USER_CS, USER_DS)
    assert m.reg_read("rflags") == USER_FLAGS
    assert m.reg_read("rax") == 102 + 1000
    assert dbg.until(s["done"]).name == "until"
    # add rbx, rax: 0x40f + 0x44e = 0x85d: AF (0xf + 0xe carries out of bit 3), PF clear
    # (0x5d has five bits set), no CF, ZF, SF or OF.
    assert m.reg_read("rbx") == (39 + 1000) + (102 + 1000)
    assert m.reg_read("rflags") == USER_FLAGS | AF
    assert dbg.read_virtual(s["syscall_count"], 8) == qwords(2)


def test_syscall_trace_events() -> None:
    s = symbols("syscall")
    events = read_trace(TRAPS / "syscall.ktrace.jsonl").events
    assert [(e.kind, e.rip, e.handler, e.icount) for e in events] == [
        (TrapKind.SYSCALL, s["first_syscall"], s["syscall_entry"], 2),
        # 10 entry instructions + sysretq, then mov rbx, mov eax, mov rdi, syscall.
        (TrapKind.SYSCALL, s["second_syscall"], s["syscall_entry"], 2 + 12 + 4),
        (TrapKind.STOP, s["done"], None, 18 + 12 + 1),
    ]


# -- timer: vector 32 injected at fixed instruction counts -----------------------------------------


# icount -> (rcx, where the loop is, status flags of the interrupted code), by hand.
# xor (1), then inc/cmp/jne per iteration; each handler run before adds 6 (push, mov,
# inc, mov, pop, iretq).
# 100 = 1 + 3*33: 33 loops, next inc; cmp 33 - 1000 = ...fc39: CF, SF, AF (1 - 8
#   borrows), PF (0x39 has four bits set).
# 1001 - 6 = 1 + 3*331 + 1: inc done, rcx 332 = 0x14c (three bits: no PF, no AF), next
#   cmp; CF still from cmp 331 - 1000.
# 2500 - 12 = 1 + 3*829: next inc; cmp 829 - 1000 = ...ff55: CF, SF, PF (0x55: four
#   bits), no AF (0xd - 0x8 does not borrow).
TIMER_POINTS = (
    (100, 33, "user_loop", CF | PF | AF | SF),
    (1001, 332, "user_loop+3", CF),
    (2500, 829, "user_loop", CF | PF | SF),
)


def test_timer_frames(debugger) -> None:
    s = symbols("timer")
    dbg = debugger("timer")
    m = dbg.machine
    for icount, rcx, where, flags in TIMER_POINTS:
        stop = dbg.cont(count=icount - m.icount)
        assert (stop.name, m.icount, m.reg_read("rcx")) == ("budget", icount, rcx)
        event = dbg.inject(32)
        assert event is not None and event.kind is TrapKind.INTERRUPT
        assert m.reg_read("rip") == s["timer_handler"]
        # The interrupt gate clears IF only: the status flags go on into the handler.
        assert_kernel_entry(dbg, RSP0_TOP - 5 * 8, ss=0, rflags=FIXED | flags)
        label, _, offset = where.partition("+")
        rip = s[label] + int(offset or 0)
        expected = qwords(rip, USER_CS, USER_FLAGS | flags, USER_STACK_TOP, USER_DS)
        assert frame_at_rsp(dbg, 5) == expected
    assert dbg.until(s["done"]).icount == 1 + 3 * 1000 + 3 * 6
    assert dbg.read_virtual(s["ticks"], 8) == qwords(3)


def test_timer_trace_records_injection_points() -> None:
    s = symbols("timer")
    trace = read_trace(TRAPS / "timer.ktrace.jsonl")
    assert trace.header.options.inject == ((100, 32), (1001, 32), (2500, 32))
    assert [(e.kind, e.vector, e.icount, e.rip) for e in trace.events] == [
        (TrapKind.INTERRUPT, 32, 100, s["user_loop"]),
        (TrapKind.INTERRUPT, 32, 1001, s["user_loop"] + 3),
        (TrapKind.INTERRUPT, 32, 2500, s["user_loop"]),
        (TrapKind.STOP, None, 3019, s["done"]),
    ]


# -- through the plugin's fixture, so `pytest tests/` replays every trace too ----------------------


@pytest.mark.parametrize("name", NAMES)
def test_fixture_trace_replays_identically(kctx_replay, name: str) -> None:
    result = kctx_replay(TRAPS / f"{name}.ktrace.jsonl")
    assert result.ok and result.events == len(read_trace(TRAPS / f"{name}.ktrace.jsonl").events)
