"""A synthesized kernel context around a captured process: what a CPU in user mode needs.

The process's pages keep their frames; everything else lives in one *kernel
area* of physical memory placed above the highest captured frame (2 MiB
aligned, so nothing collides), laid out after Linux x86-64:

=========================  ============================  =========================
physical (from the base)   virtual                       contents
=========================  ============================  =========================
+0x0000                    0xfffffe0000000000 (ro)       IDT, 256 interrupt gates
+0x1000                    0xfffffe0000001000 (ro)       GDT, Linux selectors
+0x2000                    0xfffffe0000002000            TSS: RSP0, IST1-4
+0x3000                    0xffffffff81000000 (ro, x)    handler stubs
+0x4000                    0xffffc90000001000...         stacks, guard page between
after the stacks           (direct map only)             page tables (``build``)
=========================  ============================  =========================

The first three sit where Linux's cpu_entry_area puts them, the stubs at the
default kernel text address, the stacks in vmalloc space; the whole area is also
mapped at its offset in the direct map (``0xffff888000000000`` + phys).

Every vector's gate leads to its own 8-byte stub ``f4 eb fd cc cc cc cc cc``:
``hlt`` then ``jmp $-1`` (a rel8 jump of -3, back to the ``hlt``), padded with
``int3``. There is no kernel behind the process, so an event parks the CPU in
the stub of its vector, where a debugger can see which one it was. LSTAR and
CSTAR lead to two more such stubs after the 256.

Control registers are what Linux runs user code with on a CPU of this kind
(the bundled demo's values, which Unicorn accepts): CR0 = PE MP ET NE WP AM PG,
CR4 = PAE PGE OSFXSR OSXMMEXCPT FSGSBASE SMEP (+ LA57 for 5-level), no PCIDE so
CR3 is the plain root, no SMAP because Unicorn's default CPU model lacks it;
EFER = SCE LME LMA NXE; STAR, SFMASK and PAT hold Linux's values.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..arch.bits import CR0, CR4, EFER, RFLAGS, RFLAGS_IOPL, BitField
from ..arch.descriptors import SystemDescriptor, SystemDescriptorType
from ..arch.vectors import FIRST_USER_VECTOR, NUM_VECTORS, Vector
from ..buildspec import (
    BuildSpec,
    GateSpec,
    GdtEntrySpec,
    GdtSpec,
    IdtSpec,
    MappingSpec,
    PageTableSpec,
    TssSpec,
)
from ..pagetables.entry import PteFlag
from ..physmem import PAGE_SIZE
from ..snapshot import CpuState, MemoryRange, RangeKind, Segment, SymbolSource, TableRegister
from ..tables import encode_gdt_entry
from .ptrace import UserRegs
from .reader import CapturedVma

__all__ = [
    "CEA_VA",
    "HALT_STUB",
    "TEXT_VA",
    "KernelContextSpec",
    "access_rights",
    "synthesize",
    "tables_needed",
]

# -- layout -------------------------------------------------------------------------

CEA_VA = 0xFFFFFE0000000000  # Linux CPU_ENTRY_AREA_BASE; the read-only IDT is its first page
IDT_VA, GDT_VA, TSS_VA = CEA_VA, CEA_VA + 0x1000, CEA_VA + 0x2000
TEXT_VA = 0xFFFFFFFF81000000  # Linux's default (non-KASLR) text start
STACKS_VA = 0xFFFFC90000000000  # Linux VMALLOC_START (4-level)
DIRECT_MAP_VA = {4: 0xFFFF888000000000, 5: 0xFF11000000000000}  # Linux PAGE_OFFSET
_IDT_OFF, _GDT_OFF, _TSS_OFF, _TEXT_OFF, _STACKS_OFF = 0, 0x1000, 0x2000, 0x3000, 0x4000
_AREA_ALIGN = 2 << 20

# hlt; jmp rel8 -3 (to the hlt): SDM vol. 2A "HLT" (F4), vol. 2A "JMP" (EB cb).
HALT_STUB = bytes.fromhex("f4ebfd")
_INT3 = 0xCC  # SDM vol. 2A "INT3" (CC): padding that traps if ever reached
_STUB_SIZE = 8
_SYSCALL_STUB_OFF = NUM_VECTORS * _STUB_SIZE  # LSTAR; CSTAR follows

# (name, size, IST slot or 0 for RSP0); Linux's IST use: DF 1, NMI 2, DB 3, MCE 4
# (arch/x86/include/asm/page_64_types.h), THREAD_SIZE 16 KiB, EXCEPTION_STKSZ 4 KiB.
_STACKS = (
    ("rsp0", 0x4000, 0),
    ("ist1_df", PAGE_SIZE, 1),
    ("ist2_nmi", PAGE_SIZE, 2),
    ("ist3_db", PAGE_SIZE, 3),
    ("ist4_mc", PAGE_SIZE, 4),
)
_IST_OF_VECTOR = {Vector.DF: 1, Vector.NMI: 2, Vector.DB: 3, Vector.MC: 4}
_USER_GATES = {Vector.BP, Vector.OF, 0x80}  # DPL 3 in Linux: int3, into, int $0x80

# Linux's GDT (arch/x86/include/asm/segment.h): selector = index * 8 | RPL.
KERNEL_CS, USER_DS, USER_CS, TSS_SELECTOR = 0x10, 0x2B, 0x33, 0x40
_GDT_ENTRIES = 16
_GDT = (
    GdtEntrySpec(0, "null"),
    GdtEntrySpec(1, "code32"),  # __KERNEL32_CS
    GdtEntrySpec(2, "code64"),  # __KERNEL_CS
    GdtEntrySpec(3, "data"),  # __KERNEL_DS
    GdtEntrySpec(4, "code32", dpl=3),  # __USER32_CS
    GdtEntrySpec(5, "data", dpl=3),  # __USER_DS
    GdtEntrySpec(6, "code64", dpl=3),  # __USER_CS
)
_TSS_LIMIT = 0x67  # the 104-byte 64-bit TSS (SDM vol. 3A 8.7), no I/O bitmap

# VMCS guest access rights (SDM vol. 3C 25.4.1, Table 25-2): bits 7:0 are descriptor
# bits 47:40 (type, S, DPL, P), bits 15:12 descriptor bits 55:52 (AVL, L, D/B, G).
_DESC_ACCESS, _DESC_FLAGS = BitField("access", 40, 8), BitField("flags", 52, 4)
_AR_ACCESS, _AR_FLAGS = BitField("access", 0, 8), BitField("flags", 12, 4)

# IA32_STAR (SDM vol. 3A 5.8.8): SYSCALL loads CS from 47:32, SYSRET bases on 63:48.
_STAR_SYSCALL_CS, _STAR_SYSRET_CS = BitField("SYSCALL_CS", 32, 16), BitField("SYSRET_CS", 48, 16)
_USER32_CS = 0x23  # SYSRET to 64-bit code uses this + 16 (0x33), SS this + 8 (0x2b)
# Linux syscall_init(): RFLAGS bits SYSCALL clears.
_SFMASK = (
    RFLAGS.CF
    | RFLAGS.PF
    | RFLAGS.AF
    | RFLAGS.ZF
    | RFLAGS.SF
    | RFLAGS.TF
    | RFLAGS.IF
    | RFLAGS.DF
    | RFLAGS.OF
    | RFLAGS.NT
    | RFLAGS.RF
    | RFLAGS.AC
    | RFLAGS.ID
    | RFLAGS_IOPL.mask
)
# IA32_PAT entries PA0-7 as Linux programs them: WB WC UC- UC WB WP UC- WT, encoded as
# memory types (SDM vol. 3A Table 13-10: UC 0, WC 1, WT 4, WP 5, WB 6, UC- 7).
_PAT_TYPES = (6, 1, 7, 0, 6, 5, 7, 4)
_CR0 = CR0.PE | CR0.MP | CR0.ET | CR0.NE | CR0.WP | CR0.AM | CR0.PG
_CR4 = CR4.PAE | CR4.PGE | CR4.OSFXSR | CR4.OSXMMEXCPT | CR4.FSGSBASE | CR4.SMEP
_EFER = EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE
_KERNEL_RO = PteFlag.G | PteFlag.XD
_KERNEL_RW = PteFlag.RW | PteFlag.G | PteFlag.XD
_LEVEL_SHIFTS = {4: (21, 30, 39), 5: (21, 30, 39, 48)}  # the page each table level spans


@dataclass(frozen=True)
class KernelContextSpec:
    """The synthesized parts of a capture snapshot."""

    cpu: CpuState
    build: BuildSpec
    memory: tuple[MemoryRange, ...]  # the kernel area
    symbols: SymbolSource
    area_base: int
    area_size: int


def access_rights(descriptor: bytes) -> int:
    """The VMCS access-rights word of a segment descriptor (its first 8 bytes).

    >>> hex(access_rights(encode_gdt_entry(GdtEntrySpec(6, "code64", dpl=3))))
    '0xa0fb'
    """
    raw = int.from_bytes(descriptor[:8], "little")
    return _AR_FLAGS.insert(
        _AR_ACCESS.insert(0, _DESC_ACCESS.extract(raw)), _DESC_FLAGS.extract(raw)
    )


def tables_needed(page_vas: np.ndarray, levels: int) -> int:
    """Exact count of table frames that mapping these 4 KiB pages takes, root included."""
    vas = np.asarray(page_vas, dtype=np.uint64)
    return 1 + sum(len(np.unique(vas >> np.uint64(s))) for s in _LEVEL_SHIFTS[levels])


def _stub_page() -> bytes:
    stub = HALT_STUB.ljust(_STUB_SIZE, bytes([_INT3]))
    body = stub * NUM_VECTORS + stub * 2  # the vectors, then LSTAR and CSTAR
    return body.ljust(PAGE_SIZE, bytes([_INT3]))


def _stub_name(vector: int) -> str:
    if vector < FIRST_USER_VECTOR:
        try:
            return f"kctx_stub_{Vector(vector).name.lower()}"
        except ValueError:
            pass  # a reserved exception vector: no mnemonic
    return f"kctx_stub_vector_{vector:#04x}"


def _user_mappings(captured: list[CapturedVma]) -> list[MappingSpec]:
    """One 4 KiB mapping per run of pages consecutive in both VA and frame."""
    out = []
    for c in captured:
        if not len(c.vas):
            continue
        flags = PteFlag.US
        flags |= PteFlag.RW if c.vma.pte_writable else 0
        flags |= 0 if c.vma.pte_executable else PteFlag.XD
        va_step = np.diff(c.vas.astype(np.int64)) != PAGE_SIZE
        frame_step = np.diff(c.frames.astype(np.int64)) != 1
        bounds = [0, *(np.flatnonzero(va_step | frame_step) + 1).tolist(), len(c.vas)]
        where = f"capture: {c.vma.describe()}"
        for lo, hi in itertools.pairwise(bounds):
            out.append(
                MappingSpec(
                    int(c.vas[lo]),
                    int(c.frames[lo]) * PAGE_SIZE,
                    (hi - lo) * PAGE_SIZE,
                    PAGE_SIZE,
                    int(flags),
                    where=where,
                )
            )
    return out


def synthesize(
    regs: UserRegs, captured: list[CapturedVma], frames_end: int, levels: int = 4
) -> KernelContextSpec:
    """The kernel context around ``captured``; ``frames_end`` is above every captured frame."""
    base = -(-frames_end * PAGE_SIZE // _AREA_ALIGN) * _AREA_ALIGN
    kernel: list[tuple[int, int, int, int, str]] = [  # (va, phys, size, flags, name)
        (IDT_VA, base + _IDT_OFF, PAGE_SIZE, _KERNEL_RO, "idt"),
        (GDT_VA, base + _GDT_OFF, PAGE_SIZE, _KERNEL_RO, "gdt"),
        (TSS_VA, base + _TSS_OFF, PAGE_SIZE, _KERNEL_RW, "tss"),
        (TEXT_VA, base + _TEXT_OFF, PAGE_SIZE, PteFlag.G, "stubs"),
    ]
    tops = {}
    va, phys = STACKS_VA, base + _STACKS_OFF
    for name, size, slot in _STACKS:
        va += PAGE_SIZE  # unmapped guard page below each stack
        kernel.append((va, phys, size, _KERNEL_RW, f"stack_{name}"))
        tops[slot] = va + size
        va, phys = va + size, phys + size
    table_base = phys
    user = _user_mappings(captured)
    fixed_vas = np.concatenate(
        [c.vas for c in captured]
        + [
            np.uint64(v) + np.arange(size // PAGE_SIZE, dtype=np.uint64) * np.uint64(PAGE_SIZE)
            for v, _, size, _, _ in kernel
        ]
    )
    direct = DIRECT_MAP_VA[levels] + base
    # The direct map also covers the tables, whose count depends on its size: iterate
    # to the fixed point (it grows by a few frames at most once or twice).
    table_frames = tables_needed(fixed_vas, levels)
    while True:
        area_size = table_base - base + table_frames * PAGE_SIZE
        pages = np.arange(area_size // PAGE_SIZE, dtype=np.uint64)
        direct_vas = np.uint64(direct) + pages * np.uint64(PAGE_SIZE)
        needed = tables_needed(np.concatenate([fixed_vas, direct_vas]), levels)
        if needed <= table_frames:
            break
        table_frames = needed
    table_size = table_frames * PAGE_SIZE
    kernel.append((direct, base, area_size, _KERNEL_RW, "direct_map"))
    mappings = user + [
        MappingSpec(v, p, s, PAGE_SIZE, int(f), where=f"kernel {n}") for v, p, s, f, n in kernel
    ]
    gates = tuple(
        GateSpec(
            v,
            TEXT_VA + v * _STUB_SIZE,
            KERNEL_CS,
            "interrupt",
            dpl=3 if v in _USER_GATES else 0,
            ist=_IST_OF_VECTOR.get(v, 0),
            where=f"build.idt.gates[{v}]",
        )
        for v in range(NUM_VECTORS)
    )
    tss_entry = GdtEntrySpec(TSS_SELECTOR >> 3, "tss", base=TSS_VA, limit=_TSS_LIMIT)
    build = BuildSpec(
        page_tables=PageTableSpec(levels, table_base, table_size, tuple(mappings)),
        gdt=GdtSpec(base + _GDT_OFF, (*_GDT, tss_entry)),
        idt=IdtSpec(base + _IDT_OFF, gates),
        tss=TssSpec(
            base + _TSS_OFF, rsp=(tops[0], 0, 0), ist=tuple(tops.get(i, 0) for i in range(1, 8))
        ),
    )
    memory = (
        MemoryRange(base, _TEXT_OFF, RangeKind.ZERO),
        MemoryRange(base + _TEXT_OFF, PAGE_SIZE, RangeKind.INLINE, data=_stub_page()),
        MemoryRange(base + _STACKS_OFF, area_size - _STACKS_OFF, RangeKind.ZERO),
    )
    symbols = [(_stub_name(v), TEXT_VA + v * _STUB_SIZE) for v in range(NUM_VECTORS)]
    symbols += [
        ("kctx_entry_syscall_64", TEXT_VA + _SYSCALL_STUB_OFF),
        ("kctx_entry_syscall_compat", TEXT_VA + _SYSCALL_STUB_OFF + _STUB_SIZE),
        ("kctx_idt", IDT_VA),
        ("kctx_gdt", GDT_VA),
        ("kctx_tss", TSS_VA),
    ]
    symbols += [(f"kctx_{n}", v) for v, _, _, _, n in kernel if n.startswith("stack_")]
    cpu = _cpu_state(regs, table_base, levels)
    return KernelContextSpec(
        cpu, build, memory, SymbolSource("inline", entries=tuple(symbols)), base, area_size
    )


def _segment(selector: int, base: int, gdt: dict[int, GdtEntrySpec]) -> Segment:
    spec = gdt.get(selector >> 3)
    if selector < 4 or spec is None or selector & 4:  # null, unknown, or an LDT selector
        return Segment(selector, base=base)
    return Segment(selector, base, 0xFFFFFFFF, access_rights(encode_gdt_entry(spec)))


def _cpu_state(regs: UserRegs, cr3: int, levels: int) -> CpuState:
    gdt = {e.index: e for e in _GDT}
    names = (
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rbp",
        "rsp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
        "rip",
    )
    gpr = {n: getattr(regs, n) for n in names}
    gpr["rflags"] = regs.eflags
    segments = {
        "cs": _segment(regs.cs, 0, gdt),
        "ss": _segment(regs.ss, 0, gdt),
        "ds": _segment(regs.ds, 0, gdt),
        "es": _segment(regs.es, 0, gdt),
        "fs": _segment(regs.fs, regs.fs_base, gdt),
        "gs": _segment(regs.gs, regs.gs_base, gdt),
    }
    tss = SystemDescriptor(
        base=TSS_VA, limit=_TSS_LIMIT, type=SystemDescriptorType.TSS_BUSY, p=True
    )
    star = _STAR_SYSRET_CS.insert(_STAR_SYSCALL_CS.insert(0, KERNEL_CS), _USER32_CS)
    msrs = {
        "efer": int(_EFER),
        "fs_base": regs.fs_base,
        "gs_base": regs.gs_base,
        "kernel_gs_base": 0,  # no per-CPU area: nothing for SWAPGS to switch to
        "star": star,
        "lstar": TEXT_VA + _SYSCALL_STUB_OFF,
        "cstar": TEXT_VA + _SYSCALL_STUB_OFF + _STUB_SIZE,
        "sfmask": int(_SFMASK),
        "pat": sum(t << (8 * i) for i, t in enumerate(_PAT_TYPES)),
    }
    return CpuState(
        regs=gpr,
        cr0=int(_CR0),
        cr3=cr3,
        cr4=int(_CR4 | (CR4.LA57 if levels == 5 else 0)),
        msrs=msrs,
        segments=segments,
        gdtr=TableRegister(GDT_VA, _GDT_ENTRIES * 8 - 1),
        idtr=TableRegister(IDT_VA, NUM_VECTORS * 16 - 1),
        tr=Segment(TSS_SELECTOR, TSS_VA, _TSS_LIMIT, access_rights(tss.to_bytes())),
        ldtr=Segment(0),
    )
