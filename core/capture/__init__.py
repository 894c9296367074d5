"""Live process capture: a running process as a kernel-context snapshot.

>>> from kctx_debug.capture import capture_process  # doctest: +SKIP
>>> capture_process(1234, "snap.json").pages  # doctest: +SKIP
"""

from .capture import (
    CaptureResult,
    add_capture_arguments,
    capture_main,
    capture_process,
    describe_capture,
    run_capture,
)
from .errors import CaptureError, NoSuchProcessError, ProcessExitedError, PtracePermissionError

__all__ = [
    "CaptureError",
    "CaptureResult",
    "NoSuchProcessError",
    "ProcessExitedError",
    "PtracePermissionError",
    "add_capture_arguments",
    "capture_main",
    "capture_process",
    "describe_capture",
    "run_capture",
]
