"""Trap delivery through the guest IDT/TSS, checked frame by frame against the SDM.

Every expected frame is worked out by hand from SDM vol. 3A 6.12-6.15 and Figure 6-9:
the stack chosen (current, TSS.RSP0, TSS.IST1), RSP aligned down to 16, then SS, RSP,
RFLAGS, CS, RIP and the error code pushed; RF set in the pushed RFLAGS for faults
(vol. 3B 17.3.1.1); IF cleared through an interrupt gate; SS null on a privilege change.
Error codes follow 6.13 (selector/IDT format, EXT) and 4.7 (#PF).
"""

from __future__ import annotations

import struct

import pytest
from test_traps_kit import (
    ABSENT_CS,
    CODE32_CS,
    HANDLERS,
    IDT_PA,
    IST1_TOP,
    KERNEL_CS,
    KERNEL_SS,
    KSTACK,
    KSTACK_TOP,
    KTEXT,
    RSP0,
    TRAP_GATE,
    UNMAPPED,
    USER_CS,
    USER_SS,
    USTACK_TOP,
    UTEXT,
    asm,
    build,
    gate,
    load_abs,
    qwords,
    store_abs,
)

from kctx_debug.arch.descriptors import IdtGate
from kctx_debug.cli import demo_snapshot_path
from kctx_debug.emulator.machine import Machine
from kctx_debug.errors import CommandError
from kctx_debug.pagetables.context import open_context
from kctx_debug.traps.debugger import Debugger
from kctx_debug.traps.delivery import StackSource, TrapFrame, TripleFault, deliver
from kctx_debug.traps.events import TrapKind
from kctx_debug.traps.exceptions import (
    Escalation,
    Trap,
    TrapSource,
    escalation,
    idt_error_code,
    selector_error_code,
)

IF, RF, FIXED = 0x200, 0x10000, 0x2
# Handler that skips an `int n` after a #GP: add rsp, 8 (drop the error code);
# add qword [rsp], 2 (past the 2-byte int); iretq.
SKIP_INT_HANDLER = asm("4883c408 4883042402 48cf")


def frame_at(dbg: Debugger, address: int, n: int) -> list[int]:
    return qwords(dbg.read_virtual(address, 8 * n))


# -- the bundled demo: int3 -> DPL3 gate -> CPL0 on RSP0 -> iretq; syscall -> sysretq --


@pytest.fixture
def demo():
    ctx = open_context(demo_snapshot_path())
    return Debugger(Machine.from_context(ctx))


def test_demo_int3_is_delivered_on_rsp0_and_iretq_returns(demo):
    sym = demo.symbols.address
    int3 = sym("user_start") + 14  # after two 7-byte `mov r64, imm32`
    rsp0 = 0xFFFF_C900_0000_4000  # TSS.RSP0 in fixtures/make_demo.py
    user_rsp = 0x7FFF_FFFF_F000 + 0x1000 - 0x10
    event = demo.cont(count=3)  # mov, mov, int3 (a trap: it retires)
    assert (event.kind, event.name, demo.machine.icount) == (TrapKind.STOP, "budget", 3)
    delivered = demo.trap_log[0]
    assert (delivered.kind, delivered.vector, delivered.name, delivered.rip) == (
        TrapKind.EXCEPTION, 3, "#BP", int3,
    )  # fmt: skip
    assert (delivered.handler, delivered.handler_symbol) == (sym("bp_handler"), "bp_handler")
    assert (delivered.cpl, delivered.cs, delivered.error_code) == (3, USER_CS, None)
    m = demo.machine
    # Privilege change 3 -> 0: RSP0, already 16-aligned; five quadwords, no error code;
    # int3 is a trap: the pushed RIP is the next instruction, RF not set.
    assert m.reg_read("rsp") == rsp0 - 5 * 8
    assert frame_at(demo, rsp0 - 40, 5) == [int3 + 1, USER_CS, IF | FIXED, user_rsp, USER_SS]
    assert (m.reg_read("rip"), m.cpl, m.reg_read("cs"), m.reg_read("ss")) == (
        sym("bp_handler"), 0, KERNEL_CS, 0,
    )  # fmt: skip
    assert m.reg_read("rflags") == FIXED  # the demo's gates are interrupt gates: IF cleared
    demo.cont(count=9)  # the handler, ending with iretq
    assert (m.cpl, m.reg_read("rip"), m.reg_read("rsp")) == (3, int3 + 1, user_rsp)
    assert (m.reg_read("cs"), m.reg_read("ss"), m.reg_read("rflags")) == (USER_CS, USER_SS, 0x202)
    assert int.from_bytes(demo.read_virtual(sym("bp_count"), 8), "little") == 1


