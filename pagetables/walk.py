"""IA-32e page-table walk with access rights and page-fault decisions (SDM vol. 3A 4.5-4.7).

:func:`translate` follows CR3 through 4-level or 5-level paging tables held in a
:class:`~kctx_debug.physmem.PhysicalMemory` and returns a :class:`WalkResult`:
one :class:`WalkStep` per level read, the physical address and page size, the
effective permissions, and the fault (if any) that a given :class:`Access` would
take, with the error code the processor would push. The walk only reads memory:
it never sets Accessed/Dirty bits. A table frame missing from the snapshot is not
an architectural fault; it ends the walk with status ``NOT_CAPTURED``.

>>> result = translate(mem, 0xFFFFFFFF81000000, cpu, Access.parse("write"))
>>> hex(result.phys), result.page_size, result.fault.error_code
('0x1000000', 2097152, <PfErrorCode.P|WR: 3>)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from kctx_debug.arch.bits import CR0, CR4, EFER, RFLAGS
from kctx_debug.arch.vectors import Vector
from kctx_debug.errors import PageTableError, UnbackedMemoryError
from kctx_debug.physmem import MAX_PHYS_BITS, PhysicalMemory

from .entry import (
    ADDRESS_MASK,
    CR3_PCID_MASK,
    ENTRY_SIZE,
    INDEX_MASK,
    PKEY_FIELD_BITS,
    Cr3,
    Level,
    PagingMode,
    PfErrorCode,
    PkeyRights,
    PteFlag,
    describe_entry,
    entry_pkey,
    paging_mode,
    reserved_mask,
)

__all__ = [
    "Access",
    "AccessKind",
    "CpuPagingState",
    "FaultKind",
    "PageFault",
    "WalkResult",
    "WalkStatus",
    "WalkStep",
    "page_size_name",
    "translate",
]


_U64 = (1 << 64) - 1
# Plain ints for the per-level hot path (IntFlag arithmetic builds enum members).
_P, _RW, _US, _PS, _XD = (
    int(f) for f in (PteFlag.P, PteFlag.RW, PteFlag.US, PteFlag.PS, PteFlag.XD)
)
# A sane lower bound: every 64-bit processor reports at least 36.
_MIN_PHYS_BITS = 32


# -- inputs -----------------------------------------------------------------------


class AccessKind(Enum):
    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


_KIND_WORDS = {
    "read": AccessKind.READ,
    "r": AccessKind.READ,
    "write": AccessKind.WRITE,
    "w": AccessKind.WRITE,
    "fetch": AccessKind.FETCH,
    "exec": AccessKind.FETCH,
    "x": AccessKind.FETCH,
}


@dataclass(frozen=True)
class Access:
    """One memory access: its kind and privilege (SDM vol. 3A 4.6).

    ``user`` is an access made at CPL3; ``implicit`` is a supervisor-mode access
    the processor makes on its own (GDT/IDT/TSS reads), even from CPL3. The two
    exclude each other: an implicit access is a supervisor access.
    """

    kind: AccessKind = AccessKind.READ
    user: bool = False
    implicit: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AccessKind):
            raise PageTableError(f"access kind must be an AccessKind, not {self.kind!r}")
        if self.user and self.implicit:
            raise PageTableError("an implicit access is a supervisor-mode access, not a user one")

    @classmethod
    def parse(cls, text: str) -> Access:
        """Parse ``"write,user"``, ``"fetch"``, ``"read,implicit"`` (default: supervisor read).

        :raises PageTableError: an unknown or conflicting word.
        """
        kind = None
        user = implicit = False
        for word in text.replace(",", " ").lower().split():
            if word in _KIND_WORDS:
                if kind is not None and kind is not _KIND_WORDS[word]:
                    raise PageTableError(f"access {text!r} names two kinds")
                kind = _KIND_WORDS[word]
            elif word in ("user", "u"):
                user = True
            elif word in ("supervisor", "kernel", "s"):
                pass
            elif word == "implicit":
                implicit = True
            else:
                raise PageTableError(
                    f"unknown access word {word!r} in {text!r} "
                    "(use read|write|fetch, user|supervisor, implicit)"
                )
        return cls(kind or AccessKind.READ, user, implicit)

    @property
    def write(self) -> bool:
        return self.kind is AccessKind.WRITE

    @property
    def fetch(self) -> bool:
        return self.kind is AccessKind.FETCH

    def __str__(self) -> str:
        mode = "user" if self.user else "implicit" if self.implicit else "supervisor"
        return f"{self.kind.value},{mode}"


def _check_u64(name: str, value: object) -> int:
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PageTableError(f"{name} must be an integer, not {value!r}") from None
    if not 0 <= value <= _U64:
        raise PageTableError(f"{name} = {value:#x} does not fit in 64 bits")
    return value


def _flag(register: str, flag: int) -> property:
    """A bool property: is ``flag`` set in the named register field."""
    mask = int(flag)  # plain int: IntFlag arithmetic is slow on the walk's hot path
    return property(lambda self: bool(getattr(self, register) & mask), doc=f"{flag!r} is set")


@dataclass(frozen=True)
class CpuPagingState:
    """The registers a page walk reads; see :meth:`from_registers`."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    rflags: int = 0
    pkru: int = 0
    pkrs: int = 0
    maxphyaddr: int = MAX_PHYS_BITS

    def __post_init__(self) -> None:
        for name in ("cr0", "cr3", "cr4", "efer", "rflags", "pkru", "pkrs"):
            object.__setattr__(self, name, _check_u64(name, getattr(self, name)))
        bits = _check_u64("maxphyaddr", self.maxphyaddr)
        if not _MIN_PHYS_BITS <= bits <= MAX_PHYS_BITS:
            raise PageTableError(f"maxphyaddr {bits} is outside {_MIN_PHYS_BITS}..{MAX_PHYS_BITS}")
        object.__setattr__(self, "maxphyaddr", bits)

    @classmethod
    def from_registers(
        cls,
        *,
        cr0: int,
        cr3: int,
        cr4: int,
        efer: int,
        rflags: int = 0,
        pkru: int = 0,
        pkrs: int = 0,
        maxphyaddr: int = MAX_PHYS_BITS,
    ) -> CpuPagingState:
        """Build from register values (any ``int``-like); raises PageTableError if out of range."""
        return cls(cr0, cr3, cr4, efer, rflags, pkru, pkrs, maxphyaddr)

    @property
    def paging(self) -> bool:
        """IA-32e paging: CR0.PG, CR4.PAE and EFER.LME (LMA follows from them)."""
        return self.pg and self.pae and self.long_mode

    pg = _flag("cr0", CR0.PG)
    pae = _flag("cr4", CR4.PAE)
    long_mode = _flag("efer", EFER.LME | EFER.LMA)
    la57 = _flag("cr4", CR4.LA57)
    wp = _flag("cr0", CR0.WP)
    smep = _flag("cr4", CR4.SMEP)
    smap = _flag("cr4", CR4.SMAP)
    pke = _flag("cr4", CR4.PKE)
    pks = _flag("cr4", CR4.PKS)
    nxe = _flag("efer", EFER.NXE)
    pcide = _flag("cr4", CR4.PCIDE)
    ac = _flag("rflags", RFLAGS.AC)

    @property
    def mode(self) -> PagingMode:
        return paging_mode(self.la57)

    @property
    def phys_mask(self) -> int:
        """Address bits 51:12 of an entry that MAXPHYADDR allows."""
        return ADDRESS_MASK & ((1 << self.maxphyaddr) - 1)

    @property
    def root(self) -> int:
        """Physical address of the top-level table: :meth:`table_root` of ``cr3``."""
        return self.table_root(self.cr3)

    def table_root(self, cr3: int) -> int:
        """The top-level table a CR3 value selects: bits M-1:12 (PCID, PWT/PCD, bit 63 dropped)."""
        return _check_u64("cr3", cr3) & self.phys_mask

    @property
    def cr3_flags(self) -> Cr3:
        """CR3.PWT/PCD; with CR4.PCIDE those bits are part of the PCID instead."""
        return Cr3(0) if self.pcide else Cr3(self.cr3 & (Cr3.PWT | Cr3.PCD))

    @property
    def pcid(self) -> int | None:
        return self.cr3 & CR3_PCID_MASK if self.pcide else None


