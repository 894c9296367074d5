"""``/proc/PID/maps`` and ``/proc/PID/status``: the VMAs of a process and its state.

The maps format is proc(5)'s: ``start-end perms offset dev inode [path]``, one
VMA per line, addresses in hex, end exclusive.

>>> v = Vma.from_line("7f0000001000-7f0000003000 rw-p 00000000 00:00 0  [heap]")
>>> v.perms_text, v.pages, v.pte_writable, v.skip_reason
('rw-p', 2, True, None)
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from ..physmem import PAGE_SIZE
from .errors import CaptureError, NoSuchProcessError

__all__ = [
    "SPECIAL_UNREADABLE",
    "Vma",
    "VmaPerm",
    "is_alive",
    "parse_maps",
    "read_maps",
    "read_status",
]


class VmaPerm(enum.IntFlag):
    """The perms column of /proc/PID/maps (proc(5)); SHARED is ``s``, private ``p``."""

    READ = 1
    WRITE = 2
    EXEC = 4
    SHARED = 8


_PERM_LETTERS = ((VmaPerm.READ, "r"), (VmaPerm.WRITE, "w"), (VmaPerm.EXEC, "x"))

# Kernel-data mappings that /proc/PID/mem refuses (VM_IO|VM_PFNMAP) or that lie
# outside the user address space the pagemap file covers.
SPECIAL_UNREADABLE = {
    "[vvar]": "kernel timekeeping data (VM_PFNMAP): /proc/PID/mem cannot read it",
    "[vvar_vclock]": "kernel clock pages (VM_PFNMAP): /proc/PID/mem cannot read it",
    "[vsyscall]": "legacy vsyscall page in the kernel half: pagemap does not cover it",
}
_USER_TOP = 1 << 63  # any VMA at or above it is in the kernel half


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: VmaPerm
    offset: int
    device: str
    inode: int
    path: str  # file, ``[heap]``-style name, or "" for anonymous memory

    @classmethod
    def from_line(cls, line: str) -> Vma:
        """Parse one maps line; raises :class:`CaptureError` naming the line when malformed."""
        parts = line.split(maxsplit=5)
        try:
            if len(parts) < 5:
                raise ValueError(line)
            lo, hi = parts[0].split("-")
            start, end = int(lo, 16), int(hi, 16)
            text = parts[1]
            if len(text) != 4 or text[3] not in "ps":
                raise ValueError(text)
            perms = VmaPerm.SHARED if text[3] == "s" else VmaPerm(0)
            for flag, letter in _PERM_LETTERS:
                if text["rwx".index(letter)] == letter:
                    perms |= flag
                elif text["rwx".index(letter)] != "-":
                    raise ValueError(text)
            vma = cls(
                start,
                end,
                perms,
                int(parts[2], 16),
                parts[3],
                int(parts[4]),
                parts[5].strip() if len(parts) > 5 else "",
            )
        except ValueError:
            raise CaptureError(f"malformed /proc/PID/maps line: {line[:80]!r}") from None
        if start % PAGE_SIZE or end % PAGE_SIZE or not start < end:
            raise CaptureError(f"/proc/PID/maps line has a bad range: {line[:80]!r}")
        return vma

    @property
    def perms_text(self) -> str:
        letters = "".join(c if self.perms & f else "-" for f, c in _PERM_LETTERS)
        return letters + ("s" if self.perms & VmaPerm.SHARED else "p")

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def pte_writable(self) -> bool:
        return bool(self.perms & VmaPerm.WRITE)

    @property
    def pte_executable(self) -> bool:
        return bool(self.perms & VmaPerm.EXEC)

    @property
    def skip_reason(self) -> str | None:
        """Why a capture leaves this VMA out, or None when it is captured."""
        if self.path in SPECIAL_UNREADABLE:
            return SPECIAL_UNREADABLE[self.path]
        if self.end > _USER_TOP:
            return "in the kernel half: pagemap does not cover it"
        if not self.perms & VmaPerm.READ:
            # Linux marks such PTEs PROT_NONE (hardware P=0): there is no CPU mapping to copy.
            return "no access rights (PROT_NONE): the CPU cannot map it"
        return None

    def describe(self) -> str:
        return f"{self.start:#x}-{self.end:#x} {self.perms_text} {self.path or '(anonymous)'}"


def parse_maps(text: str) -> list[Vma]:
    """Every VMA in a /proc/PID/maps text, in file order (ascending addresses)."""
    return [Vma.from_line(line) for line in text.splitlines() if line.strip()]


def read_maps(pid: int) -> list[Vma]:
    """The VMAs of a live process.

    :raises NoSuchProcessError: the process does not exist.
    :raises CaptureError: the file is unreadable or malformed.
    """
    try:
        with open(f"/proc/{int(pid)}/maps", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            raise NoSuchProcessError(pid) from None
        raise CaptureError(f"cannot read /proc/{pid}/maps: {e.strerror}") from None
    return parse_maps(text)


def read_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as name -> value text; empty when the process is gone."""
    try:
        with open(f"/proc/{int(pid)}/status", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            out[name] = value.strip()
    return out


def is_alive(pid: int) -> bool:
    """True while the process exists and is neither a zombie nor dead (State Z/X)."""
    state = read_status(pid).get("State", "")
    return bool(state) and state[0] not in "ZX"
