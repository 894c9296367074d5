"""Page walks and page-fault decisions worked out by hand from SDM vol. 3A 4.5-4.7.

Every table here is written entry by entry with ``PhysicalMemory.write_u64``;
every index, physical address and error code below was computed by hand from the
SDM's address split (Figures 4-8 to 4-11), access rules (4.6) and error-code
layout (4.7, Figure 4-12): P=0x1, W/R=0x2, U/S=0x4, RSVD=0x8, I/D=0x10, PK=0x20.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from kctx_debug.errors import PageTableError
from kctx_debug.pagetables.entry import FIVE_LEVEL, FOUR_LEVEL, Cr3, PfErrorCode, reserved_mask
from kctx_debug.pagetables.render import describe_error_code, render_walk, walk_to_json
from kctx_debug.pagetables.walk import (
    Access,
    AccessKind,
    CpuPagingState,
    FaultKind,
    WalkStatus,
    translate,
)
from kctx_debug.physmem import PhysicalMemory

# Entry bits, SDM vol. 3A Table 4-19/4-20, written as numbers on purpose.
P, RW, US, PWT, PCD, A, D, PS, G = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100
XD = 0x8000_0000_0000_0000
BIT12, BIT13, BIT20, BIT29 = 0x1000, 0x2000, 0x10_0000, 0x2000_0000
BIT40, BIT45 = 0x100_0000_0000, 0x2000_0000_0000


def pkey_bits(key: int) -> int:
    return key * 0x0800_0000_0000_0000  # bits 62:59


# Control-register values (SDM vol. 3A Figures 2-7, 2-8; Table 2-1).
CR0_PG_PE = 0x8000_0011  # PG | ET | PE
CR0_WP = 0x1_0000
CR4_PAE, CR4_LA57, CR4_PCIDE = 0x20, 0x1000, 0x2_0000
CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_PKS = 0x10_0000, 0x20_0000, 0x40_0000, 0x100_0000
EFER_LME_LMA, EFER_NXE = 0x500, 0x800
RFLAGS_AC = 0x4_0000

PML4 = 0x1000
MEM_SIZE = 16 << 20


def new_mem() -> PhysicalMemory:
    mem = PhysicalMemory()
    mem.add_zero(0, MEM_SIZE)
    return mem


def put(mem: PhysicalMemory, table: int, index: int, value: int) -> None:
    mem.write_u64(table + 8 * index, value)


def make_cpu(
    *,
    wp=True,
    nxe=True,
    smep=False,
    smap=False,
    pke=False,
    pks=False,
    la57=False,
    ac=False,
    cr3=PML4,
    cr4_extra=0,
    **kw,
) -> CpuPagingState:
    cr4 = CR4_PAE | cr4_extra
    cr4 |= (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0) | (CR4_LA57 if la57 else 0)
    cr4 |= (CR4_PKE if pke else 0) | (CR4_PKS if pks else 0)
    return CpuPagingState.from_registers(
        cr0=CR0_PG_PE | (CR0_WP if wp else 0),
        cr3=cr3,
        cr4=cr4,
        efer=EFER_LME_LMA | (EFER_NXE if nxe else 0),
        rflags=0x2 | (RFLAGS_AC if ac else 0),
        **kw,
    )


# --- hand-worked walks ---------------------------------------------------------------

# 0xffffffff81000000: bits 47:39 = 511, 38:30 = 510, 29:21 = 8, 20:0 = 0.
KTEXT = 0xFFFF_FFFF_8100_0000
# 0xffffffff81201abc: 511, 510, 9, bits 20:12 = 1, offset 0xabc.
KDATA = 0xFFFF_FFFF_8120_1ABC
# 0xffff888012345678: bits 47:39 = 0x111 = 273, 38:30 = 0, offset 0x12345678.
DIRECT = 0xFFFF_8880_1234_5678


@pytest.fixture
def kernel_mem() -> PhysicalMemory:
    mem = new_mem()
    put(mem, PML4, 511, 0x2000 | P | RW | A)
    put(mem, 0x2000, 510, 0x3000 | P | RW | A)
    put(mem, 0x3000, 8, 0x0100_0000 | P | A | D | PS | G)  # 2 MiB text, read-only
    put(mem, 0x3000, 9, 0x4000 | P | RW | A)
    put(mem, 0x4000, 1, 0x0050_0000 | P | RW | A | D | G | XD)  # 4 KiB data
    put(mem, PML4, 273, 0x5000 | P | RW)
    put(mem, 0x5000, 0, 0x0 | P | RW | PS | XD)  # 1 GiB direct map at phys 0
    return mem


def test_two_mib_kernel_text(kernel_mem):
    r = translate(kernel_mem, KTEXT + 0x1234, make_cpu())
    assert r.status is WalkStatus.OK and r.ok and r.fault is None
    assert r.phys == 0x0100_1234 and r.page_size == 0x20_0000
    assert [(s.level.name, s.table_phys, s.index, s.entry_phys) for s in r.steps] == [
        ("PML4E", 0x1000, 511, 0x1FF8),
        ("PDPTE", 0x2000, 510, 0x2FF0),
        ("PDE", 0x3000, 8, 0x3040),
    ]
    assert [s.raw for s in r.steps] == [0x2023, 0x3023, 0x0100_01E1]
    assert [s.flags for s in r.steps] == ["P|RW|A", "P|RW|A", "P|A|D|PS|G"]
    assert [s.leaf for s in r.steps] == [False, False, True]
    assert (r.writable, r.user, r.executable, r.pkey) == (False, False, True, None)


def test_four_kib_kernel_data(kernel_mem):
    r = translate(kernel_mem, KDATA, make_cpu())
    assert r.phys == 0x0050_0ABC and r.page_size == 0x1000
    assert [(s.level.name, s.index, s.entry_phys) for s in r.steps] == [
        ("PML4E", 511, 0x1FF8),
        ("PDPTE", 510, 0x2FF0),
        ("PDE", 9, 0x3048),
        ("PTE", 1, 0x4008),
    ]
    assert r.steps[-1].raw == 0x8000_0000_0050_0163
    assert r.steps[-1].flags == "P|RW|A|D|G|XD"
    assert (r.writable, r.user, r.executable) == (True, False, False)


def test_one_gib_direct_map(kernel_mem):
    r = translate(kernel_mem, DIRECT, make_cpu())
    assert [(s.level.name, s.index) for s in r.steps] == [("PML4E", 273), ("PDPTE", 0)]
    assert r.phys == 0x1234_5678 and r.page_size == 0x4000_0000
    assert r.steps[-1].large and r.steps[-1].flags == "P|RW|PS|XD"


def test_nxe_off_everything_executable():
    mem = new_mem()
    put(mem, PML4, 0, 0x2000 | P)
    put(mem, 0x2000, 0, 0x4000_0000 | P | PS)
    r = translate(mem, 0x123, make_cpu(nxe=False), Access(AccessKind.FETCH))
    assert r.executable and r.fault is None and r.phys == 0x4000_0123


# 5-level: PML5 416 (bit 56 set, so bits 63:57 are ones), PML4 3, PDPT 5, PD 7, PT 9,
# offset 0x123: 0xfe00.. | 416<<48 | 3<<39 | 5<<30 | 7<<21 | 9<<12 | 0x123.
VA57 = 0xFFA0_0181_40E0_9123


def five_level_mem() -> PhysicalMemory:
    mem = new_mem()
    put(mem, PML4, 416, 0x2000 | P | RW)  # CR3 points at the PML5 table
    put(mem, 0x2000, 3, 0x3000 | P | RW)
    put(mem, 0x3000, 5, 0x4000 | P | RW)
    put(mem, 0x4000, 7, 0x5000 | P | RW)
    put(mem, 0x5000, 9, 0x0077_7000 | P | RW)
    return mem


def test_five_level_walk():
    r = translate(five_level_mem(), VA57, make_cpu(la57=True))
    assert [(s.level.name, s.table_phys, s.index) for s in r.steps] == [
        ("PML5E", 0x1000, 416),
        ("PML4E", 0x2000, 3),
        ("PDPTE", 0x3000, 5),
        ("PDE", 0x4000, 7),
        ("PTE", 0x5000, 9),
    ]
    assert r.phys == 0x0077_7123 and r.page_size == 0x1000


def test_five_level_ps_in_pml5e_is_reserved():
    mem = five_level_mem()
    put(mem, PML4, 416, 0x2000 | P | RW | PS)
    r = translate(mem, VA57, make_cpu(la57=True), Access())
    assert r.fault.kind is FaultKind.RESERVED and r.fault.level.name == "PML5E"
    assert r.fault.error_code == 0x9


def test_five_level_address_is_non_canonical_in_four_level():
    # 0x0000800000000000: bit 47 set, bits 63:48 clear.
    mem = new_mem()
    put(mem, PML4, 0, 0x2000 | P | RW)
    put(mem, 0x2000, 256, 0x3000 | P | RW)  # PML4 index 256 = bit 47
    put(mem, 0x3000, 0, 0x4000_0000 | P | RW | PS)
    four = translate(mem, 0x0000_8000_0000_0000, make_cpu())
    assert four.fault.kind is FaultKind.NON_CANONICAL
    five = translate(mem, 0x0000_8000_0000_0000, make_cpu(la57=True))
    assert five.phys == 0x4000_0000 and [s.index for s in five.steps] == [0, 256, 0]


@pytest.mark.parametrize(
    ("va", "la57"),
    [
        pytest.param(0x0000_8000_0000_0000, False, id="4level-bit47-only"),
        pytest.param(0xFFFF_7FFF_FFFF_FFFF, False, id="4level-high-without-bit47"),
        pytest.param(0x0100_0000_0000_0000, True, id="5level-bit56-only"),
        pytest.param(0xFE00_0000_0000_0000, True, id="5level-high-without-bit56"),
    ],
)
def test_non_canonical_is_gp_zero(va, la57):
    r = translate(new_mem(), va, make_cpu(la57=la57), Access.parse("write,user"))
    assert r.status is WalkStatus.FAULT and not r.ok and r.steps == ()
    assert r.fault.kind is FaultKind.NON_CANONICAL
    assert r.fault.vector == 13 and r.fault.error_code == 0 and r.fault.step is None


@pytest.mark.parametrize(
    ("cr3", "cr4_extra", "pcid"),
    [
        pytest.param(PML4 | 0x5, CR4_PCIDE, 5, id="pcid-5"),
        pytest.param(PML4 | 0xFFF, CR4_PCIDE, 0xFFF, id="pcid-fff"),
        pytest.param(PML4 | PWT | PCD, 0, None, id="pwt-pcd"),
        pytest.param(PML4 | XD, CR4_PCIDE, 0, id="bit63-no-flush"),
    ],
)
def test_cr3_low_and_high_bits_ignored(kernel_mem, cr3, cr4_extra, pcid):
    cpu = make_cpu(cr3=cr3, cr4_extra=cr4_extra)
    assert cpu.root == PML4 and cpu.pcid == pcid
    assert cpu.cr3_flags == (Cr3.PWT | Cr3.PCD if cr3 & (PWT | PCD) and pcid is None else 0)
    r = translate(kernel_mem, KTEXT, cpu)
    assert r.phys == 0x0100_0000 and r.steps[0].table_phys == PML4


def test_cr3_bits_above_maxphyaddr_ignored(kernel_mem):
    cpu = make_cpu(cr3=PML4 | BIT45, maxphyaddr=40)
    assert cpu.root == PML4
    assert translate(kernel_mem, KTEXT, cpu).phys == 0x0100_0000


def test_table_not_captured_is_not_a_fault(kernel_mem):
    put(kernel_mem, 0x2000, 510, 0x0200_0000 | P | RW)  # PD at 32 MiB: beyond memory
    r = translate(kernel_mem, KTEXT, make_cpu(), Access())
    assert r.status is WalkStatus.NOT_CAPTURED and not r.ok and r.fault is None
    assert r.missing_frame == 0x0200_0000
    assert [s.level.name for s in r.steps] == ["PML4E", "PDPTE"]


def test_root_not_captured(kernel_mem):
    r = translate(kernel_mem, KTEXT, make_cpu(cr3=0x4000_0000))
    assert r.status is WalkStatus.NOT_CAPTURED and r.missing_frame == 0x4000_0000
    assert r.steps == ()


def test_walk_never_writes_accessed_or_dirty(kernel_mem):
    before = kernel_mem.read(0, 0x6000)
    translate(kernel_mem, KDATA, make_cpu(), Access.parse("write"))
    assert kernel_mem.read(0, 0x6000) == before


def test_garbage_tables_never_raise():
    mem = PhysicalMemory()
    rng = np.random.default_rng(1234)
    # Random bytes with P mostly set; frames point all over 2**52 and mostly miss.
    data = rng.integers(0, 2**64, size=4 * 512, dtype=np.uint64) | np.uint64(1)
    data[::3] &= np.uint64(0x3FFF)  # some entries land back inside memory
    mem.add_bytes(0, data.tobytes())
    for la57 in (False, True):
        cpu = make_cpu(cr3=0x1000, la57=la57, maxphyaddr=46, nxe=la57, smap=True, pke=True)
        for va in rng.integers(0, 2**64, size=2000, dtype=np.uint64).tolist():
            for access in ("read", "write,user", "fetch", "read,implicit"):
                r = translate(mem, va, cpu, Access.parse(access))
                assert r.ok == (r.phys is not None)
                assert r.status is not WalkStatus.OK or r.fault is None


# --- the fault matrix ----------------------------------------------------------------

# A user address, split by hand: 0x7f8012345678 -> PML4 255, PDPT 0, PD 145 (0x91),
# PT 325 (0x145), offset 0x678.
VA_U = 0x0000_7F80_1234_5678
PDPT, PD, PT = 0x2000, 0x3000, 0x4000
PAGE_4K, PAGE_2M, PAGE_1G = 0x00AB_C000, 0x00A0_0000, 0x4000_0000
TABLE = P | RW | US
LEAF = P | RW | US | A | D


@dataclass(frozen=True)
class Case:
    access: str
    code: int | None  # expected #PF error code; None: no fault
    kind: FaultKind | None = None
    level: str | None = None  # the entry that decided the fault
    pml4e: int = TABLE
    pdpte: int = TABLE
    pde: int = TABLE
    pte: int = LEAF
    cpu: dict = field(default_factory=dict)
    phys: int = PAGE_4K | 0x678


def build_user_path(case: Case) -> PhysicalMemory:
    mem = new_mem()
    put(mem, PML4, 255, PDPT | case.pml4e)
    put(mem, PDPT, 0, (PAGE_1G if case.pdpte & PS else PD) | case.pdpte)
    put(mem, PD, 0x91, (PAGE_2M if case.pde & PS else PT) | case.pde)
    put(mem, PT, 0x145, PAGE_4K | case.pte)
    return mem


NP, PROT, RSVD, PKEY = (
    FaultKind.NOT_PRESENT,
    FaultKind.PROTECTION,
    FaultKind.RESERVED,
    FaultKind.PKEY,
)
NO_SMEP_NXE = {"nxe": False, "smep": False}
SMEP_NXE0 = {"nxe": False, "smep": True}
NXE0, WP0, M40 = {"nxe": False}, {"wp": False}, {"maxphyaddr": 40}
SMAP_AC = {"smap": True, "ac": True}
# PKRU/PKRS: AD of key i is bit 2i, WD is bit 2i+1. Key 3: AD 0x40, WD 0x80.
PKE_AD3, PKE_WD3 = {"pke": True, "pkru": 0x40}, {"pke": True, "pkru": 0x80}
PKS_AD3, PKS_WD3 = {"pks": True, "pkrs": 0x40}, {"pks": True, "pkrs": 0x80}
K3 = LEAF | pkey_bits(3)  # a user leaf with protection key 3

MATRIX = {
    # -- no fault ---------------------------------------------------------------------
    "user-read-ok": Case("read,user", None),
    "user-write-ok": Case("write,user", None),
    "sup-read-user-page-no-smap": Case("read", None),
    "pte-bit7-is-pat-not-reserved": Case("read", None, pte=LEAF | PS),
    "2m-page-pat-bit12-ok": Case("read", None, pde=TABLE | PS | BIT12, phys=0x00B4_5678),
    "1g-page-ok": Case("read", None, pdpte=TABLE | PS, phys=0x5234_5678),
    "maxphyaddr-52-bit45-ok": Case("read", None, pte=LEAF | BIT45, phys=BIT45 | 0xABC678),
    # -- P=0: not present; W/R, U/S, I/D describe the access ----------------------------
    "np-pte-sup-read": Case("read", 0x0, NP, "PTE", pte=LEAF & ~P),
    "np-pml4e-user-write": Case("write,user", 0x6, NP, "PML4E", pml4e=TABLE & ~P),
    "np-pdpte-user-read": Case("read,user", 0x4, NP, "PDPTE", pdpte=0),
    "np-pde-sup-fetch-nxe": Case("fetch", 0x10, NP, "PDE", pde=RW | US),
    "np-pde-fetch-no-nxe-no-smep": Case("fetch", 0x0, NP, "PDE", pde=0, cpu=NO_SMEP_NXE),
    "np-pde-fetch-smep-only": Case("fetch", 0x10, NP, "PDE", pde=0, cpu=SMEP_NXE0),
    "np-user-fetch-nxe": Case("fetch,user", 0x14, NP, "PTE", pte=0),
    "np-ignores-reserved-bits": Case("read", 0x0, NP, "PTE", pte=BIT45 | XD | PS, cpu=M40 | NXE0),
    # -- W/R and U/S rights (SDM 4.6.1) ----------------------------------------------
    "user-write-ro-pte": Case("write,user", 0x7, PROT, "PTE", pte=LEAF & ~RW),
    "user-write-ro-pdpte": Case("write,user", 0x7, PROT, "PDPTE", pdpte=TABLE & ~RW),
    "user-write-ro-wp0-still-faults": Case("write,user", 0x7, PROT, "PTE", pte=LEAF & ~RW, cpu=WP0),
    "user-read-supervisor-pde": Case("read,user", 0x5, PROT, "PDE", pde=TABLE & ~US),
    "user-write-supervisor-pml4e": Case("write,user", 0x7, PROT, "PML4E", pml4e=TABLE & ~US),
    "user-fetch-supervisor-pte": Case("fetch,user", 0x15, PROT, "PTE", pte=LEAF & ~US),
    "sup-write-ro-wp1": Case("write", 0x3, PROT, "PDE", pde=TABLE & ~RW),
    "sup-write-ro-wp0-user-page": Case("write", None, pde=TABLE & ~RW, cpu=WP0),
    "sup-write-ro-wp0-sup-page": Case("write", None, pte=P | A, cpu=WP0),
    "sup-write-ro-sup-page-wp1": Case("write", 0x3, PROT, "PTE", pte=P | US, pml4e=P | RW),
    # -- XD and SMEP: I/D set on fetches when NXE or SMEP -------------------------------
    "user-fetch-xd-pte": Case("fetch,user", 0x15, PROT, "PTE", pte=LEAF | XD),
    "sup-fetch-xd-pml4e": Case("fetch", 0x11, PROT, "PML4E", pml4e=TABLE | XD, cpu={"smep": False}),
    "sup-fetch-no-xd-ok": Case("fetch", None),
    "smep-sup-fetch-user-page": Case("fetch", 0x11, PROT, "PTE", cpu={"smep": True}),
    "smep-sup-fetch-user-page-nxe0": Case("fetch", 0x11, PROT, "PTE", cpu=SMEP_NXE0),
    "smep-sup-fetch-sup-page-ok": Case("fetch", None, pte=P | A, cpu={"smep": True}),
    "smep-user-fetch-user-page-ok": Case("fetch,user", None, cpu={"smep": True}),
    # -- SMAP (SDM 4.6.1: explicit supervisor accesses with AC=0, and implicit ones) ----
    "smap-ac0-sup-read": Case("read", 0x1, PROT, "PTE", cpu={"smap": True}),
    "smap-ac0-sup-write": Case("write", 0x3, PROT, "PTE", cpu={"smap": True}),
    "smap-ac1-sup-read-ok": Case("read", None, cpu=SMAP_AC),
    "smap-ac1-sup-write-ok": Case("write", None, cpu=SMAP_AC),
    "smap-ac1-implicit-read": Case("read,implicit", 0x1, PROT, "PTE", cpu=SMAP_AC),
    "smap-ac1-implicit-write": Case("write,implicit", 0x3, PROT, "PTE", cpu=SMAP_AC),
    "smap-sup-page-ok": Case("read,implicit", None, pde=P | RW, cpu={"smap": True}),
    "smap-user-access-unaffected": Case("read,user", None, cpu={"smap": True}),
    "smap-ac1-ro-user-page-wp1": Case("write", 0x3, PROT, "PTE", pte=LEAF & ~RW, cpu=SMAP_AC),
    # -- RSVD: P=1 and RSVD=1, plus the access bits ----------------------------------
    "rsvd-above-maxphyaddr-pte": Case("read", 0x9, RSVD, "PTE", pte=LEAF | BIT45, cpu=M40),
    "rsvd-bit40-pml4e-uw": Case("write,user", 0xF, RSVD, "PML4E", pml4e=TABLE | BIT40, cpu=M40),
    "rsvd-xd-with-nxe0": Case("read", 0x9, RSVD, "PDE", pde=TABLE | XD, cpu=NXE0),
    "rsvd-xd-with-nxe0-fetch": Case("fetch", 0x9, RSVD, "PTE", pte=LEAF | XD, cpu=NO_SMEP_NXE),
    "rsvd-xd-nxe0-fetch-smep": Case("fetch,user", 0x1D, RSVD, "PTE", pte=LEAF | XD, cpu=SMEP_NXE0),
    "rsvd-ps-in-pml4e": Case("read", 0x9, RSVD, "PML4E", pml4e=TABLE | PS),
    "rsvd-2m-bit13": Case("write", 0xB, RSVD, "PDE", pde=TABLE | PS | BIT13),
    "rsvd-2m-bit20": Case("read", 0x9, RSVD, "PDE", pde=TABLE | PS | BIT20),
    "rsvd-1g-bit13": Case("read", 0x9, RSVD, "PDPTE", pdpte=TABLE | PS | BIT13),
    "rsvd-1g-bit29": Case("read,user", 0xD, RSVD, "PDPTE", pdpte=TABLE | PS | BIT29),
    "rsvd-beats-protection": Case("write,user", 0xF, RSVD, "PTE", pte=LEAF & ~RW | BIT45, cpu=M40),
    # -- PK: PKRU for user pages (CR4.PKE), PKRS for supervisor pages (CR4.PKS) -------
    "pkru-ad-user-read": Case("read,user", 0x25, PKEY, "PTE", pte=K3, cpu=PKE_AD3),
    "pkru-wd-user-write": Case("write,user", 0x27, PKEY, "PTE", pte=K3, cpu=PKE_WD3),
    "pkru-wd-user-write-wp0": Case("write,user", 0x27, PKEY, "PTE", pte=K3, cpu=PKE_WD3 | WP0),
    "pkru-wd-user-read-ok": Case("read,user", None, pte=K3, cpu=PKE_WD3),
    "pkru-wd-sup-write-wp1": Case("write", 0x23, PKEY, "PTE", pte=K3, cpu=PKE_WD3),
    "pkru-wd-sup-write-wp0-ok": Case("write", None, pte=K3, cpu=PKE_WD3 | WP0),
    "pkru-ad-sup-read": Case("read", 0x21, PKEY, "PTE", pte=K3, cpu=PKE_AD3),
    "pkru-ad-fetch-ok": Case("fetch,user", None, pte=K3, cpu=PKE_AD3),
    "pkru-other-key-ok": Case("read,user", None, pte=K3, cpu={"pke": True, "pkru": 0x100}),
    "pkru-pke-off-ok": Case("read,user", None, pte=K3, cpu={"pkru": 0x40}),
    "pkru-sup-page-ignored": Case("read", None, pde=P | RW, pte=K3, cpu=PKE_AD3),
    "pkru-and-readonly": Case("write,user", 0x27, PROT, "PTE", pte=K3 & ~RW, cpu=PKE_WD3),
    "pkrs-ad-sup-read": Case("read", 0x21, PKEY, "PTE", pde=P | RW, pte=K3, cpu=PKS_AD3),
    "pkrs-wd-sup-write": Case("write", 0x23, PKEY, "PTE", pde=P | RW, pte=K3, cpu=PKS_WD3),
    "pkrs-user-page-ignored": Case("read", None, pte=K3, cpu=PKS_AD3),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MATRIX.values()), ids=list(MATRIX))
def test_fault_matrix(case: Case):
    mem = build_user_path(case)
    r = translate(mem, VA_U, make_cpu(**case.cpu), Access.parse(case.access))
    if case.code is None:
        assert r.status is WalkStatus.OK and r.fault is None
        assert r.phys == case.phys
        return
    assert r.status is WalkStatus.FAULT
    assert r.fault.vector == 14
    assert r.fault.error_code == case.code, describe_error_code(r.fault.error_code)
    assert r.fault.kind is case.kind
    assert r.fault.level.name == case.level
    assert r.fault.address == VA_U
    # A protection fault still has a translation; not-present and reserved do not.
    assert r.ok == (case.kind in (PROT, PKEY))


def test_matrix_exercises_every_error_code_bit():
    seen = 0
    for case in MATRIX.values():
        seen |= case.code or 0
    named = PfErrorCode.P | PfErrorCode.WR | PfErrorCode.US | PfErrorCode.RSVD
    assert seen == named | PfErrorCode.ID | PfErrorCode.PK == 0x3F


def test_access_none_reports_only_translation_faults():
    mem = build_user_path(Case("read", None, pte=P | US))
    r = translate(mem, VA_U, make_cpu(smap=True))
    assert r.status is WalkStatus.OK and r.fault is None and r.access is None
    mem = build_user_path(Case("read", None, pte=0))
    assert translate(mem, VA_U, make_cpu()).fault.error_code == 0


def test_effective_permissions_combine_levels():
    # R/W and U/S are ANDed over levels, XD is ORed (SDM 4.6.1).
    mem = build_user_path(Case("read", None, pdpte=P | US | XD, pte=LEAF))
    r = translate(mem, VA_U, make_cpu(pke=True))
    assert (r.writable, r.user, r.executable, r.pkey) == (False, True, False, 0)
    mem = build_user_path(Case("read", None, pml4e=P | RW, pte=LEAF | pkey_bits(9)))
    r = translate(mem, VA_U, make_cpu(pke=True, pks=True))
    assert (r.writable, r.user, r.executable, r.pkey) == (True, False, True, 9)


# --- inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "user", "implicit"),
    [
        ("", AccessKind.READ, False, False),
        ("write,user", AccessKind.WRITE, True, False),
        ("x", AccessKind.FETCH, False, False),
        ("fetch user", AccessKind.FETCH, True, False),
        ("READ, implicit", AccessKind.READ, False, True),
        ("w,supervisor", AccessKind.WRITE, False, False),
    ],
)
def test_access_parse(text, kind, user, implicit):
    assert Access.parse(text) == Access(kind, user, implicit)


@pytest.mark.parametrize("text", ["read,write", "user,implicit", "exec,banana"])
def test_access_parse_rejects(text):
    with pytest.raises(PageTableError):
        Access.parse(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"maxphyaddr": 53},
        {"maxphyaddr": 12},
        {"cr3": -1},
        {"cr3": 1 << 64},
        {"pkru": "0"},
        {"cr0": 1.5},
    ],
)
def test_cpu_state_rejects_bad_values(kwargs):
    regs = {"cr0": CR0_PG_PE, "cr3": PML4, "cr4": CR4_PAE, "efer": EFER_LME_LMA} | kwargs
    with pytest.raises(PageTableError):
        CpuPagingState.from_registers(**regs)


def test_cpu_state_properties():
    cpu = CpuPagingState.from_registers(
        cr0=CR0_PG_PE | CR0_WP,
        cr3=0x1234_5000 | 0x7,
        cr4=CR4_PAE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PKS | CR4_PCIDE,
        efer=EFER_LME_LMA | EFER_NXE,
        rflags=RFLAGS_AC,
        maxphyaddr=46,
    )
    assert cpu.paging and cpu.la57 and cpu.wp and cpu.smep and cpu.smap
    assert cpu.pke and cpu.pks and cpu.nxe and cpu.pcide and cpu.ac
    assert cpu.root == 0x1234_5000 and cpu.pcid == 7 and cpu.mode.name == "5-level"
    off = CpuPagingState.from_registers(cr0=0x11, cr3=0, cr4=0, efer=0)
    assert not (off.paging or off.wp or off.nxe or off.la57 or off.ac)


@pytest.mark.parametrize(
    ("cr0", "cr4", "efer"),
    [(0x11, CR4_PAE, EFER_LME_LMA), (CR0_PG_PE, 0, EFER_LME_LMA), (CR0_PG_PE, CR4_PAE, 0)],
    ids=["pg-off", "pae-off", "long-mode-off"],
)
def test_translate_requires_ia32e_paging(cr0, cr4, efer):
    cpu = CpuPagingState.from_registers(cr0=cr0, cr3=PML4, cr4=cr4, efer=efer)
    with pytest.raises(PageTableError):
        translate(new_mem(), 0, cpu)


@pytest.mark.parametrize("va", [-1, 1 << 64, "0x1000", None])
def test_translate_rejects_bad_address(va):
    with pytest.raises(PageTableError):
        translate(new_mem(), va, make_cpu())


# --- rendering ---------------------------------------------------------------------


def test_render_protection_fault(kernel_mem):
    r = translate(kernel_mem, KTEXT, make_cpu(), Access.parse("write"))
    assert render_walk(r) == (
        "PML4E[511] @ 0x0000000000001ff8 = 0x0000000000002023  P|RW|A\n"
        "PDPTE[510] @ 0x0000000000002ff0 = 0x0000000000003023  P|RW|A\n"
        "PDE[8]     @ 0x0000000000003040 = 0x00000000010001e1  P|A|D|PS|G\n"
        "0xffffffff81000000 -> phys 0x0000000001000000 (2M page) r-x supervisor\n"
        "#PF error code 0x3 (P|WR): write to read-only page (CR0.WP=1) "
        "at PDE[8] (entry 0x00000000010001e1)"
    )


def test_render_allowed_user_page_with_pkey():
    mem = build_user_path(Case("read", None, pte=LEAF | XD | pkey_bits(2)))
    r = translate(mem, VA_U, make_cpu(pke=True), Access.parse("read,user"))
    assert render_walk(r).splitlines()[-2:] == [
        "0x00007f8012345678 -> phys 0x0000000000abc678 (4K page) rw- user nx pkey 2",
        "read,user access allowed",
    ]


def test_render_not_present_reserved_gp_and_missing(kernel_mem):
    cpu = make_cpu()
    r = translate(kernel_mem, 0x1000, cpu, Access.parse("write,user"))
    assert render_walk(r) == (
        "PML4E[0]   @ 0x0000000000001000 = 0x0000000000000000  -\n"
        "0x0000000000001000 -> no translation\n"
        "#PF error code 0x6 (WR|US): not present at PML4E[0] (entry 0x0000000000000000)"
    )
    put(kernel_mem, 0x3000, 8, 0x0100_0000 | P | PS | BIT13 | BIT20)
    r = translate(kernel_mem, KTEXT, cpu, Access.parse("read"))
    assert render_walk(r).splitlines()[-1] == (
        "#PF error code 0x9 (P|RSVD): reserved bit set: bits 20, 13 set in a 2M page "
        "at PDE[8] (entry 0x0000000001102081)"
    )
    r = translate(kernel_mem, 0xFFFF_0000_0000_0000, cpu)
    assert render_walk(r) == (
        "0xffff000000000000 -> no translation\n"
        "#GP(0): non-canonical address (4-level paging: bits 63:47 must all equal bit 47)"
    )
    put(kernel_mem, PML4, 511, 0x0400_0000 | P | RW)
    r = translate(kernel_mem, KTEXT, cpu)
    assert render_walk(r).splitlines()[-1] == (
        "table at 0x0000000004000000 (below PML4E) is not in the snapshot: "
        "translation of 0xffffffff81000000 unknown"
    )


def test_walk_to_json(kernel_mem):
    r = translate(kernel_mem, KDATA, make_cpu(), Access.parse("fetch"))
    doc = walk_to_json(r)
    assert doc["steps"][3] == {
        "level": "PTE",
        "table": 0x4000,
        "index": 1,
        "entry_address": 0x4008,
        "entry": 0x8000_0000_0050_0163,
        "leaf": True,
        "flags": "P|RW|A|D|G|XD",
    }
    assert doc["fault"] == {
        "kind": "protection",
        "vector": 14,
        "error_code": 0x11,
        "error_bits": "P|ID",
        "address": KDATA,
        "level": "PTE",
        "index": 1,
        "entry": 0x8000_0000_0050_0163,
        "reason": "fetch from execute-disable page",
    }
    assert {k: doc[k] for k in ("va", "status", "ok", "phys", "page_size", "access")} == {
        "va": KDATA,
        "status": "fault",
        "ok": True,
        "phys": 0x0050_0ABC,
        "page_size": 4096,
        "access": {"kind": "fetch", "user": False, "implicit": False},
    }
    assert all(type(v) is int for v in (doc["fault"]["vector"], doc["fault"]["error_code"]))


def test_describe_error_code():
    assert describe_error_code(0) == "-"
    assert describe_error_code(0x3F) == "P|WR|US|RSVD|ID|PK"
    assert describe_error_code(0x8001 | 0x100) == "P|SGX|0x100"


# Reserved bits by SDM vol. 3A Tables 4-15 to 4-20, as hand-written masks.
@pytest.mark.parametrize(
    ("level", "last", "ps", "maxphyaddr", "nxe", "mask"),
    [
        (FOUR_LEVEL.levels[0], False, True, 52, True, 0x80),  # PS in a PML4E
        (FIVE_LEVEL.levels[0], False, True, 52, True, 0x80),  # PS in a PML5E
        (FOUR_LEVEL.levels[1], False, True, 52, True, 0x3FFFE000),  # 1 GiB page: bits 29:13
        (FOUR_LEVEL.levels[2], False, True, 46, False, 0x800FC000001FE000),  # 2M: 63, 51:46, 20:13
        (FOUR_LEVEL.levels[2], False, False, 40, True, 0x000FFF0000000000),  # PDE -> table: 51:40
        (FOUR_LEVEL.levels[3], True, True, 52, True, 0),  # bit 7 of a PTE is PAT
        (FOUR_LEVEL.levels[3], True, False, 36, False, 0x800FFFF000000000),  # XD, bits 51:36
    ],
)
def test_reserved_mask_per_level(level, last, ps, maxphyaddr, nxe, mask):
    assert reserved_mask(level, last=last, ps=ps, maxphyaddr=maxphyaddr, nxe=nxe) == mask
