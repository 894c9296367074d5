"""Decoded GDT, IDT and TSS of a kernel context, as text and as JSON.

The REPL's ``info gdt``/``info idt``/``info tss``
render the same pieces. Every function takes a :class:`ContextView`: a
:class:`~kctx_debug.pagetables.context.KernelContext`, or any object with the same
``mem``, ``cpu``, ``virt_to_phys`` and ``symbols`` (the REPL's view of a running
machine).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..arch.descriptors import (
    SegmentDescriptor,
    SystemDescriptor,
)
from ..arch.vectors import exception_name
from ..errors import KctxError
from ..snapshot import CpuState
from ..symbols import SymbolTable
from ..tables import GdtEntry, IdtEntry, decode_gdt, decode_idt, decode_tss

__all__ = [
    "ContextView",
    "describe_gdt",
    "describe_idt",
    "describe_idt_entry",
    "describe_tss_block",
    "gdt_to_json",
    "idt_to_json",
    "tss_to_json",
]


class ContextView(Protocol):
    """What the describers read (a KernelContext satisfies it)."""

    @property
    def mem(self) -> Any: ...
    @property
    def cpu(self) -> CpuState: ...
    @property
    def symbols(self) -> SymbolTable: ...
    def virt_to_phys(self, va: int) -> int: ...


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