def test_demo_syscall_enters_lstar_and_sysretq_returns(demo):
    sym = demo.symbols.address
    m = demo.machine
    demo.cont(count=3 + 9)  # one int3 round trip
    m.reg_write("rbx", 1)  # leave the loop after this iteration
    syscall_pc = sym("user_start") + 0x1C
    assert demo.until(syscall_pc).name == "until"
    assert demo.read_virtual(syscall_pc, 2) == b"\x0f\x05"
    flags, user_rsp = m.reg_read("rflags"), m.reg_read("rsp")
    assert flags == 0x246  # dec rbx -> 0: ZF PF, with IF
    demo.break_at(sym("syscall_entry"))
    event = demo.cont()
    assert (event.kind, event.rip) == (TrapKind.BREAKPOINT, sym("syscall_entry"))
    entry = [e for e in demo.trap_log if e.kind is TrapKind.SYSCALL]
    assert [(e.rip, e.handler, e.handler_symbol, e.cpl) for e in entry] == [
        (syscall_pc, sym("syscall_entry"), "syscall_entry", 3)
    ]
    # SDM vol. 2B SYSCALL: RCX = next RIP, R11 = RFLAGS, RFLAGS &= ~FMASK (0x47700),
    # CS = STAR[47:32] = 0x10, SS = 0x18, CPL 0, RSP untouched.
    assert (m.reg_read("rcx"), m.reg_read("r11")) == (syscall_pc + 2, flags)
    assert m.reg_read("rflags") == flags & ~0x47700
    assert (m.cpl, m.reg_read("cs"), m.reg_read("ss"), m.reg_read("rsp")) == (
        0, KERNEL_CS, KERNEL_SS, user_rsp,
    )  # fmt: skip
    assert demo.until(sym("user_start")).name == "until"  # sysretq, then jmp user_start
    assert (m.cpl, m.reg_read("cs"), m.reg_read("ss")) == (3, USER_CS, USER_SS)
    assert (m.reg_read("rax"), m.reg_read("rflags")) == (0x2A, flags)


def test_stepi_with_a_pending_trap_stops_at_the_handler_entry(demo):
    # As a hardware single step over an event: the delivery is the step, and it
    # retires no guest instruction (int3 itself retired when it trapped).
    sym = demo.symbols.address
    m = demo.machine
    demo.set_policy(3, "stop")
    event = demo.cont()
    assert (event.name, event.handler, m.reg_read("rip"), m.icount) == ("#BP", None, 0x40000F, 3)
    event = demo.stepi()
    assert (event.name, m.reg_read("rip"), m.icount, m.cpl) == ("budget", sym("bp_handler"), 3, 0)
    assert demo.pending_trap is None
    assert (demo.trap_log[-2].name, demo.trap_log[-2].handler) == ("#BP", sym("bp_handler"))
    assert int.from_bytes(demo.read_virtual(sym("bp_count"), 8), "little") == 0
    # The delivery counts as one of N: stepi 3 = delivery + push rbp + mov rbp, rsp.
    demo.finish()  # the handler's 9 instructions: icount 12
    assert demo.cont().name == "#BP"  # add, dec, jnz, int3: 16
    assert demo.stepi(3).name == "budget"
    assert (m.reg_read("rip"), m.icount) == (sym("bp_handler") + 4, 16 + 2)


