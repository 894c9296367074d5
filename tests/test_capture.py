"""Live capture, the parts that need no traced process: layouts, parsing, errors, synthesis.

Truth: the kernel's ``struct user_regs_struct`` (arch/x86/include/asm/user_64.h),
proc(5)'s maps format, ptrace(2)'s wait-status encoding, Linux's selectors and
MSR values, and SDM descriptor/access-rights layouts computed by hand.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import subprocess

import numpy as np
import pytest

from kctx_debug.arch.descriptors import SystemDescriptorType
from kctx_debug.capture import (
    CaptureError,
    NoSuchProcessError,
    ProcessExitedError,
    PtracePermissionError,
    capture_main,
    capture_process,
)
from kctx_debug.capture import reader as reader_module
from kctx_debug.capture.pagestore import FrameRun, PageStore
from kctx_debug.capture.procmaps import Vma, VmaPerm, parse_maps
from kctx_debug.capture.ptrace import (
    PTRACE_EVENT_STOP,
    PtraceCalls,
    PtraceRequest,
    StopKind,
    StoppedProcess,
    UserRegs,
    decode_wait_status,
    describe_denial,
)
from kctx_debug.capture.reader import SYNTHETIC_BASE_FRAME, CapturedVma, MemoryReader, PfnMode
from kctx_debug.capture.synth import (
    CEA_VA,
    TEXT_VA,
    access_rights,
    synthesize,
    tables_needed,
)
from kctx_debug.errors import KctxError
from kctx_debug.pagetables.build import build_page_tables
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.physmem import PAGE_SIZE
from kctx_debug.snapshot import MemoryRange, RangeKind, Snapshot
from kctx_debug.tables import decode_gdt, decode_idt, decode_tss

# -- struct user_regs_struct ------------------------------------------------------------


def test_user_regs_layout_matches_the_kernel_struct():
    # user_64.h order: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax
    # rip cs eflags rsp ss fs_base gs_base ds es fs gs: 27 u64.
    words = [0x1000 + i for i in range(27)]
    regs = UserRegs.from_bytes(struct.pack("<27Q", *words))
    assert UserRegs.SIZE == 216
    assert (regs.r15, regs.rbp, regs.rax, regs.rdi) == (0x1000, 0x1004, 0x100A, 0x100E)
    assert (regs.orig_rax, regs.rip, regs.cs, regs.eflags) == (0x100F, 0x1010, 0x1011, 0x1012)
    assert (regs.rsp, regs.ss, regs.fs_base, regs.gs_base) == (0x1013, 0x1014, 0x1015, 0x1016)
    assert (regs.ds, regs.es, regs.fs, regs.gs) == (0x1017, 0x1018, 0x1019, 0x101A)
    assert regs.to_bytes() == struct.pack("<27Q", *words)


def test_user_regs_syscall_and_bad_size():
    assert UserRegs(orig_rax=(1 << 64) - 1).syscall is None  # -1: not in a system call
    assert UserRegs(orig_rax=230).syscall == 230
    with pytest.raises(CaptureError, match="216 bytes, got 8"):
        UserRegs.from_bytes(bytes(8))


# -- wait statuses (ptrace(2): "status>>16 == PTRACE_EVENT_STOP") ---------------------


def _stopped(sig: int, event: int = 0) -> int:
    return event << 16 | sig << 8 | 0x7F


def test_decode_wait_status():
    assert decode_wait_status(_stopped(signal.SIGTRAP, PTRACE_EVENT_STOP)) == (
        StopKind.INTERRUPT, signal.SIGTRAP,
    )  # fmt: skip
    assert decode_wait_status(_stopped(signal.SIGSTOP, PTRACE_EVENT_STOP)) == (
        StopKind.GROUP_STOP, signal.SIGSTOP,
    )  # fmt: skip
    assert decode_wait_status(_stopped(signal.SIGUSR1)) == (StopKind.SIGNAL, signal.SIGUSR1)
    assert decode_wait_status(0x0100) is None  # exited with status 1
    assert decode_wait_status(signal.SIGKILL) is None  # killed
    with pytest.raises(CaptureError, match="unexpected ptrace event 4"):
        decode_wait_status(_stopped(signal.SIGTRAP, 4))  # PTRACE_EVENT_EXEC: never requested


# -- /proc/PID/maps ---------------------------------------------------------------------

MAPS = """\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 26723     /usr/bin/my prog
7f1000000000-7f1000021000 rw-p 00000000 00:00 0          [heap]
7f2000000000-7f2000001000 rw-s 00002000 00:05 99         /dev/shm/x (deleted)
7f3000000000-7f3000004000 ---p 00000000 00:00 0
7f4000000000-7f4000004000 r--p 00000000 00:00 0          [vvar]
7fff00000000-7fff00001000 r-xp 00000000 00:00 0          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