# -- outputs ----------------------------------------------------------------------


class WalkStatus(Enum):
    OK = "ok"  # translated, and the access (if any) is allowed
    FAULT = "fault"  # an architectural #PF or #GP for this access
    NOT_CAPTURED = "not-captured"  # a table frame is missing from the snapshot


class FaultKind(Enum):
    NOT_PRESENT = "not-present"
    PROTECTION = "protection"
    RESERVED = "reserved"
    PKEY = "pkey"
    NON_CANONICAL = "non-canonical"  # #GP(0), not #PF


@dataclass(frozen=True)
class WalkStep:
    """One paging-structure entry read during the walk."""

    level: Level
    table_phys: int
    index: int
    raw: int
    leaf: bool  # this present entry maps the page

    @property
    def entry_phys(self) -> int:
        return self.table_phys + self.index * ENTRY_SIZE

    @property
    def large(self) -> bool:
        return self.leaf and self.level.large_pages

    @property
    def flags(self) -> str:
        """Decoded flags, e.g. ``P|RW|US|A|XD``."""
        return describe_entry(self.raw, leaf=self.leaf, large=self.large)


@dataclass(frozen=True)
class PageFault:
    """The exception an access takes: #PF with its error code, or #GP(0)."""

    kind: FaultKind
    vector: int
    error_code: PfErrorCode
    address: int  # the faulting linear address (CR2 for #PF)
    step: WalkStep | None  # the entry that decided the fault
    reason: str

    @property
    def level(self) -> Level | None:
        return self.step.level if self.step else None

    @property
    def entry(self) -> int | None:
        return self.step.raw if self.step else None


