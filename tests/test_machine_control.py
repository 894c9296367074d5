"""Running a Machine: exact instruction counts, stop reasons, traps and faults.

Counts are checked against loops whose instruction counts are worked out by hand;
page-fault error codes against SDM vol. 3A 4.7 (Figure 4-12) for the access each
test makes; trap/fault RIPs against SDM vol. 3A 6.5 (a fault reports the faulting
instruction, a trap the next one).
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from pathlib import Path

import pytest
from test_machine import (
    KDATA,
    KDATA_PA,
    KMISSING,
    KRO,
    KTEXT,
    MISSING_PA,
    UNMAPPED,
    asm,
    load_abs,
    machine_for,
    make_context,
    store_abs,
)
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
from unicorn.x86_const import UC_X86_REG_RSP

from kctx_debug.emulator import engine
from kctx_debug.emulator.control import StopKind
from kctx_debug.emulator.engine import EmulatorError, EngineLayout
from kctx_debug.emulator.machine import Machine
from kctx_debug.pagetables.context import open_context
from kctx_debug.physmem import HostRange

TRAP_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "traps"

# mov ecx, N; loop: add rax, rcx; xor rbx, rax; dec rcx; jnz loop; int3
# = 1 + 4 * N + 1 instructions (int3 is a trap: it retires).
LOOP_HEAD = 5  # bytes of `mov ecx, imm32`
LOOP_BODY = asm("4801c8 4831c3 48ffc9 75f5")


def loop(n: int) -> bytes:
    return asm("b9") + struct.pack("<I", n) + LOOP_BODY + b"\xcc"


def reference(n: int) -> tuple[int, int]:
    """rax and rbx after the loop (Python, 64-bit wrap)."""
    rax = rbx = 0
    for rcx in range(n, 0, -1):
        rax = (rax + rcx) & (2**64 - 1)
        rbx ^= rax
    return rax, rbx


INT3_AT = KTEXT + LOOP_HEAD + len(LOOP_BODY)


# -- counting ------------------------------------------------------------------------


def test_loop_count_is_exact():
    machine = machine_for(loop(1000))
    event = machine.run()
    assert event.kind is StopKind.BREAKPOINT
    assert (event.vector, event.pc, event.rip, event.software) == (3, INT3_AT, INT3_AT + 1, True)
    assert event.executed == machine.icount == 1 + 4 * 1000 + 1
    assert (machine.reg_read("rax"), machine.reg_read("rbx")) == reference(1000)


@pytest.mark.parametrize("first", [1, 2, 3, 1000, 2001, 4001])
def test_count_is_exact_across_a_stop(first):
    machine = machine_for(loop(1000))
    event = machine.run(count=first)
    assert (event.kind, event.executed, machine.icount) == (StopKind.BUDGET, first, first)
    # After k instructions (k >= 1) the loop has run (k - 1) // 4 full iterations.
    done = (first - 1) // 4
    assert machine.reg_read("rcx") == 1000 - done - (1 if (first - 1) % 4 >= 3 else 0)
    rest = machine.run()
    assert rest.kind is StopKind.BREAKPOINT
    assert rest.executed == 4002 - first
    assert machine.icount == 4002
    assert (machine.reg_read("rax"), machine.reg_read("rbx")) == reference(1000)


def test_long_run_spans_many_chunks_exactly():
    n = 500_000  # 2 million instructions: several chunks of the adaptive size
    machine = machine_for(loop(n))
    event = machine.run()
    assert event.executed == machine.icount == 4 * n + 2
    assert (machine.reg_read("rax"), machine.reg_read("rbx")) == reference(n)


def test_step_executes_exactly_n():
    machine = machine_for(loop(10))
    for expected_rip in (KTEXT + 5, KTEXT + 8, KTEXT + 11, KTEXT + 14, KTEXT + 5):
        event = machine.step()
        assert (event.kind, event.executed, event.rip) == (StopKind.BUDGET, 1, expected_rip)
    assert machine.step(7).executed == 7
    assert machine.icount == 12


def test_count_zero_and_negative():
    machine = machine_for(loop(10))
    event = machine.run(count=0)
    assert (event.kind, event.executed, event.rip) == (StopKind.BUDGET, 0, KTEXT)
    with pytest.raises(EmulatorError):
        machine.run(count=-1)
    with pytest.raises(EmulatorError):
        machine.run(timeout=-1)


def test_until_stops_before_the_address_every_time():
    machine = machine_for(loop(100))
    body = KTEXT + LOOP_HEAD
    event = machine.run(until=body + 6)  # the `dec rcx` of the first iteration
    assert (event.kind, event.rip, event.executed) == (StopKind.UNTIL, body + 6, 3)
    # Already there: stops at once, nothing executed.
    assert machine.run(until=body + 6).executed == 0
    machine.step()
    event = machine.run(until=body + 6)  # one more full iteration
    assert (event.kind, event.executed, machine.icount) == (StopKind.UNTIL, 3, 3 + 1 + 3)
    # A block already translated without the exit still stops at a new address.
    event = machine.run(until=body + 3)
    assert (event.rip, event.executed, machine.icount) == (body + 3, 3, 10)
    # And with no until the cached blocks run through.
    assert machine.run().kind is StopKind.BREAKPOINT
    assert machine.icount == 402


def test_runs_are_deterministic():
    def final():
        machine = machine_for(loop(5000))
        machine.run(count=7777)
        machine.run(count=3)
        event = machine.run()
        return event.executed, machine.icount, machine.registers()

    assert final() == final()


def test_python_counting_fallback_is_exact(monkeypatch):
    probe = engine.probe_engine_layout
    monkeypatch.setattr(
        "kctx_debug.emulator.machine.probe_engine_layout",
        lambda: EngineLayout(None, probe().old_exception_offset),
    )
    machine = machine_for(loop(50))
    assert not machine.report.native_counter
    assert any("Python hook" in w for w in machine.report.warnings)
    assert (machine.run(count=77).kind, machine.icount) == (StopKind.BUDGET, 77)
    event = machine.run(until=KTEXT + LOOP_HEAD + 6)
    assert (event.kind, event.executed) == (StopKind.UNTIL, 2)
    assert machine.run().executed == 202 - 79
    assert machine.icount == 202
    machine = machine_for(asm("90") + load_abs(UNMAPPED))
    assert (machine.run().vector, machine.icount) == (14, 1)


# -- stop reasons --------------------------------------------------------------------


def test_hlt_is_a_halt_and_retires():
    machine = machine_for(asm("90 90 f4 90"))
    event = machine.run()
    assert (event.kind, event.pc, event.rip, event.executed) == (
        StopKind.HALT,
        KTEXT + 2,
        KTEXT + 3,
        3,
    )
    assert machine.run(count=1).rip == KTEXT + 4  # resumes after hlt


def test_timeout_stops_an_endless_loop():
    machine = machine_for(asm("ebfe"))  # jmp $
    started = time.monotonic()
    event = machine.run(timeout=0.05)
    assert event.kind is StopKind.TIMEOUT
    assert time.monotonic() - started < 2
    assert event.executed == machine.icount > 0
    assert event.rip == KTEXT


def test_stop_from_another_thread():
    machine = machine_for(asm("ebfe"))
    timer = threading.Timer(0.05, machine.stop)
    timer.start()
    event = machine.run(timeout=10)
    timer.join()
    assert event.kind is StopKind.USER_STOP
    assert event.executed == machine.icount > 0


def test_syscall_stops_the_run():
    machine = machine_for(asm("90 0f05 90"))
    event = machine.run()
    assert (event.kind, event.pc, event.executed, event.software) == (
        StopKind.SYSCALL,
        KTEXT + 1,
        2,
        True,
    )
    assert event.rip == KTEXT + 3  # Unicorn's stub advanced RIP without jumping to LSTAR


def test_unbacked_physical_memory_is_an_error_naming_the_address():
    machine = machine_for(asm("90") + load_abs(KMISSING))
    event = machine.run()
    assert event.kind is StopKind.ERROR
    assert f"{MISSING_PA:#x}" in event.message
    assert (event.pc, event.executed) == (KTEXT + 1, 1)


# -- traps and faults --------------------------------------------------------------------


def test_int_n_is_a_software_trap():
    machine = machine_for(asm("90 cd80 90 cd0e"))
    event = machine.run()
    assert (event.kind, event.vector, event.pc, event.rip) == (
        StopKind.EXCEPTION,
        0x80,
        KTEXT + 1,
        KTEXT + 3,
    )
    assert event.software and event.executed == 2
    event = machine.run()  # int 0x0e is not a page fault
    assert (event.vector, event.pc, event.software, event.page_fault) == (14, KTEXT + 4, True, None)


def test_ud2_reports_invalid_opcode_without_retiring():
    machine = machine_for(asm("90 0f0b"))
    event = machine.run()
    assert (event.kind, event.vector, event.pc, event.rip) == (
        StopKind.EXCEPTION,
        6,
        KTEXT + 1,
        KTEXT + 1,
    )
    assert event.executed == 1 and not event.software


@pytest.mark.parametrize(
    ("code", "cr2", "error_code"),
    [
        # SDM vol. 3A Figure 4-12: P (bit 0), W/R (1), U/S (2), I/D (4).
        (load_abs(UNMAPPED), UNMAPPED, 0b00000),  # supervisor read, not present
        (store_abs(UNMAPPED), UNMAPPED, 0b00010),  # supervisor write, not present
        (store_abs(KRO), KRO, 0b00011),  # write to read-only with CR0.WP
        (asm("48ff0425") + struct.pack("<i", KRO - 2**64), KRO, 0b00011),  # inc [KRO]: RMW
        (asm("48b8") + struct.pack("<Q", KDATA) + asm("ffe0"), KDATA, 0b10001),  # fetch from NX
        (asm("48b8") + struct.pack("<Q", UNMAPPED) + asm("ffe0"), UNMAPPED, 0b10000),
    ],
)
def test_page_fault_error_codes(code, cr2, error_code):
    machine = machine_for(code)
    event = machine.run()
    assert (event.kind, event.vector) == (StopKind.EXCEPTION, 14)
    assert event.page_fault.address == cr2 == machine.reg_read("cr2")
    assert event.error_code == error_code
    fetch = error_code & 0b10000
    assert event.pc == event.rip == (cr2 if fetch else KTEXT)
    assert event.executed == (2 if fetch else 0)


def test_push_fault_is_a_write():
    machine = machine_for(asm("50"), regs={"rsp": UNMAPPED + 8})
    event = machine.run()
    assert (event.vector, event.error_code, event.page_fault.address) == (14, 0b10, UNMAPPED)


def test_successive_faults_keep_their_vectors():
    # Unicorn never resets QEMU's in-flight exception: without the reset the second
    # #PF would be a #DF (vector 8) and the third a triple fault.
    machine = machine_for(load_abs(UNMAPPED) + asm("31c9 f7f1"))
    for _ in range(3):
        machine.reg_write("rip", KTEXT)
        event = machine.run()
        assert (event.vector, event.page_fault.address) == (14, UNMAPPED)
    machine.reg_write("rip", KTEXT + 8)
    for _ in range(2):  # #DE after #PF: both contributory-or-#PF rules must not fire
        event = machine.run()
        assert (event.vector, event.pc) == (0, KTEXT + 10)
        machine.reg_write("rip", KTEXT + 8)


def test_fault_after_host_probe_of_unmapped_code_keeps_its_vector():
    # Dropping cached code for an unmapped address probes it through the MMU; the
    # machine must not let that probe turn the next real fault into #DF.
    machine = machine_for(load_abs(UNMAPPED))
    machine.write_virtual(KDATA, b"\x00")  # NX page: skipped
    machine.uc.ctl_remove_cache(UNMAPPED, UNMAPPED + 1)  # a raw probe that faults
    machine.uc.ctl_remove_cache(UNMAPPED, UNMAPPED + 1)
    event = machine.run(until=UNMAPPED)
    assert event.vector == 14


def test_kernel_checksum_matches_after_fault_and_resume():
    # A fault, then the page is mapped by writing the guest's own table, then resume.
    built = make_context(load_abs(UNMAPPED) + b"\xf4")
    machine = Machine.from_context(built.ctx)
    assert machine.run().vector == 14
    built.tables.map(UNMAPPED, KDATA_PA, 0x1000, 0x1000, 0)
    built.ctx.mem.write_u64(KDATA_PA, 0xABCD)
    machine.flush_tlb()
    event = machine.run()
    assert event.kind is StopKind.HALT
    assert machine.reg_read("rax") == 0xABCD
    assert machine.icount == 2


def test_non_canonical_jump_and_access_raise_gp():
    noncanonical = 0x8000_0000_0000_0000
    # movabs rax, nc; mov rbx, [rax] -- #GP(0) on the access, which did not retire.
    machine = machine_for(asm("48b8") + struct.pack("<Q", noncanonical) + asm("488b18"))
    event = machine.run()
    assert (event.vector, event.pc, event.executed) == (13, KTEXT + 10, 1)
    # movabs rax, nc; jmp rax -- QEMU reports it at the target (AMD), Intel at the jmp.
    machine = machine_for(asm("48b8") + struct.pack("<Q", noncanonical) + asm("ffe0"))
    event = machine.run()
    assert event.vector == 13
    assert (event.rip, event.executed) in ((noncanonical, 2), (KTEXT + 10, 1))
    assert machine.icount == event.executed


def test_breakpoint_planted_in_translated_code():
    machine = machine_for(loop(100))
    body = KTEXT + LOOP_HEAD
    # mov and 25 iterations: the loop's blocks are translated and RIP is back at `add`.
    assert machine.run(count=101).executed == 101
    original = machine.read_virtual(body, 1)
    machine.write_virtual(body, b"\xcc")
    event = machine.run()
    assert (event.kind, event.pc, event.rip) == (StopKind.BREAKPOINT, body, body + 1)
    assert machine.icount == 101 + 1  # the planted int3 retired (a trap)
    machine.write_virtual(body, original)
    machine.reg_write("rip", body)
    assert machine.run().kind is StopKind.BREAKPOINT  # the loop's own int3 at the end
    # The whole loop (mov, 100 iterations of 4, int3) plus the planted int3.
    assert machine.icount == 402 + 1
    assert (machine.reg_read("rax"), machine.reg_read("rbx")) == reference(100)


# -- Unicorn RAM offsets shared by two regions (see kctx_debug.emulator.engine) ----------

# Region sizes in the order that makes Unicorn 2.1 hand the last one the RAM offsets of
# the second one's third page (the trap fixtures' layout): 0x3000 at 0, 0x8000 at 0x3000,
# then 0x1000 pages at 0x3000, 0x4000 and 0x5000 when mapped in this order.
_TWIN_LAYOUT = ((0x1000, 0x3000), (0x20_0000, 0x8000), (0x30_0000, 0x1000),
                (0x30_1000, 0x1000), (0x100_0000, 0x1000))  # fmt: skip
_TWIN_CODE, _TWIN_STACK = 0x100_0010, 0x20_2018
# mov rbp, rsp; recurse: call recurse (e8 rel32 = -5)
_RECURSE = asm("4889e5 e8fbffffff")


def test_store_to_page_sharing_ram_offset_with_code_is_counted_once():
    """The bug: a store to a page whose RAM offsets another region's code page shares
    looked like self-modifying code, so QEMU restarted the instruction and counted it
    twice (the doublefault fixture's #PF came at icount 1022 instead of 1021)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    buffers = [ctypes.create_string_buffer(size) for _base, size in _TWIN_LAYOUT]
    engine.map_host_ranges(
        uc,
        [
            HostRange(base, size, ctypes.addressof(buf), buf)
            for (base, size), buf in zip(_TWIN_LAYOUT, buffers, strict=True)
        ],
    )
    uc.mem_write(_TWIN_CODE, _RECURSE)
    seen: list[tuple[int, int]] = []
    uc.hook_add(
        UC_HOOK_CODE,
        lambda uc, address, _size, _data: seen.append((address, uc.reg_read(UC_X86_REG_RSP))),
    )
    uc.reg_write(UC_X86_REG_RSP, _TWIN_STACK)
    uc.emu_start(_TWIN_CODE, 0, count=4)
    call = _TWIN_CODE + 3
    # mov, then each call once, with RSP 8 lower each time; the third pushes at 0x202008.
    assert seen == [(_TWIN_CODE, 0x20_2018), (call, 0x20_2018), (call, 0x20_2010),
                    (call, 0x20_2008)]  # fmt: skip
    assert uc.reg_read(UC_X86_REG_RSP) == 0x20_2000
    assert bytes(buffers[1][0x2000:0x2010]) == struct.pack("<QQ", call + 5, call + 5)


def test_recursing_call_down_to_the_last_mapped_qword_is_counted_once():
    """The doublefault fixture: 1019 calls from RSP 0x...3fd8 reach 0x...2000 in 1020
    instructions (with mov rbp, rsp), and the next call's push faults without retiring."""
    ctx = open_context(TRAP_FIXTURES / "doublefault.json")
    machine = Machine.from_context(ctx)
    assert machine.run(count=10).kind is StopKind.BREAKPOINT
    start = machine.icount
    machine.enter_ring0(0xFFFF_FFFF_8100_0000, 0xFFFF_C900_0000_3FD8)
    assert machine.run(count=1 + 1019).kind is StopKind.BUDGET
    assert machine.reg_read("rsp") == 0xFFFF_C900_0000_2000
    event = machine.run()
    assert (event.vector, event.executed, event.page_fault.address) == (
        14, 0, 0xFFFF_C900_0000_1FF8,
    )  # fmt: skip
    assert machine.icount == start + 1020