def test_parse_maps_fields_and_skip_reasons():
    vmas = parse_maps(MAPS)
    assert [v.path for v in vmas] == [
        "/usr/bin/my prog", "[heap]", "/dev/shm/x (deleted)", "", "[vvar]", "[vdso]",
        "[vsyscall]",
    ]  # fmt: skip
    prog, heap, shm, guard, vvar, vdso, vsyscall = vmas
    assert (prog.start, prog.end, prog.pages, prog.offset) == (0x55D0C0A00000, 0x55D0C0A02000, 2, 0)
    assert (prog.device, prog.inode) == ("fe:00", 26723)
    assert heap.perms == VmaPerm.READ | VmaPerm.WRITE and heap.perms_text == "rw-p"
    assert shm.perms == VmaPerm.READ | VmaPerm.WRITE | VmaPerm.SHARED and shm.offset == 0x2000
    assert vdso.pte_executable and not vdso.pte_writable
    assert [v.skip_reason is None for v in vmas] == [True, True, True, False, False, True, False]
    assert "PROT_NONE" in guard.skip_reason
    assert "VM_PFNMAP" in vvar.skip_reason
    assert "kernel half" in vsyscall.skip_reason


@pytest.mark.parametrize(
    "line",
    ["garbage", "1000-2000 rw-p 0 00:00", "1000-2000 rwzp 0 00:00 0", "2000-1000 rw-p 0 0:0 0",
     "1001-2000 rw-p 0 00:00 0", "x-2000 rw-p 0 00:00 0"],
)  # fmt: skip
def test_malformed_maps_lines_are_one_line_errors(line):
    with pytest.raises(CaptureError) as info:
        Vma.from_line(line)
    assert "\n" not in str(info.value) and line[:20] in str(info.value)


# -- stopping and releasing (a fake kernel behind the PtraceCalls seam) ---------------


class FakeCalls(PtraceCalls):
    """Records requests; raises ``errors[request]``; answers waitpid from ``statuses``."""

    def __init__(self, tasks=(), statuses=None, errors=None):
        self.tasks = list(tasks)
        self.statuses = statuses or {}
        self.errors = errors or {}
        self.log: list[tuple[PtraceRequest, int, int]] = []

    def ptrace(self, request, tid, addr=0, data=0):
        self.log.append((request, tid, data))
        err = self.errors.get(request)
        if err is not None:
            raise OSError(err, os.strerror(err))
        return 0

    def waitpid(self, tid, options):
        return tid, self.statuses.get(tid, _stopped(signal.SIGTRAP, PTRACE_EVENT_STOP))

    def list_tasks(self, pid):
        return self.tasks


