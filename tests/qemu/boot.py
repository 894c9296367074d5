"""Boot a Debian cloud kernel with a busybox initramfs under QEMU (TCG) and dump its memory.

The guest's console goes to ``console.log`` and its second serial port, which
the init script writes ``/proc/kallsyms`` to, to ``ttyS1.log``; QMP drives the
dump. :class:`QemuGuest` always kills QEMU when its ``with`` block ends.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .initramfs import KALLSYMS_BEGIN, KALLSYMS_END
from .qmp import QmpClient

__all__ = [
    "QEMU",
    "BootTimeout",
    "QemuGuest",
    "extract_between",
    "find_kernel",
]

QEMU = "qemu-system-x86_64"
_KERNEL_GLOB = "/boot/vmlinuz-6.1.*-cloud-amd64"


class BootTimeout(RuntimeError):
    """The guest did not print what we waited for in time (the console log is attached)."""


def find_kernel() -> Path | None:
    """The newest installed Debian 6.1 cloud kernel image, or None."""
    found = sorted(glob.glob(_KERNEL_GLOB), key=_version_key)
    return Path(found[-1]) if found else None


def _version_key(path: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path)]


def extract_between(text: str, begin: str, end: str) -> str | None:
    """The lines strictly between the marker lines (``\\r`` stripped), or None if incomplete."""
    lines = text.replace("\r", "").split("\n")
    try:
        start = lines.index(begin)
        stop = lines.index(end, start + 1)
    except ValueError:
        return None
    return "\n".join(lines[start + 1 : stop]) + "\n"


@dataclass
class QemuGuest:
    """One QEMU process; use as a context manager (``__exit__`` kills it)."""

    workdir: Path
    kernel: Path
    initrd: Path
    cpu_model: str = "qemu64"
    memory: str = "256M"
    append: str = "console=ttyS0 panic=-1 quiet"
    process: subprocess.Popen | None = field(default=None, init=False)
    qmp: QmpClient | None = field(default=None, init=False)

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def port_log(self) -> Path:
        return self.workdir / "ttyS1.log"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "qmp.sock"

    def command(self) -> list[str]:
        return [
            shutil.which(QEMU) or QEMU,
            "-machine", "pc",
            "-accel", "tcg",
            "-cpu", self.cpu_model,
            "-m", self.memory,
            "-smp", "1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", self.append,
            "-qmp", f"unix:{self.socket_path},server=on,wait=off",
            "-serial", f"file:{self.console_log}",
            "-serial", f"file:{self.port_log}",
            "-monitor", "none",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        with open(self.workdir / "qemu.stderr", "wb") as stderr:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.qmp = QmpClient.connect(self.socket_path, timeout)

    def wait_for_kallsyms(self, timeout: float) -> str:
        """Wait until ttyS1 shows the end marker; return the kallsyms text between the markers."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.port_log.read_text(errors="replace") if self.port_log.exists() else ""
            found = extract_between(text, KALLSYMS_BEGIN, KALLSYMS_END)
            if found is not None:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise BootTimeout(f"QEMU exited with {self.process.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise BootTimeout(f"no {KALLSYMS_END} after {timeout} s:\n{self._tail()}")
            time.sleep(0.2)

    def _tail(self) -> str:
        parts = []
        for path in (self.workdir / "qemu.stderr", self.console_log):
            if path.exists():
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def dump(self, path: Path) -> None:
        """QMP ``dump-guest-memory`` without paging: an ELF core with physical addresses."""
        assert self.qmp is not None
        self.qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{path}")

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
