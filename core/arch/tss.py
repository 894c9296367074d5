"""The 64-bit task-state segment (SDM Vol. 3A 7.7 "Task Management in 64-bit Mode").

In IA-32e mode the TSS holds no task state, only stack pointers: RSP0-RSP2 for
privilege changes, IST1-IST7 for gates that name an IST slot, and the I/O map
base. Reserved bytes and everything after byte 104 are kept verbatim.

>>> tss = Tss64(rsp0=0xfffffe0000003000, ist=(0x1000, 0, 0, 0, 0, 0, 0), iomap_base=0x68)
>>> str(tss)
'rsp0=0xfffffe0000003000 rsp1=0x0 rsp2=0x0 ist1=0x1000 iomap_base=0x68'
>>> Tss64.from_bytes(tss.to_bytes()) == tss
True
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from kctx_debug.arch.packing import as_bytes, format_table
from kctx_debug.errors import DescriptorError

__all__ = ["IST_SLOTS", "TSS64_SIZE", "Tss64", "describe_tss", "describe_tss_layout"]

# Figure 7-11 "64-Bit TSS Format": (name, byte offset, size); "reserved" rows are kept raw.
_TSS_LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("reserved", 0x00, 4),
    ("rsp0", 0x04, 8),
    ("rsp1", 0x0C, 8),
    ("rsp2", 0x14, 8),
    ("reserved", 0x1C, 8),
    *((f"ist{n}", 0x24 + 8 * (n - 1), 8) for n in range(1, 8)),
    ("reserved", 0x5C, 8),
    ("reserved", 0x64, 2),
    ("iomap_base", 0x66, 2),
)
_STRUCT_CODES = {8: "Q", 2: "H"}
_TSS_STRUCT = struct.Struct(
    "<"
    + "".join(
        f"{size}s" if name == "reserved" else _STRUCT_CODES[size] for name, _, size in _TSS_LAYOUT
    )
)
TSS64_SIZE = _TSS_STRUCT.size  # 104 bytes; the TSS limit must be at least 0x67
IST_SLOTS = 7
_RESERVED_SIZE = sum(size for name, _, size in _TSS_LAYOUT if name == "reserved")
_U64_MAX = (1 << 64) - 1
_U16_MAX = (1 << 16) - 1


def _check_range(what: str, value: object, maximum: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise DescriptorError(f"{what}={value!r} is outside 0..{maximum:#x}")


@dataclass(frozen=True)
class Tss64:
    """The 64-bit TSS: privilege-level stacks, IST stacks and the I/O map base.

    ``ist[0]`` is IST1. ``reserved`` holds the 22 reserved bytes in address order
    and ``tail`` whatever follows byte 104 (the I/O permission bitmap, OS data),
    so ``Tss64.from_bytes(b).to_bytes() == b``.
    """

    rsp0: int = 0
    rsp1: int = 0
    rsp2: int = 0
    ist: tuple[int, ...] = (0,) * IST_SLOTS
    iomap_base: int = 0
    reserved: bytes = bytes(_RESERVED_SIZE)
    tail: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        for name in ("rsp0", "rsp1", "rsp2"):
            _check_range(f"Tss64.{name}", getattr(self, name), _U64_MAX)
        if not isinstance(self.ist, Iterable) or len(ist := tuple(self.ist)) != IST_SLOTS:
            raise DescriptorError(f"Tss64.ist must be {IST_SLOTS} stack pointers")
        for n, value in enumerate(ist, start=1):
            _check_range(f"Tss64.ist{n}", value, _U64_MAX)
        object.__setattr__(self, "ist", tuple(int(value) for value in ist))
        _check_range("Tss64.iomap_base", self.iomap_base, _U16_MAX)
        reserved = as_bytes(self.reserved, "Tss64.reserved")
        if len(reserved) != _RESERVED_SIZE:
            raise DescriptorError(f"Tss64.reserved must be {_RESERVED_SIZE} bytes")
        object.__setattr__(self, "reserved", reserved)
        object.__setattr__(self, "tail", as_bytes(self.tail, "Tss64.tail"))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Tss64:
        """Decode a TSS of at least 104 bytes; bytes past 104 go to ``tail``.

        :raises DescriptorError: fewer than 104 bytes.
        """
        buf = as_bytes(data, "Tss64")
        if len(buf) < TSS64_SIZE:
            raise DescriptorError(f"Tss64 needs at least {TSS64_SIZE} bytes, got {len(buf)}")
        names = (name for name, _, _ in _TSS_LAYOUT)
        items = list(zip(names, _TSS_STRUCT.unpack_from(buf), strict=True))
        values = dict(items)
        return cls(
            rsp0=values["rsp0"],
            rsp1=values["rsp1"],
            rsp2=values["rsp2"],
            ist=tuple(values[f"ist{n}"] for n in range(1, IST_SLOTS + 1)),
            iomap_base=values["iomap_base"],
            reserved=b"".join(value for name, value in items if name == "reserved"),
            tail=buf[TSS64_SIZE:],
        )

    def to_bytes(self) -> bytes:
        """The TSS as it lies in memory, ``tail`` included."""
        named = {"rsp0": self.rsp0, "rsp1": self.rsp1, "rsp2": self.rsp2}
        named.update((f"ist{n}", value) for n, value in enumerate(self.ist, start=1))
        named["iomap_base"] = self.iomap_base
        values: list[int | bytes] = []
        offset = 0
        for name, _, size in _TSS_LAYOUT:
            if name == "reserved":
                values.append(self.reserved[offset : offset + size])
                offset += size
            else:
                values.append(named[name])
        return _TSS_STRUCT.pack(*values) + self.tail

    def rsp_for(self, cpl: int) -> int:
        """The stack pointer loaded on a switch to privilege level ``cpl`` (0-2).

        :raises DescriptorError: ``cpl`` is not 0, 1 or 2.
        """
        if cpl not in (0, 1, 2):
            raise DescriptorError(f"the TSS holds stacks for CPL 0-2, not {cpl}")
        return (self.rsp0, self.rsp1, self.rsp2)[cpl]

    def ist_stack(self, n: int) -> int:
        """IST entry ``n`` (1-7), as a gate's ``ist`` field numbers it.

        :raises DescriptorError: ``n`` is outside 1-7 (``ist=0`` means "no IST").
        """
        if not 1 <= n <= IST_SLOTS:
            raise DescriptorError(f"IST index must be 1-{IST_SLOTS}, not {n}")
        return self.ist[n - 1]

    def __str__(self) -> str:
        return describe_tss(self)


def describe_tss(tss: Tss64) -> str:
    """``rsp0=… rsp1=… rsp2=…``, the non-zero IST entries, then ``iomap_base``."""
    ists = "".join(f" ist{n}={v:#x}" for n, v in enumerate(tss.ist, start=1) if v)
    return (
        f"rsp0={tss.rsp0:#x} rsp1={tss.rsp1:#x} rsp2={tss.rsp2:#x}{ists} "
        f"iomap_base={tss.iomap_base:#x}"
    )


def describe_tss_layout(tss: Tss64 | None = None) -> str:
    """Figure 7-11 as a table of byte ranges, highest offset first; values if ``tss``."""
    data = tss.to_bytes() if tss is not None else None
    rows = []
    for name, offset, size in reversed(_TSS_LAYOUT):
        span = f"{offset + size - 1:#04x}:{offset:#04x}"
        value = "" if data is None else hex(int.from_bytes(data[offset : offset + size], "little"))
        rows.append((span, name, value))
    return format_table(("bytes", "field", "value"), rows)