def test_finish_in_a_handler_returns_through_iretq(demo):
    sym = demo.symbols.address
    m = demo.machine
    user_rsp = 0x7FFF_FFFF_F000 + 0x1000 - 0x10
    count = lambda: int.from_bytes(demo.read_virtual(sym("bp_count"), 8), "little")  # noqa: E731
    demo.break_at(sym("bp_handler"))
    assert demo.cont().kind is TrapKind.BREAKPOINT
    assert (m.reg_read("rip"), m.cpl, count()) == (sym("bp_handler"), 0, 0)
    assert demo.trap_frame().rip == sym("user_start") + 0xF
    event = demo.finish()
    # The handler's 9 instructions, iretq last: back after the int3, CPL3, user stack.
    assert (event.name, m.reg_read("rip"), m.icount) == ("until", 0x40000F, 3 + 9)
    assert (m.cpl, m.reg_read("cs"), m.reg_read("rsp"), count()) == (3, USER_CS, user_rsp, 1)
    assert demo.trap_frame() is None  # back in the interrupted code
    # From inside the handler's body (RSP below the entry RSP) too.
    demo.cont()
    demo.stepi(3)
    assert demo.finish().name == "until"
    # add, dec, jnz, int3, then the handler again: 4 + 9 more.
    assert (m.reg_read("rip"), m.cpl, m.icount, count()) == (0x40000F, 3, 12 + 13, 2)


# -- small contexts -------------------------------------------------------------------------


def test_page_fault_on_the_current_stack_frame_and_cr2():
    kit = build(asm("90") + load_abs(UNMAPPED), handlers={HANDLERS: asm("f4")},
                gates={14: gate(HANDLERS)})  # fmt: skip
    dbg = kit.debugger()
    dbg.break_at(HANDLERS)
    event = dbg.cont()
    assert (event.kind, event.rip) == (TrapKind.BREAKPOINT, HANDLERS)
    pf = dbg.trap_log[0]
    assert (pf.vector, pf.name, pf.error_code, pf.cr2, pf.rip) == (
        14,
        "#PF",
        0,
        UNMAPPED,
        KTEXT + 1,
    )
    m = dbg.machine
    # Same privilege, no IST: the current RSP (KSTACK_TOP - 0x18) aligned down to 16,
    # then 6 quadwords. A supervisor read of a not-present page: error code 0.
    top = (KSTACK_TOP - 0x18) & ~0xF
    assert m.reg_read("rsp") == top - 48
    assert frame_at(dbg, top - 48, 6) == [
        0, KTEXT + 1, KERNEL_CS, RF | IF | FIXED, KSTACK_TOP - 0x18, KERNEL_SS,
    ]  # fmt: skip
    assert (m.reg_read("cr2"), m.reg_read("ss"), m.reg_read("rflags")) == (UNMAPPED, KERNEL_SS, 2)
    assert dbg.last_delivery.stack is StackSource.CURRENT


def test_trap_gate_keeps_if_interrupt_gate_clears_it():
    for kind, expected in ((TRAP_GATE, IF | FIXED), (None, FIXED)):
        extra = {} if kind is None else {"type": kind}
        kit = build(asm("0f0b"), handlers={HANDLERS: asm("f4")}, gates={6: gate(HANDLERS, **extra)})
        dbg = kit.debugger()
        dbg.break_at(HANDLERS)
        dbg.cont()
        assert dbg.machine.reg_read("rflags") == expected
        # #UD: a fault without an error code; RIP of the ud2, RF in the image.
        top = (KSTACK_TOP - 0x18) & ~0xF
        assert frame_at(dbg, top - 40, 5) == [
            KTEXT, KERNEL_CS, RF | IF | FIXED, KSTACK_TOP - 0x18, KERNEL_SS,
        ]  # fmt: skip


