"""Injected interrupts, NMIs and exceptions; IF and the STI shadow; IDT redirection.

Expected frames from SDM vol. 3A 6.14.2 (Figure 6-9): an external interrupt pushes the
RIP of the instruction it interrupts, no error code and the RFLAGS as they were; an
injected fault-class exception pushes its error code and RF (vol. 3B 17.3.1.1). A
maskable interrupt waits for IF=1 (6.8.1) and for one instruction after STI (vol. 2B).
"""

from __future__ import annotations

import pytest
from test_traps_kit import (
    HANDLERS,
    IDT_PA,
    KERNEL_CS,
    KERNEL_SS,
    KSTACK_TOP,
    KTEXT,
    RSP0,
    USER_CS,
    USER_SS,
    USTACK_TOP,
    UTEXT,
    asm,
    build,
    gate,
    qwords,
)

from kctx_debug.arch.descriptors import IdtGate, SystemDescriptorType
from kctx_debug.errors import CommandError
from kctx_debug.traps.events import TrapKind

IF, RF, FIXED = 0x200, 0x10000, 0x2
TOP = (KSTACK_TOP - 0x18) & ~0xF  # the kernel stack's frame base: RSP aligned to 16
STUB = HANDLERS + 0x40


def frame(dbg, n):
    return qwords(dbg.read_virtual(dbg.machine.reg_read("rsp"), 8 * n))


NOPS = asm("90 90 90 ebfe")  # nop; nop; nop; jmp $


def kit(code=NOPS, **kw):
    gates = {0x20: gate(HANDLERS), 0x21: gate(HANDLERS), 2: gate(HANDLERS), 14: gate(HANDLERS)}
    gates.update(kw.pop("gates", {}))
    return build(code, gates=gates, handlers={HANDLERS: asm("f4"), STUB: asm("f4")}, **kw)


def test_interrupt_with_if_set_is_delivered_at_once():
    dbg = kit().debugger()
    dbg.stepi()
    event = dbg.inject(0x20)
    assert (event.kind, event.vector, event.name, event.handler) == (
        TrapKind.INTERRUPT, 0x20, "irq 0x20", HANDLERS,
    )  # fmt: skip
    assert (event.rip, event.error_code) == (KTEXT + 1, None)
    m = dbg.machine
    assert (m.reg_read("rip"), m.reg_read("rsp"), m.reg_read("rflags")) == (
        HANDLERS,
        TOP - 40,
        FIXED,
    )
    assert frame(dbg, 5) == [KTEXT + 1, KERNEL_CS, IF | FIXED, KSTACK_TOP - 0x18, KERNEL_SS]
    assert m.icount == 1  # delivery executes no instruction


def test_interrupt_waits_for_if_and_the_sti_shadow():
    # cli; nop; sti; nop; nop; jmp $
    dbg = kit(asm("fa 90 fb 90 90 ebfe")).debugger()
    dbg.stepi()
    assert dbg.inject(0x20) is None and dbg.pending_interrupts.vectors() == (0x20,)
    dbg.break_at(HANDLERS)
    event = dbg.cont()
    # nop, sti, then the shadowed nop; the interrupt arrives before the next nop.
    assert (event.kind, event.rip, dbg.machine.icount) == (TrapKind.BREAKPOINT, HANDLERS, 4)
    irq = dbg.trap_log[1]  # after the stepi's stop
    assert (irq.name, irq.rip, irq.handler) == ("irq 0x20", KTEXT + 4, HANDLERS)
    assert frame(dbg, 5) == [KTEXT + 4, KERNEL_CS, IF | FIXED, KSTACK_TOP - 0x18, KERNEL_SS]
    assert not dbg.pending_interrupts


def test_interrupt_wakes_a_halted_processor():
    # cli; sti; hlt; nop: the hlt is in the STI shadow, the interrupt wakes it.
    dbg = kit(asm("fa fb f4 90 ebfe")).debugger()
    dbg.stepi()
    dbg.inject(0x21)
    dbg.break_at(HANDLERS)
    dbg.cont()
    assert dbg.trap_log[1].rip == KTEXT + 3  # the instruction after hlt
    assert frame(dbg, 1) == [KTEXT + 3]


