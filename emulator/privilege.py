"""Privilege and the emulator's private trampoline: instructions run outside the guest's view.

Some state can only be set by executing an instruction: CS and SS with their hidden
parts and the privilege level (writing CS with ``reg_write`` changes the selector,
not the CPL), and PKRU (Unicorn has no register id for it). The trampoline is a code
page, a stack page and a 64 KiB GDT in private physical memory, mapped by private
page tables (built in the guest's paging mode) at :data:`TRAMPOLINE_VA`. For one
short run CR3 points at those tables, and GDTR at the private GDT for an ``iretq``;
both are put back afterwards, and no guest byte is touched. The page the ``iretq``
returns to is mapped in the private tables too, so the engine can translate it
before stopping.

``iretq`` can only keep or lower the privilege level. Going to CPL0 restores a
context saved at CPL0 when the machine was built; :class:`~.carry.CarriedState`
takes the rest of the state across that restore.

The private tables are built once and kept while the page an ``iretq`` returns to
maps to the same frame with the same U/S (the guest's tables are walked every time:
they may change); only the trampoline writes the table frames.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType

from unicorn import Uc
from unicorn import x86_const as x86

from ..arch.bits import BitField
from ..arch.descriptors import SegmentDescriptor, Selector
from ..arch.vectors import Vector
from ..buildspec import GdtEntrySpec
from ..errors import KctxError
from ..pagetables.build import PageTableBuilder
from ..pagetables.entry import PagingMode, PteFlag
from ..pagetables.walk import WalkResult
from ..physmem import PAGE_SIZE, PhysicalMemory
from ..tables import encode_gdt_entry
from .control import Runner
from .engine import EmulatorError
from .registers import segment_flags

__all__ = [
    "DATA_SEGMENTS",
    "TRAMPOLINE_PAGES",
    "TRAMPOLINE_VA",
    "USER_TRAMPOLINE_VA",
    "PageReader",
    "SelectorSet",
    "Trampoline",
    "descriptor_from_attributes",
    "flat_descriptor",
    "guest_descriptor",
    "mark_accessed",
    "star_selectors",
]

# Canonical with four and five levels; only the private tables map it.
TRAMPOLINE_VA = 0xFFFF_8000_0000_0000
USER_TRAMPOLINE_VA = TRAMPOLINE_VA + 0x20_0000  # the code page again, U/S=1, for CPL3
_CODE_PAGE, _STACK_PAGE, _GDT_PAGE = 0, 1, 2
_GDT_PAGES = 16  # 8192 descriptors: any selector's index fits
_TABLE_PAGES = 12  # private tables: three mappings, five levels at most
TRAMPOLINE_PAGES = _GDT_PAGE + _GDT_PAGES + _TABLE_PAGES
# iretq (SDM vol. 2A IRET: REX.W CF); xor ecx,ecx [; xor edx,edx]; rdpkru / wrpkru (vol. 2B).
_IRETQ = bytes.fromhex("48cf")
_RDPKRU = bytes.fromhex("31c9 0f01ee")
_WRPKRU = bytes.fromhex("31c9 31d2 0f01ef")
_IRET_FRAME = struct.Struct("<5Q")  # RIP, CS, RFLAGS, RSP, SS (SDM vol. 3A Figure 6-9)
_SAVED = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RIP,
          x86.UC_X86_REG_RFLAGS)  # fmt: skip
# VMCS access rights (SDM vol. 3C 25.4.1): S is bit 4, P bit 7, "unusable" bit 16.
_AR_S, _AR_P, _AR_UNUSABLE = BitField("S", 4, 1), BitField("P", 7, 1), BitField("unusable", 16, 1)
# Type bit A (SDM vol. 3A 3.4.5.1), preset so that loading a segment writes no GDT byte.
_TYPE_ACCESSED = 1
_FLAT_LIMIT = 0xFFFFF
_PKRU_MASK = 0xFFFF_FFFF
# Linux's selectors (arch/x86/include/asm/segment.h) when nothing better is known.
KERNEL_CS, USER_CS, USER_SS = 0x10, 0x33, 0x2B
# IA32_STAR (SDM vol. 3A 5.8.8): SYSCALL loads CS from 47:32 (SS = CS + 8); 64-bit
# SYSRET loads CS = base + 16 and SS = base + 8 from 63:48, both with RPL 3.
_STAR_SYSCALL_CS, _STAR_SYSRET_BASE = BitField("SYSCALL_CS", 32, 16), BitField("SYSRET", 48, 16)
_SS_DELTA, _SYSRET_CS_DELTA, _RPL3 = 8, 16, 3
DATA_SEGMENTS = ("ds", "es", "fs", "gs")


@dataclass(frozen=True)
class SelectorSet:
    """Kernel and user CS/SS selectors."""

    kernel_cs: int
    kernel_ss: int
    user_cs: int
    user_ss: int


def star_selectors(star: int) -> SelectorSet:
    """The selectors SYSCALL and SYSRET would load with this IA32_STAR (Linux's if 0)."""
    kernel_cs = _STAR_SYSCALL_CS.extract(star) or KERNEL_CS
    base = _STAR_SYSRET_BASE.extract(star)
    if not base:
        return SelectorSet(kernel_cs, kernel_cs + _SS_DELTA, USER_CS, USER_SS)
    return SelectorSet(
        kernel_cs,
        kernel_cs + _SS_DELTA,
        (base + _SYSRET_CS_DELTA) | _RPL3,
        (base + _SS_DELTA) | _RPL3,
    )


def mark_accessed(desc: SegmentDescriptor) -> SegmentDescriptor:
    """``desc`` with type bit A set."""
    return replace(desc, type=desc.type | _TYPE_ACCESSED)


def descriptor_from_attributes(attributes: int | None) -> SegmentDescriptor | None:
    """A flat descriptor with these cached attributes; None if they are not a usable segment."""
    if (
        attributes is None
        or _AR_UNUSABLE.extract(attributes)
        or not _AR_P.extract(attributes)
        or not _AR_S.extract(attributes)
    ):
        return None
    desc = SegmentDescriptor.from_int(segment_flags(attributes) << 32)
    return mark_accessed(replace(desc, limit=_FLAT_LIMIT))


def _encode_flat(kind: str, dpl: int) -> SegmentDescriptor:
    return mark_accessed(
        SegmentDescriptor.from_bytes(encode_gdt_entry(GdtEntrySpec(0, kind, dpl=dpl)))
    )


# Encoded once: every privilege change asks for some (descriptors are frozen).
_FLAT = MappingProxyType(
    {(kind, dpl): _encode_flat(kind, dpl) for kind in ("code64", "data") for dpl in range(4)}
)


def flat_descriptor(kind: str, dpl: int) -> SegmentDescriptor:
    """A flat ``code64`` or ``data`` descriptor of privilege ``dpl``."""
    desc = _FLAT.get((kind, dpl))
    return desc if desc is not None else _encode_flat(kind, dpl)


class PageReader:
    """``read(va, size)`` through a one-page cache, for several reads of one table in a
    row (the guest's tables must not change meanwhile). A read that crosses a page, or
    whose page cannot be read whole, goes to ``read`` itself."""

    def __init__(self, read: Callable[[int, int], bytes]) -> None:
        self._read = read
        self._page: int | None = None
        self._data = b""

    def __call__(self, va: int, size: int) -> bytes:
        page, offset = va & ~(PAGE_SIZE - 1), va & (PAGE_SIZE - 1)
        if offset + size > PAGE_SIZE:
            return self._read(va, size)
        if page != self._page:
            try:
                self._data = self._read(page, PAGE_SIZE)
            except KctxError:
                return self._read(va, size)
            self._page = page
        return self._data[offset : offset + size]


def guest_descriptor(
    read_virtual: Callable[[int, int], bytes], gdtr: tuple, selector: int, kind: str
) -> SegmentDescriptor:
    """The guest GDT's descriptor for ``selector`` when it is a present ``kind`` segment
    (``code64`` or writable ``data``) of DPL = RPL; otherwise a flat one of that DPL."""
    sel = Selector.from_int(selector)
    _selector, base, limit, _flags = gdtr
    if not sel.is_null and not sel.ti and sel.table_offset + 7 <= limit:
        try:
            desc = SegmentDescriptor.from_bytes(read_virtual(base + sel.table_offset, 8))
        except KctxError:
            desc = None
        usable = desc is not None and desc.p and desc.dpl == sel.rpl
        if usable and (desc.is_long_code if kind == "code64" else desc.writable):
            return mark_accessed(desc)
    return flat_descriptor(kind, sel.rpl)


class Trampoline:
    """Runs the emulator's own instructions; see the module docstring.

    :param scratch: private memory holding ``TRAMPOLINE_PAGES`` pages from ``base``
        (machine-physical addresses, mapped into ``uc``).
    :param translate: the guest's current VA -> walk, for the page an iretq returns to.
    """

    def __init__(
        self,
        uc: Uc,
        runner: Runner,
        scratch: PhysicalMemory,
        base: int,
        mode: PagingMode,
        translate: Callable[[int], WalkResult],
    ) -> None:
        self._uc, self._runner, self._mem, self._base = uc, runner, scratch, base
        self._mode, self._translate = mode, translate
        # What the private tables were last built for, and their root.
        self._tables_key: tuple | None = None
        self._tables_root = 0

    def _page(self, index: int) -> int:
        return self._base + index * PAGE_SIZE

    def _target_mapping(self, target: int | None) -> tuple[int, int, PteFlag] | None:
        """``target``'s page, its frame and U/S in the guest's tables now (None: unmapped)."""
        if target is None:
            return None
        walk = self._translate(target)
        page = target & ~(PAGE_SIZE - 1)
        if not walk.ok or TRAMPOLINE_VA <= page < USER_TRAMPOLINE_VA + PAGE_SIZE:
            return None
        return page, walk.phys & ~(PAGE_SIZE - 1), PteFlag.US if walk.user else PteFlag(0)

    def _tables(self, target: int | None) -> int:
        """The private tables (with ``target``'s page if the guest maps it); the root.

        Rebuilt only when what they map changes (see the module docstring).
        """
        if target is None and self._tables_key is not None:
            return self._tables_root  # every build maps the trampoline's own pages
        key = (self._mode, self._target_mapping(target))
        if key == self._tables_key:
            return self._tables_root
        self._tables_key = None  # until the frames hold a whole build again
        tables = PageTableBuilder(
            self._mem, self._mode, self._page(_GDT_PAGE + _GDT_PAGES), _TABLE_PAGES * PAGE_SIZE
        )
        span = (_GDT_PAGE + _GDT_PAGES) * PAGE_SIZE
        tables.map(TRAMPOLINE_VA, self._base, span, PAGE_SIZE, PteFlag.RW)
        tables.map(USER_TRAMPOLINE_VA, self._base, PAGE_SIZE, PAGE_SIZE, PteFlag.US)
        mapping = key[1]
        if mapping is not None:
            page, frame, flags = mapping
            tables.map(page, frame, PAGE_SIZE, PAGE_SIZE, flags)
        self._tables_key, self._tables_root = key, tables.root
        return tables.root

    def run(self, code: bytes, count: int, target: int | None = None) -> int | None:
        """Run ``count`` instructions of ``code``; the vector of a trap it took, if any."""
        uc = self._uc
        cr3, cr2 = uc.reg_read(x86.UC_X86_REG_CR3), uc.reg_read(x86.UC_X86_REG_CR2)
        self._mem.write(self._page(_CODE_PAGE), code)
        uc.reg_write(x86.UC_X86_REG_CR3, self._tables(target))
        user = uc.reg_read(x86.UC_X86_REG_CS) & 3 == 3
        try:
            # Looked up only under the private tables, where they are mapped: a lookup
            # of an unmapped address leaves a fault in flight (see .engine).
            for va in (TRAMPOLINE_VA, USER_TRAMPOLINE_VA):
                uc.ctl_remove_cache(va, va + PAGE_SIZE)
            self._runner.reset_nested_faults()
            return self._runner.run_private(USER_TRAMPOLINE_VA if user else TRAMPOLINE_VA, count)
        finally:
            uc.reg_write(x86.UC_X86_REG_CR3, cr3)
            uc.reg_write(x86.UC_X86_REG_CR2, cr2)

    def iret(
        self, rip: int, cs: int, rflags: int, rsp: int, ss: int,
        cs_desc: SegmentDescriptor, ss_desc: SegmentDescriptor,
    ) -> None:  # fmt: skip
        """Load CS:RIP, SS:RSP and RFLAGS (and so the CPL) with a real iretq from CPL0.

        :raises EmulatorError: the iretq faulted (a bad selector, RFLAGS, or RIP).
        """
        uc = self._uc
        gdtr = uc.reg_read(x86.UC_X86_REG_GDTR)
        limit = 0
        for selector, desc in ((cs, cs_desc), (ss, ss_desc)):
            sel = Selector.from_int(selector)
            if not sel.is_null:
                self._mem.write(self._page(_GDT_PAGE) + sel.table_offset, desc.to_bytes())
                limit = max(limit, sel.table_offset + 7)
        frame = _IRET_FRAME.pack(rip, cs, rflags, rsp, ss)
        frame_offset = (_STACK_PAGE + 1) * PAGE_SIZE - len(frame)
        self._mem.write(self._base + frame_offset, frame)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, TRAMPOLINE_VA + _GDT_PAGE * PAGE_SIZE, limit, 0))
        uc.reg_write(x86.UC_X86_REG_RSP, TRAMPOLINE_VA + frame_offset)
        try:
            vector = self.run(_IRETQ, 1, target=rip)
        finally:
            uc.reg_write(x86.UC_X86_REG_GDTR, gdtr)
        # If the guest does not map RIP the fetch after a good iretq faults: that is fine.
        if uc.reg_read(x86.UC_X86_REG_CS) != cs or vector not in (None, Vector.PF):
            raise EmulatorError(
                f"iretq to {cs:#x}:{rip:#x} (ss {ss:#x}, rflags {rflags:#x}) failed"
                + (f" with vector {vector}" if vector is not None else "")
            )
        uc.reg_write(x86.UC_X86_REG_RIP, rip)

    def _with_saved(
        self, code: bytes, count: int, rax: int | None = None
    ) -> tuple[int, int | None]:
        uc = self._uc
        saved = [uc.reg_read(r) for r in _SAVED]
        if rax is not None:
            uc.reg_write(x86.UC_X86_REG_RAX, rax)
        vector = self.run(code, count)
        result = uc.reg_read(x86.UC_X86_REG_RAX)
        for reg, value in zip(_SAVED, saved, strict=True):
            uc.reg_write(reg, value)
        return result, vector

    def read_pkru(self) -> int:
        """RDPKRU (needs CR4.PKE); general registers are left as they were."""
        value, vector = self._with_saved(_RDPKRU, 2)
        if vector is not None:
            raise EmulatorError(f"rdpkru failed with vector {vector}")
        return value & _PKRU_MASK

    def write_pkru(self, value: int) -> None:
        """WRPKRU (needs CR4.PKE); general registers are left as they were."""
        _result, vector = self._with_saved(_WRPKRU, 3, rax=value)
        if vector is not None:
            raise EmulatorError(f"wrpkru failed with vector {vector}")
