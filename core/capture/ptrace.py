"""ptrace(2) through ctypes: stop every thread of a process, read registers, let it go.

``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` (Linux 3.4+, ptrace(2) "Attaching and
detaching") stop a tracee without sending it a signal, so the process sees
nothing but time passing: a sleep it was in is restarted by the kernel when it
resumes, and a process that was already stopped (SIGSTOP) stays stopped after
``PTRACE_DETACH``. A signal that arrives while we stop it is handed back on detach.

Every thread is stopped, not only the one whose registers are read, so the
memory cannot change while it is copied.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import signal
import struct
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from types import TracebackType

from .errors import CaptureError, NoSuchProcessError, ProcessExitedError, PtracePermissionError
from .procmaps import read_status

__all__ = [
    "PTRACE_EVENT_STOP",
    "WALL",
    "YAMA_PTRACE_SCOPE",
    "PtraceCalls",
    "PtraceRequest",
    "StopKind",
    "StoppedProcess",
    "ThreadStop",
    "UserRegs",
    "decode_wait_status",
    "describe_denial",
]


class PtraceRequest(enum.IntEnum):
    """The requests we issue (linux/ptrace.h, x86 asm/ptrace-abi.h)."""

    GETREGS = 12
    DETACH = 17
    SEIZE = 0x4206
    INTERRUPT = 0x4207


# waitpid status bits 23:16 of a PTRACE_INTERRUPT stop or a group stop (linux/ptrace.h).
PTRACE_EVENT_STOP = 128
# __WALL (linux/wait.h): also wait for clone children, i.e. threads other than the leader.
WALL = 0x40000000
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_MAX_ROUNDS = 64  # re-listing threads until no new one appears
_REAP_SECONDS = 2.0

YAMA_PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
# Documentation/admin-guide/LSM/Yama.rst, "ptrace_scope".
_YAMA_SCOPES = {
    0: "classic: any process of the same user may be traced",
    1: "restricted: only descendants, or a tracer the process named with PR_SET_PTRACER",
    2: "admin-only: tracing needs CAP_SYS_PTRACE",
    3: "no attach: ptrace is disabled until reboot",
}


@dataclass(frozen=True)
class UserRegs:
    """x86-64 ``struct user_regs_struct`` (arch/x86/include/asm/user_64.h), GETREGS's layout.

    >>> UserRegs.SIZE, [f.name for f in fields(UserRegs)][16:18]
    (216, ['rip', 'cs'])
    """

    r15: int = 0
    r14: int = 0
    r13: int = 0
    r12: int = 0
    rbp: int = 0
    rbx: int = 0
    r11: int = 0
    r10: int = 0
    r9: int = 0
    r8: int = 0
    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    orig_rax: int = 0  # the system call number when stopped in one, else -1 (as u64)
    rip: int = 0
    cs: int = 0
    eflags: int = 0
    rsp: int = 0
    ss: int = 0
    fs_base: int = 0
    gs_base: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0

    SIZE = 27 * 8  # not a field: no annotation

    @classmethod
    def from_bytes(cls, data: bytes) -> UserRegs:
        if len(data) != cls.SIZE:
            raise CaptureError(f"user_regs_struct is {cls.SIZE} bytes, got {len(data)}")
        return cls(*struct.unpack(f"<{len(fields(cls))}Q", data))

    def to_bytes(self) -> bytes:
        return struct.pack(f"<{len(fields(self))}Q", *astuple(self))

    @property
    def syscall(self) -> int | None:
        """The system call the thread was in (``orig_rax``), or None outside one."""
        value = self.orig_rax - (1 << 64) if self.orig_rax >> 63 else self.orig_rax
        return None if value < 0 else value


class StopKind(enum.Enum):
    """How a thread came to a halt (ptrace(2) "Stopped states")."""

    INTERRUPT = "interrupt"  # our PTRACE_INTERRUPT (an event stop with SIGTRAP)
    GROUP_STOP = "group-stop"  # the process is stopped by SIGSTOP & co.: it stays stopped
    SIGNAL = "signal-delivery"  # a signal was being delivered: it is handed back on detach


@dataclass(frozen=True)
class ThreadStop:
    tid: int
    kind: StopKind
    signal: int  # WSTOPSIG


def decode_wait_status(status: int) -> tuple[StopKind, int] | None:
    """What a ``waitpid`` status says about a seized tracee; None when it has exited.

    >>> decode_wait_status(PTRACE_EVENT_STOP << 16 | signal.SIGTRAP << 8 | 0x7F)
    (<StopKind.INTERRUPT: 'interrupt'>, <Signals.SIGTRAP: 5>)
    """
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        return None
    if not os.WIFSTOPPED(status):
        raise CaptureError(f"unexpected wait status {status:#x} from a tracee")
    sig, event = os.WSTOPSIG(status), status >> 16
    if event == PTRACE_EVENT_STOP:
        kind = StopKind.GROUP_STOP if sig in _STOP_SIGNALS else StopKind.INTERRUPT
    elif event == 0:
        kind = StopKind.SIGNAL
    else:
        raise CaptureError(f"unexpected ptrace event {event} (wait status {status:#x})")
    return kind, _signal(sig)


def _signal(number: int) -> int:
    try:
        return signal.Signals(number)
    except ValueError:
        return number  # a real-time signal


def describe_denial(pid: int, yama_path: Path = YAMA_PTRACE_SCOPE) -> str:
    """Why the kernel may have refused PTRACE_SEIZE with EPERM, as one clause."""
    tracer = read_status(pid).get("TracerPid", "0")
    if tracer not in ("", "0"):
        return f"it is already traced by PID {tracer} (a debugger or strace); detach that first"
    try:
        scope = int(yama_path.read_text().strip())
    except FileNotFoundError:
        return (
            f"{yama_path} does not exist, so Yama is not active: the process belongs to "
            "another user, is not dumpable, or this session lacks CAP_SYS_PTRACE"
        )
    except (OSError, ValueError) as e:
        return f"{yama_path} is unreadable ({e})"
    meaning = _YAMA_SCOPES.get(scope, "unknown setting")
    fix = (
        "it cannot be lowered until reboot"
        if scope == 3
        else "run as root, or lower it: sysctl kernel.yama.ptrace_scope=0"
    )
    return f"{yama_path} is {scope} ({meaning}); {fix}"


class PtraceCalls:
    """The kernel interfaces a stop needs (ptrace, waitpid, the thread list); a test seam."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._ptrace = libc.ptrace
        self._ptrace.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self._ptrace.restype = ctypes.c_long

    def ptrace(self, request: PtraceRequest, tid: int, addr: int = 0, data: int = 0) -> int:
        """``ptrace(request, tid, addr, data)``; raises OSError with the errno on failure."""
        ctypes.set_errno(0)
        result = self._ptrace(int(request), tid, addr or None, data or None)
        err = ctypes.get_errno()
        if result == -1 and err:
            raise OSError(err, os.strerror(err))
        return result

    def waitpid(self, tid: int, options: int) -> tuple[int, int]:
        return os.waitpid(tid, options)

    def list_tasks(self, pid: int) -> list[int]:
        """The thread IDs of ``pid`` (``/proc/PID/task``); empty once it is gone."""
        try:
            return sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
        except FileNotFoundError:
            return []


