"""Builders for the trap tests: a small kernel context with a real GDT, IDT and TSS.

No tests here (the kit is imported by tests/test_traps_*.py). The layout, after Linux:
kernel text at 0xffffffff81000000 (also aliased at 0xffffffff82000000), kernel data,
a GDT/IDT/TSS in a "cpu entry area", an RSP0 stack, a kernel stack and an IST1 stack
in vmalloc space, user text and data at 0x400000. Every IDT gate starts as a present
DPL0 interrupt gate to a ``hlt`` loop; tests override gates and add handler code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kctx_debug.arch.descriptors import IdtGate, SystemDescriptor, SystemDescriptorType
from kctx_debug.arch.tss import Tss64
from kctx_debug.emulator.machine import Machine
from kctx_debug.pagetables.build import PageTableBuilder
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.pagetables.entry import PteFlag, paging_mode
from kctx_debug.physmem import PAGE_SIZE, PhysicalMemory
from kctx_debug.snapshot import CpuState, Segment, Snapshot, TableRegister
from kctx_debug.symbols import Symbol, SymbolTable
from kctx_debug.traps.debugger import Debugger

# -- virtual layout ---------------------------------------------------------------------
KTEXT = 0xFFFF_FFFF_8100_0000  # two pages, RX
KTEXT_ALIAS = 0xFFFF_FFFF_8200_0000  # the same two physical pages again
HANDLERS = KTEXT + 0x800  # where tests put handler code
DEFAULT_HANDLER = KTEXT + 0x1F00  # hlt; jmp hlt
KDATA = 0xFFFF_FFFF_8101_0000  # RW NX
CEA = 0xFFFF_FE00_0000_0000
GDT_VA, IDT_VA, TSS_VA = CEA + 0x1000, CEA + 0x2000, CEA + 0x3000
STACK0 = 0xFFFF_C900_0000_0000  # the RSP0 stack, two pages
RSP0 = STACK0 + 0x2000
KSTACK = 0xFFFF_C900_0001_0000  # the kernel code's own stack, one page
KSTACK_TOP = KSTACK + 0x1000
IST1 = 0xFFFF_C900_0002_0000  # one page
IST1_TOP = IST1 + 0x1000
UTEXT, UDATA = 0x40_0000, 0x40_1000
USTACK_TOP = UDATA + 0x1000
UNMAPPED = 0x1234_5000
# -- physical layout ----------------------------------------------------------------------
RAM = 0x40_0000
TABLES, TABLES_SIZE = 0x10_0000, 0x4_0000
GDT_PA, IDT_PA, TSS_PA = 0x1000, 0x2000, 0x3000
KTEXT_PA, KDATA_PA = 0x20_0000, 0x21_0000
STACK0_PA, KSTACK_PA, IST1_PA = 0x22_0000, 0x23_0000, 0x24_0000
UTEXT_PA, UDATA_PA = 0x30_0000, 0x30_1000
# -- selectors (Linux's) and descriptors (SDM vol. 3A 3.4.5) --------------------------------
KERNEL_CS, KERNEL_SS, USER32_CS, USER_SS, USER_CS = 0x10, 0x18, 0x20, 0x2B, 0x33
TSS_SEL = 0x38
ABSENT_CS, CODE32_CS = 0x48, 0x50  # a not-present 64-bit code segment; a 32-bit one
GDT = {
    KERNEL_CS: 0x00AF9B000000FFFF,
    KERNEL_SS: 0x00CF93000000FFFF,
    USER32_CS: 0x00CFFB000000FFFF,
    USER_SS & ~3: 0x00CFF3000000FFFF,
    USER_CS & ~3: 0x00AFFB000000FFFF,
    ABSENT_CS: 0x00AF1B000000FFFF,  # P (bit 47) clear
    CODE32_CS: 0x00CF9B000000FFFF,
}
GDT_LIMIT = 0x57
AR = {KERNEL_CS: 0xA09B, KERNEL_SS: 0xC093, USER_CS: 0xA0FB, USER_SS: 0xC0F3}
CR0 = 0x8005_0033  # PE MP ET NE WP AM PG
CR4 = 0x10_06A0  # PAE PGE OSFXSR OSXMMEXCPT SMEP
EFER = 0xD01  # SCE LME LMA NXE
LSTAR = KTEXT + 0x1000
STAR = (USER_SS - 8 - 3) << 48 | KERNEL_CS << 32  # SYSRET base 0x20: CS 0x33, SS 0x2b
SFMASK = 0x4_7700  # TF DF IF IOPL NT AC
INTERRUPT_GATE, TRAP_GATE = SystemDescriptorType.INTERRUPT_GATE, SystemDescriptorType.TRAP_GATE
HLT_LOOP = bytes.fromhex("f4 ebfd")  # hlt; jmp hlt


def asm(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def rel32(value: int) -> bytes:
    """A sign-extended 32-bit absolute address (``mov rax, [abs32]`` forms)."""
    return struct.pack("<i", value - (1 << 64) if value >> 63 else value)


def load_abs(va: int) -> bytes:
    """``mov rax, [va]`` (48 8B 04 25 disp32)."""
    return asm("488b0425") + rel32(va)


def store_abs(va: int) -> bytes:
    """``mov [va], rax`` (48 89 04 25 disp32)."""
    return asm("48890425") + rel32(va)


def gate(handler: int = DEFAULT_HANDLER, **fields) -> IdtGate:
    """A present DPL0 interrupt gate to ``handler`` through the kernel CS, with overrides."""
    values = dict(offset=handler, selector=KERNEL_CS, type=INTERRUPT_GATE, dpl=0, p=True)
    values.update(fields)
    return IdtGate(**values)


@dataclass
class Kit:
    ctx: KernelContext
    tables: PageTableBuilder
    mem: PhysicalMemory
    symbols: dict[str, int] = field(default_factory=dict)

    def machine(self) -> Machine:
        return Machine.from_context(self.ctx)

    def debugger(self) -> Debugger:
        table = SymbolTable.from_entries(Symbol(n, a, type="T") for n, a in self.symbols.items())
        return Debugger(self.machine(), symbols=table)


def build(
    code: bytes = HLT_LOOP,
    *,
    user_code: bytes | None = None,
    cpl: int = 0,
    handlers: dict[int, bytes] | None = None,
    gates: dict[int, IdtGate] | None = None,
    regs: dict[str, int] | None = None,
    rsp0: int = RSP0,
    ist1: int = IST1_TOP,
    msrs: dict[str, int] | None = None,
    unmap_stack0: bool = False,
    idt_limit: int = 0xFFF,
) -> Kit:
    """A context about to run ``code`` at KTEXT (CPL0) or ``user_code`` at UTEXT (CPL3).

    ``handlers`` maps an address in KTEXT to code placed there.
    """
    mem = PhysicalMemory()
    mem.add_zero(0, RAM)
    tables = PageTableBuilder(mem, paging_mode(False), TABLES, TABLES_SIZE)
    g, rw_nx = PteFlag.G, PteFlag.G | PteFlag.RW | PteFlag.XD
    tables.map(KTEXT, KTEXT_PA, 2 * PAGE_SIZE, PAGE_SIZE, g)
    tables.map(KTEXT_ALIAS, KTEXT_PA, 2 * PAGE_SIZE, PAGE_SIZE, g)
    tables.map(KDATA, KDATA_PA, PAGE_SIZE, PAGE_SIZE, rw_nx)
    tables.map(GDT_VA, GDT_PA, 3 * PAGE_SIZE, PAGE_SIZE, rw_nx)
    if not unmap_stack0:
        tables.map(STACK0, STACK0_PA, 2 * PAGE_SIZE, PAGE_SIZE, rw_nx)
    tables.map(KSTACK, KSTACK_PA, PAGE_SIZE, PAGE_SIZE, rw_nx)
    tables.map(IST1, IST1_PA, PAGE_SIZE, PAGE_SIZE, rw_nx)
    tables.map(UTEXT, UTEXT_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.US)
    tables.map(UDATA, UDATA_PA, PAGE_SIZE, PAGE_SIZE, PteFlag.US | PteFlag.RW | PteFlag.XD)
    for selector, raw in GDT.items():
        mem.write(GDT_PA + selector, struct.pack("<Q", raw))
    tss = SystemDescriptor(base=TSS_VA, limit=0x67, type=SystemDescriptorType.TSS_BUSY, p=True)
    mem.write(GDT_PA + TSS_SEL, tss.to_bytes())
    mem.write(TSS_PA, Tss64(rsp0=rsp0, ist=(ist1, 0, 0, 0, 0, 0, 0)).to_bytes())
    all_gates = {v: gate() for v in range(256)}
    all_gates.update(gates or {})
    for vector, g8 in all_gates.items():
        mem.write(IDT_PA + 16 * vector, g8.to_bytes())
    mem.write(KTEXT_PA, code)
    mem.write(KTEXT_PA + (DEFAULT_HANDLER - KTEXT), HLT_LOOP)
    for address, body in (handlers or {}).items():
        mem.write(KTEXT_PA + (address - KTEXT), body)
    if user_code is not None:
        mem.write(UTEXT_PA, user_code)
    user = cpl == 3
    cs, ss = (USER_CS, USER_SS) if user else (KERNEL_CS, KERNEL_SS)
    rsp = USTACK_TOP - 0x18 if user else KSTACK_TOP - 0x18
    base = {"rip": UTEXT if user else KTEXT, "rsp": rsp, "rflags": 0x202}
    cpu = CpuState(
        regs={**base, **(regs or {})},
        cr0=CR0,
        cr3=tables.root,
        cr4=CR4,
        msrs={"efer": EFER, "star": STAR, "lstar": LSTAR, "sfmask": SFMASK, **(msrs or {})},
        segments={
            "cs": Segment(cs, 0, 0xFFFF_FFFF, AR[cs]),
            "ss": Segment(ss, 0, 0xFFFF_FFFF, AR[ss]),
        },
        gdtr=TableRegister(GDT_VA, GDT_LIMIT),
        idtr=TableRegister(IDT_VA, idt_limit),
        tr=Segment(TSS_SEL, TSS_VA, 0x67, 0x8B),
    )
    symbols = {"default_handler": DEFAULT_HANDLER, "kernel_start": KTEXT, "user_start": UTEXT}
    return Kit(KernelContext(Snapshot(cpu, ()), mem), tables, mem, symbols)


def qwords(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))
