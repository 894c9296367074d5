"""Descriptor-table commands: info idt, info gdt, info tss (decoded, symbolized, --json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..arch.descriptors import describe_layout
from ..arch.vectors import FIRST_USER_VECTOR, exception_info
from ..errors import CommandError
from ..snapshot import CpuState
from ..symbols import SymbolTable
from ..tables import decode_idt
from . import summary
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .session import Session
from .styled import Styled

__all__ = ["COMMANDS", "TableView"]

_JSON = Flag("json", "print one JSON document")


@dataclass(frozen=True)
class TableView:
    """The session's current target seen as a :class:`~.summary.ContextView`."""

    mem: Any
    cpu: CpuState
    symbols: SymbolTable
    _translate: Any

    def virt_to_phys(self, va: int) -> int:
        return self._translate(va)

    @classmethod
    def of(cls, session: Session) -> TableView:
        target = session.target
        return cls(target.mem, target.cpu, session.symbols, target.virt_to_phys)


@command(
    "info idt",
    args=(Arg("vector", ArgKind.VECTOR, "one vector (number or #PF-style name)", optional=True),),
    flags=(_JSON,),
    examples=("info idt", "info idt 3", "info idt #PF --json"),
    category="tables",
    dont_repeat=True,
)
def info_idt(session: Session, args: Args) -> Output:
    """Decode the IDT: each present gate's type, selector, handler (symbolized), IST, DPL.

    With a vector, that gate alone (present or not) with its SDM field layout and
    the exception it is for.
    """
    view = TableView.of(session)
    if args.json:
        gates = summary.idt_to_json(view)
        if args.vector is not None:
            return json.dumps(_only(gates, args.vector), indent=1)
        return json.dumps(gates, indent=1)
    if args.vector is None:
        return Styled(summary.describe_idt(view))
    entries = decode_idt(view.mem, view.cpu, view.virt_to_phys)
    if args.vector >= len(entries):
        raise CommandError(
            f"vector {args.vector:#x} is beyond the IDT limit {view.cpu.idtr.limit:#x}"
        )
    entry = entries[args.vector]
    out = Styled(summary.describe_idt_entry(view, entry))
    if args.vector < FIRST_USER_VECTOR:
        info = exception_info(args.vector)
        kind = info.kind.value if info.kind else "reserved"
        code = "pushes an error code" if info.error_code else "no error code"
        out.newline().add(f"{info.description} ({kind}, {code})", "dim")
    return out.newline().add(describe_layout(entry.gate))


def _only(gates: list[dict[str, Any]], vector: int) -> dict[str, Any]:
    for gate in gates:
        if gate["vector"] == vector:
            return gate
    raise CommandError(f"vector {vector:#x} is beyond the IDT limit")


@command(
    "info gdt",
    flags=(_JSON,),
    examples=("info gdt", "info gdt --json"),
    category="tables",
    dont_repeat=True,
)
def info_gdt(session: Session, args: Args) -> Output:
    """Decode the GDT: each slot's selector, kind, DPL, base, limit and flags."""
    view = TableView.of(session)
    if args.json:
        return json.dumps(summary.gdt_to_json(view), indent=1)
    return Styled(summary.describe_gdt(view))


@command(
    "info tss",
    flags=(_JSON,),
    examples=("info tss", "info tss --json"),
    category="tables",
    dont_repeat=True,
)
def info_tss(session: Session, args: Args) -> Output:
    """Decode the 64-bit TSS that TR names: RSP0-2, the IST stacks, the I/O map base."""
    view = TableView.of(session)
    if args.json:
        return json.dumps(summary.tss_to_json(view), indent=1)
    out = Styled()
    tr = view.cpu.tr
    out.add(f"tr {tr.selector:#06x} base={tr.base or 0:#x} limit={tr.limit or 0:#x}", "dim")
    return out.newline().add(summary.describe_tss_block(view))


COMMANDS = (info_idt, info_gdt, info_tss)