class StoppedProcess:
    """A context manager holding every thread of ``pid`` in a ptrace stop.

    :raises NoSuchProcessError: on entry, the process does not exist.
    :raises PtracePermissionError: on entry, the kernel refuses (``describe_denial`` says why).
    :raises ProcessExitedError: the process died before it could be stopped or released.
    """

    def __init__(
        self, pid: int, calls: PtraceCalls | None = None, yama_path: Path = YAMA_PTRACE_SCOPE
    ) -> None:
        self.pid = pid
        self.calls = calls if calls is not None else PtraceCalls()
        self.yama_path = yama_path
        self.stops: dict[int, ThreadStop] = {}
        self._seized: list[int] = []

    def __enter__(self) -> StoppedProcess:
        try:
            self.stop()
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gone = self.detach()
        if exc is None and self.pid in gone:
            raise ProcessExitedError(self.pid, "releasing it")

    @property
    def leader(self) -> ThreadStop:
        return self.stops[self.pid]

    def stop(self) -> None:
        """Seize, interrupt and wait for every thread, re-listing until no new one appears."""
        pending = [self.pid]
        for _ in range(_MAX_ROUNDS):
            fresh = [tid for tid in pending if self._seize(tid)]
            for tid in fresh:
                self._interrupt(tid)
            for tid in fresh:
                self._wait(tid)
            pending = [t for t in self.calls.list_tasks(self.pid) if t not in self._seized]
            if not pending:
                return
        raise CaptureError(f"PID {self.pid} keeps creating threads; cannot stop them all")

    def _seize(self, tid: int) -> bool:
        try:
            self.calls.ptrace(PtraceRequest.SEIZE, tid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                if tid == self.pid:
                    raise NoSuchProcessError(self.pid) from None
                return False  # a thread that ended meanwhile
            if e.errno in (errno.EPERM, errno.EACCES):
                raise PtracePermissionError(
                    self.pid, describe_denial(self.pid, self.yama_path)
                ) from None
            raise CaptureError(f"cannot attach to PID {self.pid}: {e.strerror}") from None
        self._seized.append(tid)
        return True

    def _interrupt(self, tid: int) -> None:
        try:
            self.calls.ptrace(PtraceRequest.INTERRUPT, tid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise CaptureError(f"cannot stop thread {tid}: {e.strerror}") from None
            # Died already: the wait below reports its exit.

    def _interrupt_quietly(self, tid: int) -> None:
        try:
            self.calls.ptrace(PtraceRequest.INTERRUPT, tid)
        except OSError:
            pass  # the wait that follows tells whether it stopped or died

    def _wait(self, tid: int, raising: bool = True) -> None:
        try:
            _, status = self.calls.waitpid(tid, WALL)
            decoded = decode_wait_status(status)
        except ChildProcessError:
            decoded = None  # not (or no longer) ours to wait for: it has gone
        except CaptureError:
            if raising:
                raise
            decoded = None
        if decoded is None:
            self._seized.remove(tid)
            if tid == self.pid and raising:
                raise ProcessExitedError(self.pid, "stopping it")
            return
        self.stops[tid] = ThreadStop(tid, *decoded)

    def _reap(self, tid: int) -> None:
        """Wait (briefly: SIGKILL ends a task within milliseconds) for a dead tracee's exit."""
        deadline = time.monotonic() + _REAP_SECONDS
        while True:
            try:
                done, _ = self.calls.waitpid(tid, os.WNOHANG | WALL)
            except ChildProcessError:
                return
            if done or time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def registers(self, tid: int | None = None) -> UserRegs:
        """The user registers of a stopped thread (the leader by default)."""
        tid = self.pid if tid is None else tid
        buf = ctypes.create_string_buffer(UserRegs.SIZE)
        try:
            self.calls.ptrace(PtraceRequest.GETREGS, tid, 0, ctypes.addressof(buf))
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExitedError(self.pid, "reading registers") from None
            raise CaptureError(f"cannot read the registers of {tid}: {e.strerror}") from None
        return UserRegs.from_bytes(buf.raw)

    def detach(self) -> list[int]:
        """Release every seized thread; returns the ones that had died (they are reaped)."""
        gone = []
        for tid in list(self._seized):
            if tid not in self.stops:
                # Seized but not yet stopped (an error cut stop() short): DETACH needs a
                # ptrace stop, and a tracee left seized stays traced until we exit.
                self._interrupt_quietly(tid)
                self._wait(tid, raising=False)
                if tid not in self.stops:
                    gone.append(tid)
                    continue
            stop = self.stops.get(tid)
            data = stop.signal if stop is not None and stop.kind is StopKind.SIGNAL else 0
            try:
                self.calls.ptrace(PtraceRequest.DETACH, tid, 0, data)
            except OSError:
                # ESRCH: no longer in a ptrace stop, i.e. killed. Collect its exit so
                # that its real parent can see it.
                gone.append(tid)
                self._reap(tid)
        self._seized.clear()
        self.stops.clear()
        return gone