def test_stop_seizes_interrupts_and_waits_for_every_thread():
    calls = FakeCalls(tasks=[500, 501, 502], statuses={501: _stopped(signal.SIGUSR1)})
    with StoppedProcess(500, calls) as stopped:
        kinds = {t: s.kind for t, s in stopped.stops.items()}
    assert kinds == {500: StopKind.INTERRUPT, 501: StopKind.SIGNAL, 502: StopKind.INTERRUPT}
    requests = [(r.name, t, d) for r, t, d in calls.log]
    assert requests == [
        ("SEIZE", 500, 0), ("INTERRUPT", 500, 0),
        ("SEIZE", 501, 0), ("SEIZE", 502, 0), ("INTERRUPT", 501, 0), ("INTERRUPT", 502, 0),
        # The signal that was being delivered to 501 is handed back.
        ("DETACH", 500, 0), ("DETACH", 501, signal.SIGUSR1), ("DETACH", 502, 0),
    ]  # fmt: skip


def test_group_stop_is_left_in_place():
    calls = FakeCalls(tasks=[7], statuses={7: _stopped(signal.SIGSTOP, PTRACE_EVENT_STOP)})
    with StoppedProcess(7, calls) as stopped:
        assert stopped.leader.kind is StopKind.GROUP_STOP
    assert calls.log[-1] == (PtraceRequest.DETACH, 7, 0)  # no SIGCONT, no re-sent SIGSTOP


def test_seize_esrch_is_no_such_process():
    calls = FakeCalls(errors={PtraceRequest.SEIZE: errno.ESRCH})
    with pytest.raises(NoSuchProcessError, match=r"^no such process: PID 4242$"):
        StoppedProcess(4242, calls).__enter__()


def test_leader_exiting_while_being_stopped():
    calls = FakeCalls(tasks=[9], statuses={9: 0x0900})  # exited with status 9
    with pytest.raises(ProcessExitedError, match=r"^PID 9 exited during capture"):
        StoppedProcess(9, calls).__enter__()


def test_leader_killed_before_release():
    calls = FakeCalls(tasks=[11], errors={PtraceRequest.DETACH: errno.ESRCH})
    with pytest.raises(ProcessExitedError) as info:
        with StoppedProcess(11, calls):
            pass
    assert str(info.value) == (
        "PID 11 exited during capture (while releasing it); nothing was written"
    )


def test_registers_come_from_getregs():
    words = list(range(100, 127))

    class Regs(FakeCalls):
        def ptrace(self, request, tid, addr=0, data=0):
            if request is PtraceRequest.GETREGS:
                import ctypes

                ctypes.memmove(data, struct.pack("<27Q", *words), 216)
            return super().ptrace(request, tid, addr, data)

    with StoppedProcess(3, Regs(tasks=[3])) as stopped:
        regs = stopped.registers()
    assert (regs.rip, regs.rsp, regs.fs_base) == (116, 119, 121)


# -- permission errors (EPERM injected through the seam) ------------------------------


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    ("scope", "text"),
    [
        (1, "is 1 (restricted: only descendants, or a tracer the process named with "
            "PR_SET_PTRACER); run as root, or lower it: sysctl kernel.yama.ptrace_scope=0"),
        (2, "is 2 (admin-only: tracing needs CAP_SYS_PTRACE); run as root, or lower it"),
        (3, "is 3 (no attach: ptrace is disabled until reboot); it cannot be lowered until reboot"),
    ],
)  # fmt: skip
def test_eperm_names_the_yama_setting_and_its_value(tmp_path, sleeper, scope, text):
    yama = tmp_path / "ptrace_scope"
    yama.write_text(f"{scope}\n")
    calls = FakeCalls(tasks=[sleeper.pid], errors={PtraceRequest.SEIZE: errno.EPERM})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PtracePermissionError) as info:
        capture_process(sleeper.pid, out / "snap.json", calls=calls, yama_path=yama)
    message = str(info.value)
    assert message.startswith(
        f"cannot attach to PID {sleeper.pid}: permission denied ({yama} {text}"
    )
    assert "\n" not in message and message.endswith(")")
    assert list(out.iterdir()) == []


