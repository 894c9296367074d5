"""Errors a live capture reports: one line each, naming the PID and what to do."""

from __future__ import annotations

from ..errors import KctxError

__all__ = [
    "CaptureError",
    "NoSuchProcessError",
    "ProcessExitedError",
    "PtracePermissionError",
]


class CaptureError(KctxError):
    """A live process could not be captured."""


class NoSuchProcessError(CaptureError):
    """The PID names no live process (or only a zombie)."""

    def __init__(self, pid: int, detail: str = "") -> None:
        self.pid = pid
        super().__init__(f"no such process: PID {pid}" + (f" ({detail})" if detail else ""))


class PtracePermissionError(CaptureError):
    """The kernel refused to let us trace the process; ``detail`` says which rule applies."""

    def __init__(self, pid: int, detail: str) -> None:
        self.pid = pid
        self.detail = detail
        super().__init__(f"cannot attach to PID {pid}: permission denied ({detail})")


class ProcessExitedError(CaptureError):
    """The process went away while it was being captured; nothing was written."""

    def __init__(self, pid: int, during: str) -> None:
        self.pid = pid
        self.during = during
        super().__init__(f"PID {pid} exited during capture (while {during}); nothing was written")
