"""kctx-debug: a userspace x86-64 kernel-context emulator and debugger."""

from .errors import KctxError

__all__ = ["KctxError", "__version__"]
__version__ = "0.1.0"