def test_user_page_fault_switches_to_rsp0_with_null_ss():
    user = asm("90") + store_abs(UNMAPPED)
    kit = build(user_code=user, cpl=3, handlers={HANDLERS: asm("f4")}, gates={14: gate(HANDLERS)})
    dbg = kit.debugger()
    dbg.break_at(HANDLERS)
    dbg.cont()
    m = dbg.machine
    # A user-mode write to a not-present page: W/R | U/S = 0x6 (SDM vol. 3A Figure 4-12).
    assert (dbg.trap_log[0].error_code, dbg.trap_log[0].cpl) == (0x6, 3)
    assert (m.cpl, m.reg_read("cs"), m.reg_read("ss"), m.reg_read("rsp")) == (
        0, KERNEL_CS, 0, RSP0 - 48,
    )  # fmt: skip
    assert frame_at(dbg, RSP0 - 48, 6) == [
        6, UTEXT + 1, USER_CS, RF | IF | FIXED, USTACK_TOP - 0x18, USER_SS,
    ]  # fmt: skip
    assert dbg.last_delivery.stack is StackSource.RSP


def test_int_through_dpl0_gate_from_cpl3_is_gp_and_iretq_returns():
    user = asm("90 cd80 b807000000 ebfe")  # nop; int 0x80; mov eax, 7; jmp $
    kit = build(user_code=user, cpl=3, handlers={HANDLERS: SKIP_INT_HANDLER},
                gates={13: gate(HANDLERS)})  # fmt: skip
    dbg = kit.debugger()
    dbg.break_at(HANDLERS)
    dbg.cont()
    raised, delivered = dbg.trap_log[0], dbg.trap_log[1]
    # int 0x80 checks gate DPL (0) >= CPL (3): #GP(0x80 * 8 + 2), EXT = 0 for INT n.
    assert (raised.name, raised.handler) == ("int 0x80", None)
    assert (delivered.name, delivered.error_code, delivered.rip) == ("#GP", 0x402, UTEXT + 1)
    assert idt_error_code(0x80, ext=False) == 0x402
    assert frame_at(dbg, RSP0 - 48, 6) == [
        0x402, UTEXT + 1, USER_CS, RF | IF | FIXED, USTACK_TOP - 0x18, USER_SS,
    ]  # fmt: skip
    event = dbg.cont(count=3 + 1)  # the handler (3) and mov eax, 7 at CPL3
    m = dbg.machine
    assert (event.name, m.cpl, m.reg_read("rip"), m.reg_read("rax") & 0xFF) == (
        "budget", 3, UTEXT + 8, 7,
    )  # fmt: skip
    assert (m.reg_read("rsp"), m.reg_read("cs"), m.reg_read("ss")) == (
        USTACK_TOP - 0x18, USER_CS, USER_SS,
    )  # fmt: skip


def test_int3_through_dpl0_gate_is_gp_0x1a():
    kit = build(
        user_code=asm("cc"), cpl=3, gates={13: gate(HANDLERS)}, handlers={HANDLERS: b"\xf4"}
    )
    dbg = kit.debugger()
    dbg.cont()
    assert [(e.name, e.error_code) for e in dbg.trap_log[:2]] == [("#BP", None), ("#GP", 0x1A)]
    assert frame_at(dbg, RSP0 - 48, 6)[:2] == [0x1A, UTEXT]  # RIP of the int3 (a fault now)


def test_not_present_gate_is_np_with_idt_error_code():
    # Software int3: EXT = 0 -> 3 * 8 + 2 = 0x1a. Hardware #UD: EXT = 1 -> 0x33.
    kit = build(user_code=asm("cc"), cpl=3, gates={3: gate(dpl=3, p=False), 11: gate(HANDLERS)},
                handlers={HANDLERS: b"\xf4"})  # fmt: skip
    dbg = kit.debugger()
    dbg.cont()
    assert [(e.name, e.error_code, e.handler) for e in dbg.trap_log[:2]] == [
        ("#BP", None, None), ("#NP", 0x1A, HANDLERS),
    ]  # fmt: skip
    kit = build(asm("0f0b"), gates={6: gate(p=False), 11: gate(HANDLERS)},
                handlers={HANDLERS: b"\xf4"})  # fmt: skip
    dbg = kit.debugger()
    dbg.cont()
    assert [(e.name, e.error_code) for e in dbg.trap_log[:2]] == [("#UD", None), ("#NP", 0x33)]
    top = (KSTACK_TOP - 0x18) & ~0xF
    assert frame_at(dbg, top - 48, 2) == [0x33, KTEXT]


