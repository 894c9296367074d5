"""Registers and CPU state as styled text (``info registers``, ``info cpu``).

Renderers take plain values (a :class:`~kctx_debug.snapshot.CpuState`, a symbol
table) and return :class:`~.styled.Styled`; they read nothing themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..arch.bits import CR0, CR4, EFER, RFLAGS, BitField, describe_flags
from ..arch.descriptors import SegmentDescriptor, Selector, describe_selector
from ..arch.registers import RegisterGroup
from ..qemu_dump import ACCESS_RIGHTS_MOVES
from ..snapshot import SEGMENT_REGISTERS, CpuState, Segment
from ..symbols import SymbolTable
from .styled import Styled

__all__ = [
    "REGISTER_GROUPS",
    "describe_segment_attributes",
    "render_cpu_info",
    "render_register",
    "render_register_group",
    "symbolize",
]

# IA32_STAR (SDM vol. 3A 5.8.8): SYSCALL CS in 47:32 (SS = CS + 8), SYSRET base in 63:48.
STAR_SYSCALL_CS = BitField("SYSCALL_CS", 32, 16)
STAR_SYSRET_BASE = BitField("SYSRET_BASE", 48, 16)
# Flag-valued registers: their decoded bits follow the value.
_FLAG_TYPES = {"cr0": CR0, "cr4": CR4, "efer": EFER, "rflags": RFLAGS, "sfmask": RFLAGS}
# Registers whose value is a code or data address worth a symbol.
_ADDRESS_REGISTERS = frozenset(
    {"rip", "rsp", "rbp", "lstar", "cstar", "fs_base", "gs_base", "kernel_gs_base", "cr2"}
)
REGISTER_GROUPS = ("general", "segment", "control", "table", "msr", "all")
_MSR_SHOWN = (
    "efer", "star", "lstar", "cstar", "sfmask", "fs_base", "gs_base", "kernel_gs_base",
    "tsc_aux", "pat", "pkru",
)  # fmt: skip
_NAME_WIDTH = 15


def symbolize(symbols: SymbolTable | None, address: int) -> str:
    """`` <name+0x10>`` when ``address`` is inside a symbol, else ``""``."""
    hit = symbols.lookup(address) if symbols is not None else None
    return f" <{hit}>" if hit is not None else ""


def describe_segment_attributes(attributes: int) -> str:
    """``code64 DPL3 P L`` for a VMCS access-rights word (the snapshot's segment layout)."""
    high = 0
    for in_descriptor, in_attributes in ACCESS_RIGHTS_MOVES:
        high = in_descriptor.insert(high, in_attributes.extract(attributes))
    desc = SegmentDescriptor.from_int(high << 32)
    if desc.is_null and not attributes:
        return "unusable"
    flags = [name for on, name in ((desc.g, "G"), (desc.l, "L"), (desc.db, "D/B")) if on]
    return " ".join([desc.kind, f"DPL{desc.dpl}", "P" if desc.p else "NP", *flags])


def _segment_line(name: str, seg: Segment, changed: bool) -> Styled:
    out = Styled().add(f"{name:<{_NAME_WIDTH}}", "reg")
    out.add(describe_selector(Selector.from_int(seg.selector)), "changed" if changed else "value")
    if seg.base is not None:
        out.add(f"  base={seg.base:#x}", "dim")
    if seg.limit is not None:
        out.add(f" limit={seg.limit:#x}", "dim")
    if seg.attributes is not None:
        out.add(f" attr={seg.attributes:#x} ", "dim")
        out.add(describe_segment_attributes(seg.attributes), "flag")
    return out


def _value_line(
    name: str, value: int, symbols: SymbolTable | None, changed: bool = False
) -> Styled:
    out = Styled().add(f"{name:<{_NAME_WIDTH}}", "reg")
    out.add(f"0x{value:016x}", "changed" if changed else "value")
    flag_type = _FLAG_TYPES.get(name)
    if flag_type is not None:
        flags = describe_flags(value, flag_type)
        out.add(f"  [{flags if flags != '0' else ' '}]", "flag")
    elif name == "star":
        out.add(
            f"  syscall cs={STAR_SYSCALL_CS.extract(value):#x}"
            f" sysret base={STAR_SYSRET_BASE.extract(value):#x}",
            "dim",
        )
    elif name == "cr3":
        out.add(f"  root={value & ~0xFFF & ((1 << 52) - 1):#x}", "dim")
    elif name in _ADDRESS_REGISTERS:
        out.add(symbolize(symbols, value), "sym")
    elif name in RegisterGroup.GENERAL.names:
        signed = value - (1 << 64) if value >> 63 else value
        out.add(f"  {signed}", "dim")
    return out


def render_register_group(
    cpu: CpuState,
    group: str,
    symbols: SymbolTable | None = None,
    changed: Iterable[str] = (),
) -> Styled:
    """One register per line for ``group`` (one of :data:`REGISTER_GROUPS`).

    ``changed`` names registers to highlight (they changed since the last stop).
    """
    moved = set(changed)
    lines: list[Styled] = []
    if group in ("general", "all"):
        for name in RegisterGroup.GENERAL.names:
            lines.append(_value_line(name, cpu.reg(name), symbols, name in moved))
    if group in ("segment", "all"):
        for name in SEGMENT_REGISTERS:
            seg = cpu.segments.get(name, Segment(0))
            lines.append(_segment_line(name, seg, name in moved))
    if group in ("control", "all"):
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8"):
            lines.append(_value_line(name, getattr(cpu, name), symbols, name in moved))
    if group in ("table", "all"):
        for name, table in (("gdtr", cpu.gdtr), ("idtr", cpu.idtr)):
            lines.append(
                Styled()
                .add(f"{name:<{_NAME_WIDTH}}", "reg")
                .add(f"base={table.base:#x} limit={table.limit:#x}", "value")
            )
        lines.append(_segment_line("tr", cpu.tr, "tr" in moved))
        lines.append(_segment_line("ldtr", cpu.ldtr, "ldtr" in moved))
    if group in ("msr", "all"):
        for name in _MSR_SHOWN:
            if name in cpu.msrs or name == "efer":
                lines.append(_value_line(name, cpu.msrs.get(name, 0), symbols, name in moved))
    out = Styled()
    for i, line in enumerate(lines):
        if i:
            out.newline()
        out.extend(line)
    return out


def render_register(name: str, value: int, symbols: SymbolTable | None = None) -> Styled:
    """One register (or sub-register) with its decoding: flags, symbol or signed value."""
    return _value_line(name, value, symbols)


def render_segment(name: str, seg: Segment) -> Styled:
    return _segment_line(name, seg, False)


def render_cpu_info(
    cpu: CpuState, levels: int, pending: str | None, symbols: SymbolTable | None = None
) -> Styled:
    """``info cpu``: execution mode, CPL, paging, interrupt flag, the pending trap."""
    cs = cpu.segments.get("cs", Segment(0))
    long_mode = bool(cpu.efer & EFER.LMA)
    code64 = cs.attributes is not None and describe_segment_attributes(cs.attributes).startswith(
        "code64"
    )
    if not cpu.cr0 & CR0.PE:
        mode = "real mode"
    elif long_mode:
        mode = "64-bit mode (IA-32e)" if code64 or cs.attributes is None else "compatibility mode"
    else:
        mode = "protected mode"
    paging = "off"
    if cpu.cr0 & CR0.PG:
        extras = [
            name
            for on, name in (
                (cpu.cr0 & CR0.WP, "WP"),
                (cpu.efer & EFER.NXE, "NXE"),
                (cpu.cr4 & CR4.SMEP, "SMEP"),
                (cpu.cr4 & CR4.SMAP, "SMAP"),
                (cpu.cr4 & CR4.PKE, "PKE"),
                (cpu.cr4 & CR4.PCIDE, "PCID"),
            )
            if on
        ]
        paging = f"{levels}-level" + (f" ({' '.join(extras)})" if extras else "")
    rflags = cpu.regs.get("rflags", 0)
    rows: Mapping[str, str] = {
        "mode": mode,
        "CPL": str(cpu.cpl),
        "paging": paging,
        "IF": "1 (interrupts enabled)" if rflags & RFLAGS.IF else "0 (interrupts disabled)",
        "rip": f"{cpu.regs.get('rip', 0):#x}{symbolize(symbols, cpu.regs.get('rip', 0))}",
        "pending trap": pending or "none",
    }
    out = Styled()
    for i, (key, value) in enumerate(rows.items()):
        if i:
            out.newline()
        out.add(f"{key:<14}", "reg").add(value, "trap" if key == "pending trap" and pending else "")
    return out