def test_eperm_without_yama(tmp_path, sleeper):
    assert describe_denial(sleeper.pid, tmp_path / "missing") == (
        f"{tmp_path / 'missing'} does not exist, so Yama is not active: the process belongs "
        "to another user, is not dumpable, or this session lacks CAP_SYS_PTRACE"
    )


# -- target checks ------------------------------------------------------------------------


def test_nonexistent_pid(tmp_path, capsys):
    pid_max = int(open("/proc/sys/kernel/pid_max").read())  # PIDs are below it
    with pytest.raises(NoSuchProcessError, match=rf"^no such process: PID {pid_max}$"):
        capture_process(pid_max, tmp_path / "snap.json")
    assert capture_main([str(pid_max), "-o", str(tmp_path / "snap.json")]) == 1
    assert capsys.readouterr().err == f"kctx-debug: no such process: PID {pid_max}\n"
    assert list(tmp_path.iterdir()) == []


def test_self_zero_and_missing_folder(tmp_path, sleeper):
    with pytest.raises(CaptureError, match="the capturing process itself"):
        capture_process(os.getpid(), tmp_path / "s.json")
    with pytest.raises(NoSuchProcessError, match="PIDs are positive"):
        capture_process(0, tmp_path / "s.json")
    with pytest.raises(CaptureError, match=r"folder .*/nowhere does not exist"):
        capture_process(sleeper.pid, tmp_path / "nowhere" / "s.json")


def test_kernel_thread(tmp_path):
    kthread = next((int(p) for p in os.listdir("/proc") if p.isdigit() and _is_kthread(p)), None)
    if kthread is None:
        pytest.skip("no kernel thread visible in this PID namespace")
    with pytest.raises(CaptureError, match=rf"PID {kthread} \(.*\) is a kernel thread"):
        capture_process(kthread, tmp_path / "s.json")


def _is_kthread(pid: str) -> bool:
    try:
        text = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    return "Kthread:\t1" in text or "VmSize" not in text


# -- the page store ------------------------------------------------------------------------


def test_page_store_dedups_and_writes_in_frame_order(tmp_path):
    store = PageStore(tmp_path)
    page = {f: bytes([f]) * PAGE_SIZE for f in (3, 10, 11, 12)}
    assert store.add([11, 3, 11], page[11] + page[3] + page[11]) == 2
    assert store.add([10, 12], page[10] + page[12]) == 2
    mark = store.mark()
    assert store.add([40], bytes(PAGE_SIZE)) == 1
    store.rollback(mark)
    assert store.frames().tolist() == [3, 10, 11, 12] and 40 not in store
    with open(tmp_path / "side", "wb") as f:
        runs = store.write_sorted(f.fileno())
    store.close()
    assert runs == [FrameRun(3, 1, 0), FrameRun(10, 3, PAGE_SIZE)]
    assert (tmp_path / "side").read_bytes() == page[3] + page[10] + page[11] + page[12]
    assert [p.name for p in tmp_path.iterdir()] == ["side"]  # the spool was unlinked


# -- the reader (our own memory, pagemap answers injected) ------------------------------

PRESENT = 1 << 63


@pytest.fixture
def own_pages():
    """Two pages of this process holding 0x11... and 0x22..., and a VMA describing them."""
    buf = mmap.mmap(-1, 2 * PAGE_SIZE)
    buf[:] = b"\x11" * PAGE_SIZE + b"\x22" * PAGE_SIZE
    view = ctypes.c_char.from_buffer(buf)
    va = ctypes.addressof(view)
    yield Vma(va, va + 2 * PAGE_SIZE, VmaPerm.READ | VmaPerm.WRITE, 0, "00:00", 0, "")
    del view
    buf.close()


def _answers(monkeypatch, *answers):
    it = iter(answers)
    monkeypatch.setattr(
        reader_module, "read_pagemap", lambda pid, lo, hi: np.array(next(it), np.uint64)
    )