@dataclass(frozen=True)
class WalkResult:
    """Everything a walk found; ``ok`` means a translation exists."""

    va: int
    steps: tuple[WalkStep, ...]
    status: WalkStatus
    phys: int | None = None
    page_size: int | None = None
    writable: bool = False  # R/W ANDed over all levels
    user: bool = False  # U/S ANDed over all levels
    executable: bool = False  # no XD at any level (always, with EFER.NXE=0)
    pkey: int | None = None  # leaf key, when CR4.PKE (user page) or CR4.PKS (supervisor)
    fault: PageFault | None = None
    missing_frame: int | None = None  # table address absent from the snapshot
    access: Access | None = None

    @property
    def ok(self) -> bool:
        return self.phys is not None

    @property
    def leaf(self) -> WalkStep | None:
        return self.steps[-1] if self.ok else None


# -- the walk ---------------------------------------------------------------------


def _bit_ranges(mask: int) -> str:
    """``51:46, 13`` for the set bits of ``mask``, highest first."""
    runs, bit = [], 63
    while bit >= 0:
        if mask >> bit & 1:
            top = bit
            while bit > 0 and mask >> (bit - 1) & 1:
                bit -= 1
            runs.append(f"{top}:{bit}" if top != bit else str(top))
        bit -= 1
    return ", ".join(runs)


