"""Differential test: our walker against Unicorn's (QEMU's) own MMU.

Hypothesis draws small random 4-level page tables (present/RW/US/XD bits,
protection keys, 4 KiB/2 MiB/1 GiB leaves, reserved bits of each kind) in 16 MiB
of physical memory and random CR0.WP/EFER.NXE/CR4.SMEP/SMAP/PKE, RFLAGS.AC and
PKRU values. For each example a fresh Unicorn runs one CPL0 load, store or
instruction fetch at a random mapped address, and we check that it faults
exactly when ``translate`` (done BEFORE running: Unicorn sets A/D bits) says a
supervisor access of that kind faults, and that a load or store that succeeds
touches the byte at the walker's physical address.

Where Unicorn is not the SDM (kept out of the drawn space, walker follows the SDM):
- Unicorn's MAXPHYADDR is 40, so the walker runs with ``maxphyaddr=40`` here.
- Five-level paging: with CR4.LA57 set Unicorn faults on data accesses to valid
  five-level addresses, so only 4-level paging is compared.
- A jump to a non-canonical address raises #GP with RIP at the target in QEMU
  (AMD's behaviour); Intel reports it on the jump. Both are accepted.
- The default CPU model (Haswell) lacks SMAP; Skylake-Server has SMEP, SMAP and PKU.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc, UcError
from unicorn.x86_const import (
    UC_CPU_X86_SKYLAKE_SERVER,
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_MSR,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
)

from kctx_debug.pagetables.walk import Access, AccessKind, CpuPagingState, WalkStatus, translate
from kctx_debug.physmem import PhysicalMemory

P, RW, US, PS, XD = 0x1, 0x2, 0x4, 0x80, 1 << 63
MEM_SIZE = 16 << 20
UNICORN_MAXPHYADDR = 40
CODE, PML4 = 0x1000, 0x2000  # code runs at VA 0x1000, identity-mapped via PML4[0]
CODE_TABLES = (0x3000, 0x4000, 0x5000)
TABLE_POOL = 0x10000  # random tables are allocated upwards from here
DATA_BASE = 0x40_0000  # leaves point at 4..16 MiB, never at tables or code

CR0_BASE, CR0_WP = 0x8000_0011, 0x1_0000  # PG | ET | PE
# Unicorn's start value (OSFXSR | FSGSBASE | OSXSAVE) plus PAE (SDM vol. 3A Figure 2-8).
CR4_BASE = 0x5_0220
CR4_SMEP, CR4_SMAP, CR4_PKE = 0x10_0000, 0x20_0000, 0x40_0000
EFER_LME_LMA, EFER_NXE, MSR_EFER = 0x500, 0x800, 0xC000_0080
RFLAGS_AC = 0x4_0000

# xor ecx,ecx; xor edx,edx; mov eax,imm32; wrpkru -- only with CR4.PKE.
WRPKRU = bytes.fromhex("31c9 31d2 b8") + b"%s" + bytes.fromhex("0f01ef")
ACCESS_INSN = {
    AccessKind.READ: bytes.fromhex("488b03"),  # mov rax, [rbx]
    AccessKind.WRITE: bytes.fromhex("488933"),  # mov [rbx], rsi
    AccessKind.FETCH: bytes.fromhex("ffe3"),  # jmp rbx
}
# nop; jmp $ -- ends QEMU's translation block before the end of the page.
NOP_LOOP = int.from_bytes(bytes.fromhex("90ebfe"), "little")
PATTERN = 0x1122_3344_5566_7788


@dataclass(frozen=True)
class Mapping:
    indices: tuple[int, int, int, int]  # PML4, PDPT, PD, PT
    leaf_depth: int  # 1: 1 GiB, 2: 2 MiB, 3: 4 KiB
    flags: tuple[int, ...]  # per level, low bits and XD/pkey
    frame: int  # leaf physical base (aligned, in the data area)
    offset: int  # probe offset inside the leaf page


def entry_flags() -> st.SearchStrategy[int]:
    present = st.sampled_from([P] * 11 + [0])
    rw = st.sampled_from([0, RW, RW])
    us = st.sampled_from([0, US, US, US])  # user pages need U/S=1 at every level
    xd = st.sampled_from([0] * 7 + [XD])
    pkey = st.integers(0, 15).map(lambda k: k << 59)
    accessed = st.sampled_from([0, 0x20, 0x60])
    return st.tuples(present, rw, us, xd, pkey, accessed).map(lambda t: sum(t))


@st.composite
def mappings(draw) -> Mapping:
    leaf_depth = draw(st.sampled_from([1, 2, 3]))
    indices = (
        draw(st.sampled_from([1, 2, 255, 256, 511])),
        draw(st.sampled_from([0, 1, 511])),
        draw(st.sampled_from([0, 1, 511])),
        draw(st.sampled_from([0, 1, 511])),
    )
    flags = list(draw(st.lists(entry_flags(), min_size=4, max_size=4)))
    # Reserved or look-alike bits on one entry, sometimes.
    spoil = draw(st.sampled_from(["none"] * 6 + ["maxphy", "ps-pml4e", "large-low", "pat"]))
    level = draw(st.integers(0, leaf_depth))
    if spoil == "maxphy":
        flags[level] |= 1 << draw(st.integers(UNICORN_MAXPHYADDR, 51))
    elif spoil == "ps-pml4e" and leaf_depth > 0:
        flags[0] |= PS
    elif spoil == "large-low" and leaf_depth < 3:
        flags[leaf_depth] |= 1 << draw(st.integers(13, 20 if leaf_depth == 2 else 29))
    elif spoil == "pat":
        flags[leaf_depth] |= 1 << 12 if leaf_depth < 3 else PS  # PAT: never reserved
    if leaf_depth == 1:  # the only 1 GiB frame below 16 MiB is 0: probe the data area
        frame, offset = 0, draw(st.integers(DATA_BASE, MEM_SIZE - 8))
    elif leaf_depth == 2:
        frame = draw(st.integers(DATA_BASE >> 21, (MEM_SIZE >> 21) - 1)) << 21
        offset = draw(st.integers(0, (1 << 21) - 8))
    else:
        frame = draw(st.integers(DATA_BASE >> 12, (MEM_SIZE >> 12) - 1)) << 12
        offset = draw(st.integers(0, 4095 - 7))
    return Mapping(indices, leaf_depth, tuple(flags), frame, offset & ~7)


@dataclass(frozen=True)
class Machine:
    wp: bool
    nxe: bool
    smep: bool
    smap: bool
    ac: bool
    pke: bool
    pkru: int

    def cpu_state(self) -> CpuPagingState:
        return CpuPagingState.from_registers(
            cr0=self.cr0, cr3=PML4, cr4=self.cr4, efer=self.efer, rflags=self.rflags,
            pkru=self.pkru, maxphyaddr=UNICORN_MAXPHYADDR,
        )  # fmt: skip

    cr0 = property(lambda self: CR0_BASE | (CR0_WP if self.wp else 0))
    efer = property(lambda self: EFER_LME_LMA | (EFER_NXE if self.nxe else 0))
    rflags = property(lambda self: 0x2 | (RFLAGS_AC if self.ac else 0))

    @property
    def cr4(self) -> int:
        smep = CR4_SMEP if self.smep else 0
        return CR4_BASE | smep | (CR4_SMAP if self.smap else 0) | (CR4_PKE if self.pke else 0)


machines = st.builds(
    Machine,
    wp=st.booleans(),
    nxe=st.booleans(),
    smep=st.booleans(),
    smap=st.booleans(),
    ac=st.booleans(),
    pke=st.booleans(),
    pkru=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
)


def build_memory(maps: list[Mapping]) -> PhysicalMemory:
    mem = PhysicalMemory()
    mem.add_zero(0, MEM_SIZE)
    # Code: PML4[0] -> PDPT[0] -> PD[0] -> PT[1] -> 0x1000, supervisor, executable.
    chain = (PML4, *CODE_TABLES)
    for table, child in zip(chain, CODE_TABLES, strict=False):
        mem.write_u64(table, child | P | RW)
    mem.write_u64(CODE_TABLES[-1] + 8, CODE | P | RW)
    children: dict[tuple[int, int], int] = {}
    next_table = TABLE_POOL
    for m in maps:
        table = PML4
        for depth in range(m.leaf_depth + 1):
            slot = (table, m.indices[depth])
            if depth == m.leaf_depth:
                large = PS if depth < 3 else 0
                mem.write_u64(table + 8 * m.indices[depth], m.frame | m.flags[depth] | large)
                break
            if slot not in children:
                children[slot] = next_table
                next_table += 0x1000
            child = children[slot]
            mem.write_u64(table + 8 * m.indices[depth], child | m.flags[depth])
            table = child
    return mem


def probe_va(m: Mapping) -> int:
    va = sum(index << shift for index, shift in zip(m.indices, (39, 30, 21, 12), strict=True))
    va = va & ~((1 << (12 + 9 * (3 - m.leaf_depth))) - 1) | m.offset
    return va | (0xFFFF << 48) if va >> 47 else va


def run_unicorn(mem: PhysicalMemory, machine: Machine, kind: AccessKind, va: int):
    """Run the access once; return (vector, cr2, rip) of the trap or None, and final RAX/RIP."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64, UC_CPU_X86_SKYLAKE_SERVER)
    ranges = mem.host_ranges()
    for r in ranges:
        uc.mem_map_ptr(r.base, r.size, 7, r.address)
    prefix = WRPKRU.replace(b"%s", struct.pack("<I", machine.pkru)) if machine.pke else b""
    code = prefix + ACCESS_INSN[kind]
    access_rip = CODE + len(prefix)
    mem.write(CODE, code)
    uc.reg_write(UC_X86_REG_CR3, PML4)
    uc.reg_write(UC_X86_REG_CR4, machine.cr4)
    uc.reg_write(UC_X86_REG_MSR, (MSR_EFER, machine.efer))
    uc.reg_write(UC_X86_REG_CR0, machine.cr0)
    uc.reg_write(UC_X86_REG_RFLAGS, machine.rflags)
    uc.reg_write(UC_X86_REG_RBX, va)
    uc.reg_write(UC_X86_REG_RSI, PATTERN)
    traps = []

    def on_intr(uc: Uc, vector: int, _data: object) -> None:
        rip = uc.reg_read(UC_X86_REG_RIP)
        traps.append((vector, uc.reg_read(UC_X86_REG_CR2), rip))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    count = (4 if machine.pke else 0) + (2 if kind is AccessKind.FETCH else 1)
    try:
        uc.emu_start(CODE, 0, count=count)
    except UcError as e:
        raise AssertionError(f"Unicorn failed: {e}") from None
    del ranges  # keep the host buffers alive until here
    return (traps[0] if traps else None), uc.reg_read(UC_X86_REG_RAX), access_rip, uc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    maps=st.lists(mappings(), min_size=1, max_size=4),
    machine=machines,
    kind=st.sampled_from(list(AccessKind)),
    pick=st.integers(0, 3),
    non_canonical=st.sampled_from([False] * 19 + [True]),
)
def test_walker_agrees_with_unicorn(maps, machine, kind, pick, non_canonical):
    mem = build_memory(maps)
    va = probe_va(maps[pick % len(maps)])
    if non_canonical:
        va ^= 1 << 47  # bits 63:48 no longer copy bit 47
    walk = translate(mem, va, machine.cpu_state(), Access(kind))
    assert walk.status is not WalkStatus.NOT_CAPTURED  # every table is in memory
    # Overlapping mappings can send a probe through another mapping's 1 GiB leaf to
    # a frame beyond memory, where Unicorn stops with an unmapped-memory error.
    assume(walk.phys is None or walk.phys + 8 <= MEM_SIZE)
    in_data = walk.phys is not None and walk.phys >= DATA_BASE
    if walk.fault is None and in_data:
        if kind is AccessKind.READ:
            mem.write_u64(walk.phys, ~PATTERN & (2**64 - 1))
        elif kind is AccessKind.FETCH:
            mem.write_u64(walk.phys, NOP_LOOP)

    trap, rax, access_rip, uc = run_unicorn(mem, machine, kind, va)

    where = f"va {va:#x} {kind.value}: walker says {walk.fault}, Unicorn trap {trap}"
    fault_rip = va if kind is AccessKind.FETCH else access_rip
    if walk.fault is not None:
        if walk.fault.vector == 13:  # #GP(0), on the access or (QEMU) on the jump's target
            assert trap is not None and trap[0] == 13 and trap[2] in (access_rip, va), where
        else:
            assert trap == (14, va, fault_rip), where
        return
    assert trap is None or trap[1] != va, where
    if not in_data:
        return  # an alias of tables or code: only fault/no-fault is compared
    if kind is AccessKind.READ:
        assert rax == ~PATTERN & (2**64 - 1), where
    elif kind is AccessKind.WRITE:
        assert mem.read_u64(walk.phys) == PATTERN, where
    else:
        assert trap is None and uc.reg_read(UC_X86_REG_RIP) == va + 1, where