def test_reader_rereads_a_chunk_whose_pages_moved(tmp_path, own_pages, monkeypatch):
    before, after = [PRESENT | 0x100, PRESENT | 0x101], [PRESENT | 0x200, PRESENT | 0x201]
    _answers(monkeypatch, before, after, after, after)  # moved during the first copy
    store = PageStore(tmp_path)
    reader = MemoryReader(os.getpid(), store, PfnMode.REAL)
    got = reader.read_vma(own_pages)
    reader.close()
    assert got.frames.tolist() == [0x200, 0x201] == store.frames().tolist()  # 0x100 rolled back
    assert store.read(0x200) == b"\x11" * PAGE_SIZE and store.read(0x201) == b"\x22" * PAGE_SIZE
    assert got.entries.tolist() == after and got.unreadable == 0
    store.close()


def test_reader_gives_up_on_pages_that_keep_moving(tmp_path, own_pages, monkeypatch):
    a, b = [PRESENT | 0x100, PRESENT | 0x101], [PRESENT | 0x200, PRESENT | 0x201]
    _answers(monkeypatch, *([a, b] * 4))
    store = PageStore(tmp_path)
    reader = MemoryReader(os.getpid(), store, PfnMode.REAL)
    with pytest.raises(CaptureError, match=r"pages at 0x[0-9a-f]+-0x[0-9a-f]+ kept moving"):
        reader.read_vma(own_pages)
    reader.close()
    assert len(store) == 0
    store.close()


def test_reader_synthetic_frames_hide_pfns(tmp_path, own_pages, monkeypatch):
    swapped = 1 << 62 | 0x1234  # swap entry: kept as it is, no contents
    entries = [PRESENT | 1 << 61 | 0x100, swapped]
    _answers(monkeypatch, entries, entries)
    store = PageStore(tmp_path)
    reader = MemoryReader(os.getpid(), store, PfnMode.SYNTHETIC)
    got = reader.read_vma(own_pages)
    reader.close()
    assert got.vas.tolist() == [own_pages.start]
    assert got.frames.tolist() == [SYNTHETIC_BASE_FRAME]
    assert got.entry_vas.tolist() == [own_pages.start, own_pages.start + PAGE_SIZE]
    assert got.entries.tolist() == [PRESENT | 1 << 61, swapped]  # PFN field cleared
    assert store.read(SYNTHETIC_BASE_FRAME) == b"\x11" * PAGE_SIZE
    store.close()


# -- the synthesized kernel context ------------------------------------------------------------


def _captured(line: str, vas: list[int], frames: list[int]) -> CapturedVma:
    arr = np.array(vas, dtype=np.uint64)
    return CapturedVma(Vma.from_line(line), arr, np.array(frames, dtype=np.uint64), arr,
                       np.zeros(len(vas), dtype=np.uint64))  # fmt: skip


TEXT = "400000-403000 r-xp 00000000 08:01 1 /bin/x"
DATA = "600000-602000 rw-p 00000000 08:01 1 /bin/x"
REGS = UserRegs(rip=0x401000, rsp=0x7FFC0000, cs=0x33, ss=0x2B, eflags=0x246,
                fs_base=0x7F0000001000, rax=7)  # fmt: skip


@pytest.fixture
def synth_ctx():
    captured = [
        _captured(TEXT, [0x400000, 0x401000, 0x402000], [0x100, 0x101, 0x300]),
        _captured(DATA, [0x600000, 0x601000], [0x101, 0x200]),  # frame 0x101 shared
    ]
    spec = synthesize(REGS, captured, frames_end=0x301)
    memory = [MemoryRange(f * PAGE_SIZE, PAGE_SIZE, RangeKind.INLINE, bytes([f & 0xFF]) * 4096)
              for f in (0x100, 0x101, 0x200, 0x300)]  # fmt: skip
    snap = Snapshot(spec.cpu, (*memory, *spec.memory), {}, spec.build, (), (spec.symbols,))
    ctx = KernelContext.from_snapshot(snap)
    yield spec, ctx
    ctx.close()