@pytest.mark.parametrize(
    ("bad_gate", "vector", "error_code"),
    [
        (gate(selector=CODE32_CS), 13, CODE32_CS | 1),  # not 64-bit code: #GP(sel+EXT)
        (gate(selector=ABSENT_CS), 11, ABSENT_CS | 1),  # not present: #NP(sel+EXT)
        (gate(selector=0), 13, 1),  # null selector: #GP(EXT)
        (gate(handler=0x8000_0000_0000_0000), 13, 1),  # non-canonical: #GP(EXT)
        (gate(type=0xC), 13, 6 * 8 + 3),  # a call gate type: #GP(IDT+EXT)
    ],
)
def test_bad_gate_checks(bad_gate, vector, error_code):
    kit = build(asm("0f0b"), gates={6: bad_gate})
    machine = kit.machine()
    result = deliver(machine, Trap(6, TrapSource.FAULT, KTEXT, pc=KTEXT))
    assert [t.vector for t in result.chain] == [6, vector]
    assert result.trap.error_code == error_code
    assert result.frame.error_code == error_code and result.frame.rip == KTEXT


def test_vector_beyond_idt_limit_is_gp_with_idt_error_code():
    kit = build(idt_limit=0x2FF)  # gates 0-47
    machine = kit.machine()
    result = deliver(machine, Trap(0x40, TrapSource.EXTERNAL, KTEXT))
    assert [t.vector for t in result.chain] == [0x40, 13]
    assert result.trap.error_code == 0x40 * 8 + 2 + 1  # IDT | EXT: an external event
    result = deliver(kit.machine(), Trap(0x40, TrapSource.SOFTWARE, KTEXT + 2, pc=KTEXT))
    assert (result.trap.error_code, result.frame.rip) == (0x40 * 8 + 2, KTEXT)


def test_stack_overflow_in_kernel_escalates_to_double_fault_on_ist():
    # rsp = KSTACK + 8: the second push faults (the page below is unmapped); delivering
    # that #PF on the same stack faults again -> #DF, through gate 8 on IST1.
    code = asm("50 50 50")
    kit = build(code, regs={"rsp": KSTACK + 8}, gates={8: gate(HANDLERS, ist=1)},
                handlers={HANDLERS: b"\xf4"})  # fmt: skip
    dbg = kit.debugger()
    dbg.break_at(HANDLERS)
    dbg.cont()
    pf, df = dbg.trap_log[0], dbg.trap_log[1]
    assert (pf.name, pf.error_code, pf.cr2, pf.handler) == ("#PF", 0x2, KSTACK - 8, None)
    assert (df.name, df.error_code, df.rip, df.handler) == ("#DF", 0, KTEXT + 1, HANDLERS)
    m = dbg.machine
    # IST1 (16-aligned), no privilege change (SS kept); #DF is an abort: no RF.
    assert m.reg_read("rsp") == IST1_TOP - 48
    assert frame_at(dbg, IST1_TOP - 48, 6) == [
        0,
        KTEXT + 1,
        KERNEL_CS,
        IF | FIXED,
        KSTACK,
        KERNEL_SS,
    ]
    assert (m.reg_read("ss"), dbg.last_delivery.stack) == (KERNEL_SS, StackSource.IST)
    assert "stack push" in dbg.last_delivery.reasons[0]


