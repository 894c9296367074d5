"""Build a tiny initramfs (cpio "newc", uncompressed) around busybox-static, in pure Python.

The archive holds ``/bin/busybox``, ``/init`` (a busybox shell script), empty
``/proc`` and ``/dev`` folders and the ``/dev/console`` and ``/dev/ttyS1`` device
nodes, so the kernel can open a console for init without devtmpfs. Device nodes
are just header fields in newc, so no root privilege is needed to build one.

>>> archive = build_initramfs(Path("/bin/busybox"), "#!/bin/busybox sh\\necho hi\\n")
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUSYBOX",
    "KALLSYMS_BEGIN",
    "KALLSYMS_END",
    "CpioEntry",
    "build_initramfs",
    "kallsyms_init_script",
    "newc_archive",
]

BUSYBOX = Path("/bin/busybox")  # busybox-static installs a static binary here
KALLSYMS_BEGIN = "KCTX-KALLSYMS-BEGIN"
KALLSYMS_END = "KCTX-KALLSYMS-END"

# newc ("070701") header: magic then 13 eight-digit hex fields (man 5 cpio, "New ASCII Format").
_NEWC_MAGIC = b"070701"
_NEWC_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)  # fmt: skip
_ALIGN = 4  # names and file data are padded to 4-byte boundaries
_TRAILER = "TRAILER!!!"
# Linux device numbers (Documentation/admin-guide/devices.txt).
_CONSOLE = (5, 1)
_TTYS1 = (4, 65)


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: path without a leading slash, mode with its file-type bits."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return bytes(-length % _ALIGN)


def _member(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.encode() + b"\0"
    values = {
        "ino": ino,
        "mode": entry.mode,
        "nlink": 2 if stat.S_ISDIR(entry.mode) else 1,
        "filesize": len(entry.data),
        "rdevmajor": entry.rdev[0],
        "rdevminor": entry.rdev[1],
        "namesize": len(name),
    }
    header = _NEWC_MAGIC + b"".join(b"%08X" % values.get(f, 0) for f in _NEWC_FIELDS)
    head = header + name
    return head + _pad(len(head)) + entry.data + _pad(len(entry.data))


def newc_archive(entries: list[CpioEntry]) -> bytes:
    """The newc archive of ``entries`` in order, ending with the trailer member."""
    members = [_member(e, i + 1) for i, e in enumerate(entries)]
    members.append(_member(CpioEntry(_TRAILER, 0), 0))
    return b"".join(members)


def kallsyms_init_script(port: str = "/dev/ttyS1") -> str:
    """An /init that mounts proc, writes /proc/kallsyms between marker lines to ``port``, idles.

    A dedicated serial port keeps kernel messages on the console from splitting symbol lines.
    """
    return (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        f"{{ echo {KALLSYMS_BEGIN}; /bin/busybox cat /proc/kallsyms; echo {KALLSYMS_END}; }}"
        f" > {port}\n"
        "while :; do /bin/busybox sleep 1000; done\n"
    )


def build_initramfs(busybox: Path, init_script: str) -> bytes:
    """The archive: busybox, the init script and the folders and nodes init needs."""
    return newc_archive(
        [
            CpioEntry("bin", stat.S_IFDIR | 0o755),
            CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
            CpioEntry("dev", stat.S_IFDIR | 0o755),
            CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=_CONSOLE),
            CpioEntry("dev/ttyS1", stat.S_IFCHR | 0o600, rdev=_TTYS1),
            CpioEntry("proc", stat.S_IFDIR | 0o755),
            CpioEntry("init", stat.S_IFREG | 0o755, init_script.encode()),
        ]
    )