def test_kernel_area_is_aligned_above_captured_frames(synth_ctx):
    spec, _ = synth_ctx
    assert spec.area_base == 0x400000  # frame 0x301 -> 0x301000, rounded up to 2 MiB
    pt = spec.build.page_tables
    assert pt.table_base == spec.area_base + 0x4000 + 0x4000 + 4 * PAGE_SIZE
    assert spec.area_size == pt.table_base + pt.table_size - spec.area_base


def test_table_estimate_is_exact(synth_ctx):
    spec, _ = synth_ctx
    pt = spec.build.page_tables
    snap = Snapshot(spec.cpu, spec.memory, {}, spec.build)
    mem = snap.open_memory()
    try:
        built = build_page_tables(mem, pt)
    finally:
        mem.close()
    assert len(built.frames_used) * PAGE_SIZE == pt.table_size
    # Root + 1 PDPT, 1 PD and 1 PT for pages in one 2 MiB region; twice for two regions
    # in different 512 GiB slots.
    assert tables_needed(np.array([0x1000, 0x2000], np.uint64), 4) == 4
    assert tables_needed(np.array([0x1000, 1 << 39], np.uint64), 4) == 7


def test_user_pages_map_to_their_frames_with_vma_rights(synth_ctx):
    _, ctx = synth_ctx
    text, data = ctx.translate(0x402000), ctx.translate(0x601000)
    assert (text.phys, text.user, text.writable, text.executable) == (0x300000, True, False, True)
    assert (data.phys, data.user, data.writable, data.executable) == (0x200000, True, True, False)
    assert ctx.read_virtual(0x401000, 2) == b"\x01\x01"
    assert ctx.read_virtual(0x600000, 1) == b"\x01"  # the same frame, mapped twice
    assert ctx.translate(0x403000).phys is None


def test_idt_gdt_tss_decode_to_linux_layout(synth_ctx):
    _, ctx = synth_ctx
    virt = ctx.virt_to_phys
    idt = decode_idt(ctx.mem, ctx.cpu, virt)
    assert len(idt) == 256
    pf, bp, df, nmi, sys80 = idt[14].gate, idt[3].gate, idt[8].gate, idt[2].gate, idt[0x80].gate
    assert (pf.offset, pf.selector, pf.dpl, pf.ist, pf.p) == (TEXT_VA + 14 * 8, 0x10, 0, 0, True)
    assert pf.type == SystemDescriptorType.INTERRUPT_GATE
    assert (bp.dpl, sys80.dpl, df.ist, nmi.ist, idt[1].gate.ist, idt[18].gate.ist) == (
        3, 3, 1, 2, 3, 4,
    )  # fmt: skip
    gdt = {e.index: e.descriptor for e in decode_gdt(ctx.mem, ctx.cpu, virt)}
    assert [gdt[i].kind for i in range(7)] == [
        "null", "code32", "code64", "data", "code32", "data", "code64",
    ]  # fmt: skip
    assert [gdt[i].dpl for i in range(1, 7)] == [0, 0, 0, 3, 3, 3]
    assert gdt[8].base == CEA_VA + 0x2000 and gdt[8].limit == 0x67
    tss = decode_tss(ctx.mem, ctx.cpu, virt)
    syms = dict(ctx.snapshot.symbols[0].entries)
    assert tss.rsp0 == syms["kctx_stack_rsp0"] + 0x4000
    assert tss.ist[:5] == (
        syms["kctx_stack_ist1_df"] + 0x1000, syms["kctx_stack_ist2_nmi"] + 0x1000,
        syms["kctx_stack_ist3_db"] + 0x1000, syms["kctx_stack_ist4_mc"] + 0x1000, 0,
    )  # fmt: skip
    # A guard page below every stack: unmapped.
    assert ctx.translate(syms["kctx_stack_ist1_df"] - PAGE_SIZE).phys is None


