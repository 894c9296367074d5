"""Page-table commands: pt walk, pt dump, pt find, pt check (each with --json)."""

from __future__ import annotations

import json
import re

from ..errors import CommandError
from ..pagetables.dump import format_ptdump, iter_mappings, mappings_to_json
from ..pagetables.pagemap import cross_check
from ..pagetables.render import render_walk, walk_to_json
from ..pagetables.reverse import reverse_map
from ..pagetables.walk import Access
from .dispatch import parse_int
from .preconditions import requires_paging
from .registry import Arg, ArgKind, Args, Flag, Output, command
from .render import symbolize
from .session import Session
from .styled import Styled, join_lines

__all__ = ["COMMANDS", "parse_range"]

_JSON = Flag("json", "print one JSON document")
_RANGE = re.compile(r"(?P<start>[^-\s]+)-(?P<end>[^-\s]+)")


def parse_range(session: Session, text: str | None) -> tuple[int, int] | None:
    """``START-END`` (literals), ``START END`` or ``START +LENGTH`` (expressions); end exclusive.

    :raises CommandError: malformed, or the end is not above the start.
    """
    if not text or not text.strip():
        return None
    text = text.strip()
    m = _RANGE.fullmatch(text)
    if m:
        start, end = parse_int(m.group("start"), "address"), parse_int(m.group("end"), "address")
    else:
        parts = text.split()
        if len(parts) != 2:
            raise CommandError(f"expected START-END or START END, got {text!r}")
        start = session.evaluate(parts[0])
        end = start + session.evaluate(parts[1][1:]) if parts[1].startswith("+") else None
        end = session.evaluate(parts[1]) if end is None else end
    if end <= start:
        raise CommandError(f"range end {end:#x} is not above its start {start:#x}")
    return start, min(end, 1 << 64)


@command(
    "pt walk",
    args=(Arg("expr", ArgKind.EXPR, "a virtual address"),),
    flags=(
        Flag("access", "check an access: read, write, fetch, with ',user'", "SPEC"),
        _JSON,
    ),
    examples=("pt walk $rip", "pt walk $rsp --access write,user", "pt walk bp_count --json"),
    category="paging",
    dont_repeat=True,
)
@requires_paging
def pt_walk(session: Session, args: Args) -> Output:
    """Walk the page tables for one address: every entry read, the translation, any fault.

    With `--access` the walk checks that access (`read`, `write`, `fetch`,
    plus `,user` for CPL3) against U/S, R/W, XD, SMEP, SMAP, WP and protection keys,
    and shows the #PF error code the processor would push.
    """
    access = Access.parse(args.access) if args.access else None
    result = session.target.translate(args.expr, access)
    if args.json:
        return json.dumps(walk_to_json(result), indent=1)
    return Styled(render_walk(result))


@command(
    "pt dump",
    args=(Arg("range", ArgKind.TEXT, "START-END or START END (end exclusive)", optional=True),),
    flags=(_JSON,),
    examples=("pt dump", "pt dump 0x400000-0x800000", "pt dump $rsp-0x1000 +0x2000"),
    category="paging",
    dont_repeat=True,
)
@requires_paging
def pt_dump(session: Session, args: Args) -> Output:
    """Dump the virtual address space layout, Linux ptdump style (coalesced ranges)."""
    target = session.target
    paging = target.paging
    va_range = parse_range(session, args.range)
    ranges = list(iter_mappings(target.mem, paging.root, paging.mode, paging.maxphyaddr, va_range))
    if args.json:
        return json.dumps(mappings_to_json(ranges), indent=1)
    return Styled(format_ptdump(ranges, mode=paging.mode).rstrip("\n"))


@command(
    "pt find",
    args=(Arg("expr", ArgKind.EXPR, "a physical address"),),
    flags=(_JSON,),
    examples=("pt find 0x300000", "pt find 0x1000000 --json"),
    category="paging",
    dont_repeat=True,
)
@requires_paging
def pt_find(session: Session, args: Args) -> Output:
    """List every virtual address mapping a physical address (reverse map)."""
    target = session.target
    paging = target.paging
    found = reverse_map(target.mem, paging.root, paging.mode, args.expr, paging.maxphyaddr)
    if args.json:
        return json.dumps({"phys": args.expr, "vas": found}, indent=1)
    if not found:
        return Styled(f"no virtual address maps physical {args.expr:#x}")
    return join_lines(
        Styled().add(f"{va:#018x}", "addr").add(symbolize(session.symbols, va), "sym")
        for va in found
    )


@command(
    "pt check",
    flags=(_JSON,),
    examples=("pt check", "pt check --json"),
    category="paging",
    dont_repeat=True,
)
@requires_paging
def pt_check(session: Session, args: Args) -> Output:
    """Cross-check the page tables against the /proc/PID/pagemap entries in the snapshot."""
    records = session.context.snapshot.pagemap
    if not records:
        raise CommandError("the snapshot holds no pagemap entries to check against")
    target = session.target
    paging = target.paging
    report = cross_check(
        target.mem, paging.root, paging.mode, {r.va: r.entry for r in records}, paging.maxphyaddr
    )
    if args.json:
        return json.dumps(report.to_json(), indent=1)
    return Styled(report.describe())


COMMANDS = (pt_walk, pt_dump, pt_find, pt_check)