def test_fault_delivering_double_fault_is_a_triple_fault():
    kit = build(asm("50 50 50"), regs={"rsp": KSTACK + 8}, gates={8: gate(HANDLERS, ist=1)},
                ist1=UNMAPPED + 0x1000)  # fmt: skip
    dbg = kit.debugger()
    event = dbg.cont()
    assert (event.kind, event.name, event.rip) == (TrapKind.STOP, "triple fault", KTEXT + 1)
    assert isinstance(dbg.shutdown, TripleFault)
    assert [t.name for t in dbg.shutdown.chain] == ["#PF", "#DF"]
    m = dbg.machine
    assert (m.reg_read("rip"), m.reg_read("rsp")) == (KTEXT + 1, KSTACK)  # nothing changed
    with pytest.raises(CommandError, match="shut down"):
        dbg.cont()


def test_escalation_follows_table_6_5():
    def t(vector, source=TrapSource.FAULT):
        return Trap(vector, source, 0)

    assert escalation(t(0), 13) is Escalation.DOUBLE_FAULT  # contributory, contributory
    assert escalation(t(13), 14) is Escalation.SERIAL  # contributory, then #PF
    assert escalation(t(14), 13) is Escalation.DOUBLE_FAULT
    assert escalation(t(14), 14) is Escalation.DOUBLE_FAULT
    assert escalation(t(6), 14) is Escalation.SERIAL  # benign first
    assert escalation(t(0x80, TrapSource.SOFTWARE), 13) is Escalation.SERIAL
    assert escalation(t(14, TrapSource.SOFTWARE), 14) is Escalation.SERIAL  # int 0x0e
    assert escalation(t(8), 14) is Escalation.SHUTDOWN
    assert escalation(t(8), 11) is Escalation.SHUTDOWN


def test_segment_load_gp_and_np_carry_the_selector():
    # mov ax, 0x5b; mov ds, ax: index 11 is past the GDT limit -> #GP(0x58).
    kit = build(asm("66b85b00 8ed8"))
    dbg = kit.debugger()
    dbg.set_policy(13, "stop")
    event = dbg.cont()
    assert (event.name, event.error_code, event.rip) == ("#GP", 0x58, KTEXT + 4)
    assert selector_error_code(0x5B, ext=False) == 0x58
    # A present-bit-clear code segment loaded into DS: #NP(0x48).
    kit = build(asm("66b84800 8ed8"))
    dbg = kit.debugger()
    dbg.set_policy(11, "stop")
    event = dbg.cont()
    assert (event.name, event.error_code) == ("#NP", ABSENT_CS)


def test_stop_policy_leaves_the_trap_pending_then_delivers_it():
    kit = build(load_abs(UNMAPPED), handlers={HANDLERS: asm("f4")}, gates={14: gate(HANDLERS)})
    dbg = kit.debugger()
    dbg.set_policy(14, "stop")
    event = dbg.cont()
    assert (event.kind, event.name, event.handler, event.icount) == (
        TrapKind.EXCEPTION,
        "#PF",
        None,
        0,
    )
    assert dbg.machine.reg_read("rip") == KTEXT and dbg.pending_trap.vector == 14
    event = dbg.cont(count=0)  # delivers, executes nothing
    assert (event.name, dbg.machine.reg_read("rip"), dbg.pending_trap) == ("budget", HANDLERS, None)
    assert (dbg.trap_log[1].name, dbg.trap_log[1].handler) == ("#PF", HANDLERS)
    # discard_pending: the access is retried instead (and faults again).
    kit = build(load_abs(UNMAPPED))
    dbg = kit.debugger()
    dbg.set_policy(14, "stop")
    dbg.cont()
    assert dbg.discard_pending().vector == 14
    assert dbg.cont().name == "#PF" and dbg.machine.icount == 0


def test_syscall_without_efer_sce_is_ud():
    kit = build(asm("90 0f05"), msrs={"efer": 0xD00})
    dbg = kit.debugger()
    dbg.set_policy(6, "stop")
    event = dbg.cont()
    assert (event.name, event.rip, dbg.machine.reg_read("rip"), dbg.machine.icount) == (
        "#UD", KTEXT + 1, KTEXT + 1, 1,
    )  # fmt: skip