def test_forced_interrupt_and_nmi_ignore_if():
    dbg = kit(asm("fa 90 ebfe")).debugger()
    dbg.stepi()
    event = dbg.inject(0x21, force=True)
    assert (event.name, event.handler) == ("irq 0x21", HANDLERS)
    assert frame(dbg, 3) == [KTEXT + 1, KERNEL_CS, FIXED]  # IF was clear
    dbg = kit(asm("fa 90 ebfe")).debugger()
    dbg.stepi()
    event = dbg.inject(2)
    assert (event.kind, event.name, event.handler) == (TrapKind.INTERRUPT, "NMI", HANDLERS)


def test_injected_page_fault_pushes_error_code_and_sets_cr2():
    dbg = kit().debugger()
    event = dbg.inject(14, error_code=0x5, cr2=0x1234_0000)
    assert (event.kind, event.name, event.error_code, event.cr2) == (
        TrapKind.EXCEPTION, "#PF", 5, 0x1234_0000,
    )  # fmt: skip
    assert dbg.machine.reg_read("cr2") == 0x1234_0000
    assert frame(dbg, 6) == [5, KTEXT, KERNEL_CS, RF | IF | FIXED, KSTACK_TOP - 0x18, KERNEL_SS]
    dbg = kit().debugger()
    dbg.inject(13)  # #GP pushes an error code: 0 unless given
    assert frame(dbg, 2) == [0, KTEXT]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((256,), "outside"),
        ((-1,), "outside"),
        ((3, 1), "no error code"),
        ((0x20, 1), "no error code"),
        ((13, 1 << 32), "32 bits"),
        ((13, None, 0x1000), "cr2"),
    ],
)
def test_bad_injections(args, match):
    dbg = kit().debugger()
    with pytest.raises(CommandError, match=match):
        dbg.inject(*args)
    assert dbg.trap_log == [] and dbg.machine.reg_read("rip") == KTEXT


def test_idt_set_rewrites_the_gate_in_guest_memory():
    k = kit()
    dbg = k.debugger()
    new = dbg.idt_set(0x20, STUB)
    raw = dbg.machine.read_physical(IDT_PA + 16 * 0x20, 16)
    assert IdtGate.from_bytes(raw) == new == gate(STUB)
    assert dbg.inject(0x20).handler == STUB
    # A not-present gate becomes a present interrupt gate through the kernel CS.
    dbg = kit(gates={0x30: IdtGate()}).debugger()
    new = dbg.idt_set(0x30, STUB)
    assert (new.p, new.type, new.selector, new.offset) == (
        True, SystemDescriptorType.INTERRUPT_GATE, KERNEL_CS, STUB,
    )  # fmt: skip
    with pytest.raises(CommandError):
        dbg.idt_set(0x30, 0x8000_0000_0000_0000)


def test_user_int3_to_a_debugger_stub_then_back():
    # The flow of issue 6 item 5: user int3 -> a stub (a breakpoint on its iretq shows
    # the frame) -> continue runs the iretq back to ring 3.
    user = asm("90 cc b807000000 ebfe")  # nop; int3; mov eax, 7; jmp $
    k = build(user_code=user, cpl=3, gates={3: gate(dpl=3)}, handlers={STUB: asm("48cf")})
    dbg = k.debugger()
    dbg.idt_set(3, STUB)
    dbg.break_at(STUB)
    event = dbg.cont()
    assert (event.kind, event.rip, dbg.machine.cpl) == (TrapKind.BREAKPOINT, STUB, 0)
    tf = dbg.read_trap_frame()
    assert (tf.rip, tf.cs, tf.rflags, tf.rsp, tf.ss) == (
        UTEXT + 2, USER_CS, IF | FIXED, USTACK_TOP - 0x18, USER_SS,
    )  # fmt: skip
    assert dbg.machine.reg_read("rsp") == RSP0 - 40
    dbg.cont(count=2)  # iretq, mov eax, 7
    m = dbg.machine
    assert (m.cpl, m.reg_read("rip"), m.reg_read("rax") & 0xFF) == (3, UTEXT + 7, 7)
