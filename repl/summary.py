"""A plain-text overview of a kernel context: registers and decoded GDT/IDT/TSS.

This is what ``kctx-debug SNAPSHOT`` prints until the interactive REPL exists;
the REPL's ``info`` commands render the same pieces.
"""

from __future__ import annotations

from ..arch.bits import CR0, CR4, EFER, RFLAGS, describe_flags
from ..arch.descriptors import Selector, describe_selector
from ..arch.vectors import exception_name
from ..errors import KctxError
from ..pagetables.context import KernelContext
from ..snapshot import GENERAL_REGISTERS, SEGMENT_REGISTERS, Segment
from ..tables import decode_gdt, decode_idt, decode_tss

__all__ = [
    "describe_context",
    "describe_gdt",
    "describe_idt",
    "describe_registers",
    "describe_tss_block",
]

_FLAG_TYPES = {"cr0": CR0, "cr4": CR4}


def _segment(name: str, seg: Segment) -> str:
    text = f"{name:<5}{describe_selector(Selector.from_int(seg.selector))}"
    if seg.base is not None:
        text += f" base={seg.base:#x}"
    if seg.limit is not None:
        text += f" limit={seg.limit:#x}"
    if seg.attributes is not None:
        text += f" attr={seg.attributes:#x}"
    return text


def describe_registers(ctx: KernelContext) -> str:
    cpu = ctx.cpu
    lines = []
    names = GENERAL_REGISTERS[:-2]
    for i in range(0, len(names), 4):
        lines.append("  ".join(f"{n:<3} {cpu.regs[n]:#018x}" for n in names[i : i + 4]))
    rip = cpu.regs["rip"]
    lines.append(f"rip {rip:#018x} {_symbol(ctx, rip)}")
    lines.append(f"rflags {cpu.regs['rflags']:#x} [{describe_flags(cpu.regs['rflags'], RFLAGS)}]")
    for name in SEGMENT_REGISTERS:
        if name in cpu.segments:
            lines.append(_segment(name, cpu.segments[name]))
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8"):
        value = getattr(cpu, name)
        decoded = f" [{describe_flags(value, _FLAG_TYPES[name])}]" if name in _FLAG_TYPES else ""
        lines.append(f"{name:<5}{value:#018x}{decoded}")
    for name, value in cpu.msrs.items():
        decoded = f" [{describe_flags(value, EFER)}]" if name == "efer" else ""
        lines.append(f"{name:<15}{value:#018x}{decoded}")
    lines.append(f"gdtr base={cpu.gdtr.base:#x} limit={cpu.gdtr.limit:#x}")
    lines.append(f"idtr base={cpu.idtr.base:#x} limit={cpu.idtr.limit:#x}")
    lines.append(_segment("tr", cpu.tr))
    lines.append(_segment("ldtr", cpu.ldtr))
    lines.append(f"CPL {cpu.cpl}, {ctx.mode.name} paging")
    return "\n".join(lines)


def _symbol(ctx: KernelContext, address: int) -> str:
    hit = ctx.symbols.lookup(address)
    return f"<{hit}>" if hit else ""


def describe_gdt(ctx: KernelContext) -> str:
    lines = []
    for entry in decode_gdt(ctx.mem, ctx.cpu, ctx.virt_to_phys):
        if entry.descriptor is None:
            continue
        lines.append(f"[{entry.index:3}] {entry.selector:#06x}  {entry.descriptor}")
    return "\n".join(lines)


def describe_idt(ctx: KernelContext) -> str:
    lines = []
    for entry in decode_idt(ctx.mem, ctx.cpu, ctx.virt_to_phys):
        gate = entry.gate
        if not gate.p:
            continue
        name = exception_name(entry.vector)
        lines.append(f"{entry.vector:#04x} {name:<11} {gate} {_symbol(ctx, gate.offset)}".rstrip())
    return "\n".join(lines)


def describe_tss_block(ctx: KernelContext) -> str:
    tss = decode_tss(ctx.mem, ctx.cpu, ctx.virt_to_phys)
    lines = [f"rsp{n:<2} {getattr(tss, f'rsp{n}'):#018x}" for n in range(3)]
    lines += [f"ist{n:<2} {v:#018x}" for n, v in enumerate(tss.ist, start=1) if v]
    lines.append(f"iomap_base {tss.iomap_base:#x}")
    return "\n".join(lines)


def describe_context(ctx: KernelContext) -> str:
    """Registers, then each descriptor table; a table that cannot be read says why."""
    src = ctx.snapshot.source
    title = src.get("description") or src.get("tool") or "snapshot"
    parts = [f"== {title}", describe_registers(ctx)]
    for heading, render in (
        ("GDT", describe_gdt),
        ("IDT", describe_idt),
        ("TSS", describe_tss_block),
    ):
        try:
            body = render(ctx)
        except KctxError as e:
            body = f"(unreadable: {e})"
        parts.append(f"== {heading}\n{body}")
    return "\n".join(parts)
