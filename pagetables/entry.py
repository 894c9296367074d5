"""Paging-structure entry bits and paging modes, defined once (SDM vol. 3A 4.5).

A paging mode is data: the list of levels, each with its name, the address bits
it indexes and whether it may map a page (PS=1). The walker, builder and dumper
all read these tables instead of hard-coding bit positions. The other layouts a
walk needs live here too: CR3's flags and PCID, a PKRU/PKRS key field, and the
page-fault error code (SDM vol. 3A 4.5.2, 4.6.2, 4.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from kctx_debug.arch.address import canonicalize, is_canonical

__all__ = [
    "ADDRESS_MASK",
    "CR3_PCID_MASK",
    "ENTRY_SIZE",
    "FIVE_LEVEL",
    "FOUR_LEVEL",
    "INDEX_MASK",
    "PAT_LARGE",
    "PKEY_FIELD_BITS",
    "PKEY_MASK",
    "PKEY_SHIFT",
    "Cr3",
    "Level",
    "PagingMode",
    "PfErrorCode",
    "PkeyRights",
    "PteFlag",
    "describe_entry",
    "entry_address",
    "entry_pkey",
    "paging_mode",
    "reserved_mask",
]


class PteFlag(IntFlag):
    """Bits common to 4-level/5-level paging entries (SDM vol. 3A Tables 4-15 to 4-20)."""

    P = 1 << 0  # present
    RW = 1 << 1  # writable
    US = 1 << 2  # user-mode accessible
    PWT = 1 << 3  # page-level write-through
    PCD = 1 << 4  # page-level cache disable
    A = 1 << 5  # accessed
    D = 1 << 6  # dirty (leaf entries only)
    PS = 1 << 7  # page size in PDPTE/PDE; PAT in a 4 KiB PTE
    G = 1 << 8  # global (leaf entries only)
    AVL9 = 1 << 9  # bits 11:9 are ignored by hardware: software-available
    AVL10 = 1 << 10
    AVL11 = 1 << 11
    AVL52 = 1 << 52  # bits 58:52 are ignored: software-available
    AVL53 = 1 << 53
    AVL54 = 1 << 54
    AVL55 = 1 << 55
    AVL56 = 1 << 56
    AVL57 = 1 << 57
    AVL58 = 1 << 58
    XD = 1 << 63  # execute-disable (reserved unless EFER.NXE)


# Bit 7 of a 4 KiB PTE is PAT; in a 2 MiB/1 GiB leaf PAT moves to bit 12
# (SDM vol. 3A Tables 4-17 and 4-19).
PAT_4K = PteFlag.PS
PAT_LARGE = 1 << 12
# Protection key, bits 62:59 of a leaf entry when CR4.PKE/PKS (SDM vol. 3A 4.6.2).
PKEY_SHIFT = 59
PKEY_MASK = 0xF << PKEY_SHIFT
# Frame address bits 51:12 (bounded further by MAXPHYADDR).
ADDRESS_MASK = ((1 << 52) - 1) & ~0xFFF
# Plain ints: IntFlag arithmetic is slow on the walker's per-level path.
_PS, _XD = int(PteFlag.PS), int(PteFlag.XD)


@dataclass(frozen=True)
class Level:
    """One level of the walk: its name, the lowest VA bit it indexes, and whether PS may map."""

    name: str  # SDM name: PML5E, PML4E, PDPTE, PDE, PTE
    linux_name: str  # ptdump's name: pgd, p4d, pud, pmd, pte
    shift: int
    large_pages: bool

    @property
    def page_size(self) -> int:
        """Bytes one entry at this level covers."""
        return 1 << self.shift


@dataclass(frozen=True)
class PagingMode:
    """A paging mode described as data (SDM vol. 3A 4.5)."""

    name: str
    levels: tuple[Level, ...]

    @property
    def va_bits(self) -> int:
        return self.levels[0].shift + 9

    def is_canonical(self, va: int) -> bool:
        """Bits 63:va_bits-1 all equal: :func:`~kctx_debug.arch.address.is_canonical`."""
        return is_canonical(va, self.va_bits)

    def canonical(self, va: int) -> int:
        """Sign-extend a ``va_bits``-bit address to 64 bits: :func:`canonicalize`."""
        return canonicalize(va, self.va_bits)

    def index(self, va: int, depth: int) -> int:
        return (va >> self.levels[depth].shift) & 0x1FF


_PTE = Level("PTE", "pte", 12, False)
_PDE = Level("PDE", "pmd", 21, True)
_PDPTE = Level("PDPTE", "pud", 30, True)
_PML4E = Level("PML4E", "p4d", 39, False)
_PML5E = Level("PML5E", "pgd", 48, False)

# With 4 levels Linux folds p4d into pgd, so its ptdump names the top level "pgd".
FOUR_LEVEL = PagingMode("4-level", (Level("PML4E", "pgd", 39, False), _PDPTE, _PDE, _PTE))
FIVE_LEVEL = PagingMode("5-level", (_PML5E, _PML4E, _PDPTE, _PDE, _PTE))


def paging_mode(la57: bool) -> PagingMode:
    """The IA-32e paging mode selected by CR4.LA57."""
    return FIVE_LEVEL if la57 else FOUR_LEVEL


def entry_address(entry: int, level: Level, leaf: bool, maxphyaddr: int = 52) -> int:
    """Physical address an entry points to: a table, or the base of the page it maps."""
    mask = ADDRESS_MASK & ((1 << maxphyaddr) - 1)
    if leaf:
        mask &= ~(level.page_size - 1)
    return entry & mask


def reserved_mask(level: Level, *, last: bool, ps: bool, maxphyaddr: int, nxe: bool) -> int:
    """Bits that must be 0 in a present entry at ``level`` (SDM vol. 3A 4.5.4, Tables 4-15..4-20).

    Everywhere: address bits 51:MAXPHYADDR, and XD (bit 63) unless EFER.NXE. With
    PS=1 (``ps``, the entry's bit 7): a 1 GiB/2 MiB page's address bits below its
    alignment except PAT (bit 12); PS itself in a PML5E/PML4E. In a PTE (``last``)
    bit 7 is PAT, so it adds nothing.
    """
    mask = ADDRESS_MASK & ~((1 << maxphyaddr) - 1)
    if not nxe:
        mask |= _XD
    if ps:
        if level.large_pages:
            mask |= (level.page_size - 1) & ADDRESS_MASK & ~PAT_LARGE
        elif not last:
            mask |= _PS
    return mask


def entry_pkey(entry: int) -> int:
    return (entry & PKEY_MASK) >> PKEY_SHIFT


def describe_entry(entry: int, leaf: bool = True, large: bool = False) -> str:
    """Set bits by SDM name, e.g. ``P|RW|US|A|XD``; PAT is named where it applies."""
    names = []
    for flag in PteFlag:
        if not entry & flag:
            continue
        if flag is PteFlag.PS and leaf and not large:
            names.append("PAT")
        elif flag in (PteFlag.D, PteFlag.G) and not leaf:
            continue  # ignored in non-leaf entries
        else:
            names.append(flag.name)
    if leaf and large and entry & PAT_LARGE:
        names.append("PAT")
    if entry & PKEY_MASK:
        names.append(f"PKEY={entry_pkey(entry)}")
    return "|".join(names) if names else "-"


# Each paging-structure entry is 8 bytes; a table has 512 of them (SDM vol. 3A 4.5).
ENTRY_SIZE = 8
INDEX_MASK = 0x1FF


class Cr3(IntFlag):
    """CR3 flags without CR4.PCIDE (SDM vol. 3A 4.5.2, Table 4-12)."""

    PWT = 1 << 3
    PCD = 1 << 4


# With CR4.PCIDE bits 11:0 of CR3 are the PCID (SDM vol. 3A Table 4-13).
CR3_PCID_MASK = 0xFFF


class PkeyRights(IntFlag):
    """One key's 2-bit field in PKRU/IA32_PKRS, at bit 2*key (SDM vol. 3A 4.6.2)."""

    AD = 1 << 0  # access disable: no data reads or writes
    WD = 1 << 1  # write disable


PKEY_FIELD_BITS = 2


class PfErrorCode(IntFlag):
    """Page-fault error code (SDM vol. 3A 4.7, Figure 4-12); names drop the SDM's slash."""

    P = 1 << 0  # 0: not present; 1: protection or reserved-bit violation
    WR = 1 << 1  # W/R: the access was a write
    US = 1 << 2  # U/S: the access was a user-mode access
    RSVD = 1 << 3  # a reserved bit was set in a paging-structure entry
    ID = 1 << 4  # I/D: instruction fetch (only with EFER.NXE or CR4.SMEP)
    PK = 1 << 5  # protection-key violation
    SS = 1 << 6  # shadow-stack access (never produced here)
    HLAT = 1 << 7  # HLAT paging (never produced here)
    SGX = 1 << 15  # SGX access-control violation (never produced here)
