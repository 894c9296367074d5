"""A plain-text overview of a kernel context: registers and decoded GDT/IDT/TSS.

``kctx-debug summary``-style output and the REPL's ``info gdt``/``info idt``/``info tss``
render the same pieces. Every function takes a :class:`ContextView`: a
:class:`~kctx_debug.pagetables.context.KernelContext`, or any object with the same
``mem``, ``cpu``, ``virt_to_phys`` and ``symbols`` (the REPL's view of a running
machine).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..arch.bits import CR0, CR4, EFER, RFLAGS, describe_flags
from ..arch.descriptors import (
    SegmentDescriptor,
    Selector,
    SystemDescriptor,
    describe_selector,
)
from ..arch.vectors import exception_name
from ..errors import KctxError
from ..pagetables.context import KernelContext
from ..snapshot import GENERAL_REGISTERS, SEGMENT_REGISTERS, CpuState, Segment
from ..symbols import SymbolTable
from ..tables import GdtEntry, IdtEntry, decode_gdt, decode_idt, decode_tss

__all__ = [
    "ContextView",
    "describe_context",
    "describe_gdt",
    "describe_idt",
    "describe_idt_entry",
    "describe_registers",
    "describe_tss_block",
    "gdt_to_json",
    "idt_to_json",
    "tss_to_json",
]

_FLAG_TYPES = {"cr0": CR0, "cr4": CR4}


class ContextView(Protocol):
    """What the describers read (a KernelContext satisfies it)."""

    @property
    def mem(self) -> Any: ...
    @property
    def cpu(self) -> CpuState: ...
    @property
    def symbols(self) -> SymbolTable: ...
    def virt_to_phys(self, va: int) -> int: ...


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
        lines.append("  ".join(f"{n:<3} {cpu.regs.get(n, 0):#018x}" for n in names[i : i + 4]))
    rip = cpu.regs.get("rip", 0)
    lines.append(f"rip {rip:#018x} {_symbol(ctx, rip)}")
    rflags = cpu.regs.get("rflags", 0)
    lines.append(f"rflags {rflags:#x} [{describe_flags(rflags, RFLAGS)}]")
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


def _symbol(ctx: ContextView, address: int) -> str:
    hit = ctx.symbols.lookup(address)
    return f"<{hit}>" if hit else ""


def _gdt(ctx: ContextView) -> list[GdtEntry]:
    return decode_gdt(ctx.mem, ctx.cpu, ctx.virt_to_phys)


def _idt(ctx: ContextView) -> list[IdtEntry]:
    return decode_idt(ctx.mem, ctx.cpu, ctx.virt_to_phys)


def describe_gdt(ctx: ContextView) -> str:
    """One line per slot the GDTR limit covers (upper halves of 16-byte ones skipped)."""
    lines = []
    for entry in _gdt(ctx):
        if entry.descriptor is None:
            continue
        lines.append(f"[{entry.index:3}] {entry.selector:#06x}  {entry.descriptor}")
    return "\n".join(lines)


def describe_idt_entry(ctx: ContextView, entry: IdtEntry) -> str:
    """``0x03 #BP int-gate sel=0x0010 off=… ist=0 dpl=3 P <bp_handler>``."""
    name = exception_name(entry.vector)
    text = f"{entry.vector:#04x} {name:<11} {entry.gate} {_symbol(ctx, entry.gate.offset)}"
    return text.rstrip()


def describe_idt(ctx: ContextView, vector: int | None = None) -> str:
    """Every present gate, or the one for ``vector`` (present or not)."""
    entries = _idt(ctx)
    if vector is not None:
        if vector >= len(entries):
            raise KctxError(f"vector {vector:#x} is beyond the IDT limit {ctx.cpu.idtr.limit:#x}")
        return describe_idt_entry(ctx, entries[vector])
    return "\n".join(describe_idt_entry(ctx, e) for e in entries if e.gate.p)


def describe_tss_block(ctx: ContextView) -> str:
    tss = decode_tss(ctx.mem, ctx.cpu, ctx.virt_to_phys)
    lines = [f"rsp{n:<2} {getattr(tss, f'rsp{n}'):#018x}" for n in range(3)]
    lines += [f"ist{n:<2} {v:#018x}" for n, v in enumerate(tss.ist, start=1) if v]
    lines.append(f"iomap_base {tss.iomap_base:#x}")
    return "\n".join(lines)


def idt_to_json(ctx: ContextView) -> list[dict[str, Any]]:
    """Every gate the IDTR limit covers, integers as numbers."""
    out = []
    for entry in _idt(ctx):
        gate = entry.gate
        hit = ctx.symbols.lookup(gate.offset)
        out.append(
            {
                "vector": entry.vector,
                "name": exception_name(entry.vector),
                "present": gate.p,
                "kind": gate.kind,
                "type": gate.type,
                "selector": gate.selector,
                "offset": gate.offset,
                "ist": gate.ist,
                "dpl": gate.dpl,
                "symbol": str(hit) if hit else None,
            }
        )
    return out


def gdt_to_json(ctx: ContextView) -> list[dict[str, Any]]:
    """Every decoded slot: index, selector, kind, DPL, present, base, limit, raw."""
    out = []
    for entry in _gdt(ctx):
        desc = entry.descriptor
        if desc is None:
            continue
        item: dict[str, Any] = {"index": entry.index, "selector": entry.selector, "raw": desc.raw}
        if isinstance(desc, SystemDescriptor | SegmentDescriptor):
            item.update(
                kind="null" if getattr(desc, "is_null", False) else desc.kind,
                dpl=desc.dpl,
                present=desc.p,
                base=desc.base,
                limit=desc.effective_limit,
            )
        out.append(item)
    return out


def tss_to_json(ctx: ContextView) -> dict[str, Any]:
    tss = decode_tss(ctx.mem, ctx.cpu, ctx.virt_to_phys)
    return {
        "rsp": [tss.rsp0, tss.rsp1, tss.rsp2],
        "ist": list(tss.ist),
        "iomap_base": tss.iomap_base,
    }


def describe_context(ctx: KernelContext) -> str:
    """Registers, then each descriptor table; a table that cannot be read says why."""
    src = ctx.snapshot.source
    title = src.get("description") or src.get("tool") or "snapshot"
    parts = [f"== {title}", describe_registers(ctx)]
    tables = (("GDT", describe_gdt), ("IDT", describe_idt), ("TSS", describe_tss_block))
    for heading, render in tables:
        try:
            body = render(ctx)
        except KctxError as e:
            body = f"(unreadable: {e})"
        parts.append(f"== {heading}\n{body}")
    return "\n".join(parts)