def test_stubs_are_hlt_jmp_back(synth_ctx):
    _, ctx = synth_ctx
    stub = bytes.fromhex("f4ebfdcccccccccc")  # hlt; jmp $-1 (rel8 -3); int3 padding
    for vector in (0, 14, 255):
        assert ctx.read_virtual(TEXT_VA + vector * 8, 8) == stub
    assert ctx.read_virtual(ctx.cpu.msrs["lstar"], 8) == stub
    stubs = ctx.translate(TEXT_VA)
    assert (stubs.user, stubs.writable, stubs.executable) == (False, False, True)
    idt = ctx.translate(CEA_VA)
    assert (idt.user, idt.writable, idt.executable) == (False, False, False)
    syms = dict(ctx.snapshot.symbols[0].entries)
    assert syms["kctx_stub_pf"] == TEXT_VA + 14 * 8
    assert syms["kctx_stub_vector_0x80"] == TEXT_VA + 0x80 * 8


def test_cpu_state(synth_ctx):
    spec, ctx = synth_ctx
    cpu = spec.cpu
    assert (cpu.regs["rip"], cpu.regs["rsp"], cpu.regs["rax"], cpu.regs["rflags"]) == (
        0x401000, 0x7FFC0000, 7, 0x246,
    )  # fmt: skip
    assert cpu.cpl == 3 and cpu.cr3 == spec.build.page_tables.table_base
    assert (cpu.cr0, cpu.cr4, cpu.efer) == (0x80050033, 0x1106A0, 0xD01)
    cs, ss, fs = cpu.segments["cs"], cpu.segments["ss"], cpu.segments["fs"]
    # code64 DPL3: type 0xB, S, DPL 3, P -> 0xFB; L (13), G (15) -> 0xA0. data: D/B (14), G.
    assert (cs.selector, cs.attributes, ss.selector, ss.attributes) == (0x33, 0xA0FB, 0x2B, 0xC0F3)
    assert fs.base == 0x7F0000001000 and cpu.msrs["fs_base"] == 0x7F0000001000
    assert (cpu.tr.selector, cpu.tr.attributes, cpu.tr.limit) == (0x40, 0x8B, 0x67)  # busy TSS
    assert (cpu.gdtr.limit, cpu.idtr.base, cpu.idtr.limit) == (0x7F, CEA_VA, 0xFFF)
    assert cpu.msrs["star"] == 0x0023_0010_0000_0000
    assert cpu.msrs["sfmask"] == 0x257FD5  # CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID
    assert cpu.msrs["pat"] == 0x0407050600070106  # WB WC UC- UC WB WP UC- WT
    assert ctx.virt_to_phys(0xFFFF888000000000 + spec.area_base) == spec.area_base


def test_access_rights_from_descriptor_bytes():
    # 64-bit TSS busy, P: type 0xB, P -> 0x8B.  32-bit flat data DPL0: 0xC093.
    assert access_rights((0x00CF93000000FFFF).to_bytes(8, "little")) == 0xC093
    assert access_rights((0x0000_8B00_0000_0067).to_bytes(8, "little")) == 0x8B


def test_five_level_context():
    high = "7f000000000000-7f000000001000 rw-p 00000000 00:00 0"  # above 47 bits
    spec = synthesize(REGS, [_captured(high, [0x7F000000000000], [5])], frames_end=6, levels=5)
    snap = Snapshot(spec.cpu, (MemoryRange(0x5000, PAGE_SIZE, RangeKind.ZERO), *spec.memory),
                    {}, spec.build)  # fmt: skip
    ctx = KernelContext.from_snapshot(snap)
    try:
        assert ctx.paging.la57 and ctx.translate(0x7F000000000000).phys == 0x5000
        assert ctx.virt_to_phys(0xFF11000000000000 + spec.area_base) == spec.area_base
    finally:
        ctx.close()


def test_errors_are_kctx_errors():
    for cls in (CaptureError, NoSuchProcessError, ProcessExitedError, PtracePermissionError):
        assert issubclass(cls, KctxError)