def _describe_reserved(bits: int, level: Level, cpu: CpuPagingState) -> str:
    why = []
    above = bits & ADDRESS_MASK & ~cpu.phys_mask
    if above:
        why.append(f"bits {_bit_ranges(above)} set above MAXPHYADDR {cpu.maxphyaddr}")
    if bits & _XD:
        why.append("XD (bit 63) set while EFER.NXE=0")
    if bits & _PS:
        why.append(f"PS (bit 7) set in a {level.name}")
    low = bits & ~(above | _XD | _PS)
    if low:
        why.append(f"bits {_bit_ranges(low)} set in a {page_size_name(level.page_size)} page")
    return "reserved bit set: " + "; ".join(why)


def page_size_name(size: int) -> str:
    """``4K``, ``2M``, ``1G``: the largest unit that divides ``size``."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and not size & ((1 << shift) - 1):
            return f"{size >> shift}{unit}"
    return f"{size}B"


def _access_code(access: Access | None, cpu: CpuPagingState) -> PfErrorCode:
    """The W/R, U/S and I/D bits, which describe the access, not the page (SDM vol. 3A 4.7)."""
    code = PfErrorCode(0)
    if access is None:
        return code
    if access.write:
        code |= PfErrorCode.WR
    if access.user:
        code |= PfErrorCode.US
    if access.fetch and (cpu.nxe or cpu.smep):
        code |= PfErrorCode.ID
    return code


def _first(steps: Sequence[WalkStep], flag: PteFlag, value: bool) -> WalkStep:
    """The highest-level step whose ``flag`` is ``value`` (the one that decided a right)."""
    return next((s for s in steps if bool(s.raw & flag) == value), steps[-1])


def _paging_violation(
    steps: Sequence[WalkStep], access: Access, cpu: CpuPagingState, rw: bool, us: bool, xd: bool
) -> tuple[str, WalkStep] | None:
    """First access-rights violation by the R/W, U/S, XD bits and CR0/CR4 (SDM vol. 3A 4.6.1)."""
    nx = xd and cpu.nxe
    leaf = steps[-1]
    if access.fetch:
        if access.user and not us:
            return "user fetch from supervisor page", _first(steps, PteFlag.US, False)
        if not access.user and us and cpu.smep:
            return "SMEP: supervisor fetch from user page", leaf
        if nx:
            return "fetch from execute-disable page", _first(steps, PteFlag.XD, True)
        return None
    verb = "write to" if access.write else "read from"
    if access.user:
        if not us:
            return f"user {verb} supervisor page", _first(steps, PteFlag.US, False)
        if access.write and not rw:
            return "user write to read-only page", _first(steps, PteFlag.RW, False)
        return None
    if us and cpu.smap and (access.implicit or not cpu.ac):
        why = "implicit access" if access.implicit else "RFLAGS.AC=0"
        return f"SMAP: supervisor {verb} user page ({why})", leaf
    if access.write and not rw and cpu.wp:
        return "write to read-only page (CR0.WP=1)", _first(steps, PteFlag.RW, False)
    return None


def _pkey_violation(access: Access, cpu: CpuPagingState, us: bool, pkey: int | None) -> str:
    """Why PKRU/PKRS forbid this data access (SDM vol. 3A 4.6.2 and 4.7 PK flag), or ``""``."""
    if access.fetch or pkey is None:
        return ""
    register, name = (cpu.pkru, "PKRU") if us else (cpu.pkrs, "PKRS")
    rights = PkeyRights(register >> (PKEY_FIELD_BITS * pkey) & (PkeyRights.AD | PkeyRights.WD))
    if rights & PkeyRights.AD:
        return f"{name} AD{pkey}=1 disables access to key {pkey}"
    if access.write and rights & PkeyRights.WD and (access.user or cpu.wp):
        return f"{name} WD{pkey}=1 disables writes to key {pkey}"
    return ""


def translate(
    mem: PhysicalMemory, va: int, cpu: CpuPagingState, access: Access | None = None
) -> WalkResult:
    """Walk the tables CR3 points to for ``va`` and decide ``access``.

    With ``access=None`` only faults that every access takes are reported (not
    present, reserved bit, non-canonical), with W/R, U/S and I/D clear.

    :param mem: physical memory holding the tables; only read.
    :param va: a 64-bit linear address.
    :param cpu: CR0/CR3/CR4/EFER/RFLAGS/PKRU/PKRS and MAXPHYADDR.
    :param access: the access to check, or None.
    :return: the walk; never raises for bad table contents or missing memory.
    :raises PageTableError: ``va`` is not a 64-bit integer, or ``cpu`` is not in
        IA-32e paging mode.
    """
    va = _check_u64("va", va)
    if not cpu.paging:
        raise PageTableError(
            "CPU is not using 4-level or 5-level paging (needs CR0.PG, CR4.PAE, EFER.LME)"
        )
    mode = cpu.mode
    if not mode.is_canonical(va):
        top = mode.va_bits - 1
        fault = PageFault(
            FaultKind.NON_CANONICAL,
            Vector.GP,
            PfErrorCode(0),
            va,
            None,
            f"non-canonical address ({mode.name} paging: bits 63:{top} must all equal bit {top})",
        )
        return WalkResult(va, (), WalkStatus.FAULT, fault=fault, access=access)

    phys_mask = cpu.phys_mask
    maxphyaddr, nxe = cpu.maxphyaddr, cpu.nxe
    levels = mode.levels
    last = levels[-1]
    steps: list[WalkStep] = []
    table = cpu.root
    rw = us = True
    xd = False
    fault = None
    for level in levels:
        index = (va >> level.shift) & INDEX_MASK
        try:
            raw = mem.read_u64(table + index * ENTRY_SIZE)
        except UnbackedMemoryError:
            return WalkResult(
                va, tuple(steps), WalkStatus.NOT_CAPTURED, missing_frame=table, access=access
            )
        present = bool(raw & _P)
        leaf = present and (level is last or (level.large_pages and bool(raw & _PS)))
        step = WalkStep(level, table, index, raw, leaf)
        steps.append(step)
        if not present:
            code = _access_code(access, cpu)
            fault = PageFault(FaultKind.NOT_PRESENT, Vector.PF, code, va, step, "not present")
            break
        bad = raw & reserved_mask(
            level, last=level is last, ps=bool(raw & _PS), maxphyaddr=maxphyaddr, nxe=nxe
        )
        if bad:
            code = _access_code(access, cpu) | PfErrorCode.P | PfErrorCode.RSVD
            why = _describe_reserved(bad, level, cpu)
            fault = PageFault(FaultKind.RESERVED, Vector.PF, code, va, step, why)
            break
        rw = rw and bool(raw & _RW)
        us = us and bool(raw & _US)
        xd = xd or bool(raw & _XD)
        if leaf:
            break
        table = raw & phys_mask
    if fault is not None:
        return WalkResult(va, tuple(steps), WalkStatus.FAULT, fault=fault, access=access)

    page_size = level.page_size
    phys = (raw & phys_mask & ~(page_size - 1)) | (va & (page_size - 1))
    pkey = entry_pkey(raw) if (cpu.pke if us else cpu.pks) else None
    if access is not None:
        paging = _paging_violation(steps, access, cpu, rw, us, xd)
        pk_why = _pkey_violation(access, cpu, us, pkey)
        if paging or pk_why:
            code = _access_code(access, cpu) | PfErrorCode.P
            if pk_why:
                code |= PfErrorCode.PK
            kind = FaultKind.PROTECTION if paging else FaultKind.PKEY
            reason, culprit = paging if paging else (pk_why, steps[-1])
            fault = PageFault(kind, Vector.PF, code, va, culprit, reason)
    return WalkResult(
        va,
        tuple(steps),
        WalkStatus.FAULT if fault else WalkStatus.OK,
        phys=phys,
        page_size=page_size,
        writable=rw,
        user=us,
        executable=not (xd and cpu.nxe),
        pkey=pkey,
        fault=fault,
        access=access,
    )