def test_trap_frame_bytes_round_trip():
    frame = TrapFrame(0x402, 0x401000, 0x33, 0x10202, 0x7FF0, 0x2B)
    data = frame.to_bytes()
    assert data == struct.pack("<6Q", 0x402, 0x401000, 0x33, 0x10202, 0x7FF0, 0x2B)
    assert TrapFrame.from_bytes(data, error_code=True) == frame
    with pytest.raises(CommandError):
        TrapFrame.from_bytes(data[:40], error_code=True)


def test_idt_bytes_are_read_from_guest_memory(tmp_path):
    kit = build()
    raw = kit.mem.read(IDT_PA + 16 * 14, 16)
    assert IdtGate.from_bytes(raw) == gate()


NONCANONICAL = 0x8000_0000_0000_0000
# pushfq; or qword [rsp], 0x100 (TF); popfq; nop; nop: the single-step trap comes after
# the instruction that follows the popfq (SDM vol. 3B 17.3.1.4).
SINGLE_STEP = asm("9c 48814c240000010000 9d 90 90 f4")


@pytest.mark.parametrize(
    ("code", "name", "vector", "error_code", "rip", "icount"),
    [
        (asm("31c9 f7f1"), "#DE", 0, None, KTEXT + 2, 1),  # xor ecx, ecx; div ecx
        (asm("0f0b"), "#UD", 6, None, KTEXT, 0),
        # movabs rax, non-canonical; mov rbx, [rax]: #GP(0)
        (
            asm("48b8") + struct.pack("<Q", NONCANONICAL) + asm("488b18"),
            "#GP",
            13,
            0,
            KTEXT + 10,
            1,
        ),
        # mov rax, cr0; or rax, 8 (TS); mov cr0, rax; movaps xmm0, xmm1: #NM
        (asm("0f20c0 4883c808 0f22c0 0f28c1"), "#NM", 7, None, KTEXT + 10, 3),
        (SINGLE_STEP, "#DB", 1, None, KTEXT + 12, 4),  # a trap: the next RIP
        (asm("90 cd21"), "int 0x21", 0x21, None, KTEXT + 1, 2),
    ],
)
def test_cpu_exceptions_become_trap_events(code, name, vector, error_code, rip, icount):
    dbg = build(code).debugger()
    dbg.set_policy(vector, "stop")
    event = dbg.cont()
    assert (event.kind, event.name, event.vector, event.error_code, event.rip, event.icount) == (
        TrapKind.EXCEPTION, name, vector, error_code, rip, icount,
    )  # fmt: skip


def test_single_step_trap_frame_keeps_tf_in_the_image_and_clears_it():
    kit = build(SINGLE_STEP, gates={1: gate(HANDLERS)}, handlers={HANDLERS: b"\xf4"})
    dbg = kit.debugger()
    dbg.break_at(HANDLERS)
    dbg.cont()
    top = (KSTACK_TOP - 0x18) & ~0xF
    # #DB from TF is a trap: RIP after the nop, no RF; TF (0x100) in the image only.
    assert frame_at(dbg, top - 40, 5) == [
        KTEXT + 12, KERNEL_CS, 0x100 | IF | FIXED, KSTACK_TOP - 0x18, KERNEL_SS,
    ]  # fmt: skip
    assert dbg.machine.reg_read("rflags") == FIXED


def test_successive_delivered_faults_keep_their_vectors():
    # Unicorn would promote the second #GP to #DF (its nested-fault state is never
    # cleared by a real delivery); each must be delivered as #GP.
    user = asm("cd80 cd80 cd80 b807000000 ebfe")
    kit = build(user_code=user, cpl=3, handlers={HANDLERS: SKIP_INT_HANDLER},
                gates={13: gate(HANDLERS)})  # fmt: skip
    dbg = kit.debugger()
    dbg.cont(count=3 * 3 + 1)
    delivered = [(e.name, e.error_code, e.rip) for e in dbg.trap_log if e.handler is not None]
    assert delivered == [("#GP", 0x402, UTEXT + 2 * i) for i in range(3)]
    assert (dbg.machine.cpl, dbg.machine.reg_read("rax") & 0xFF) == (3, 7)
