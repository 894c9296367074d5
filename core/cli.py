"""The ``kctx-debug`` command line: the one place that sees every layer.

Every :class:`~kctx_debug.errors.KctxError` becomes one line on stderr and a
non-zero exit; layers are imported only when a verb needs them, so offline
verbs never load Unicorn.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from . import __version__
from .errors import KctxError

__all__ = ["main", "demo_snapshot_path"]

PROG = "kctx-debug"


def demo_snapshot_path() -> Path:
    """The bundled demo snapshot, shipped inside the package."""
    return Path(str(resources.files("kctx_debug") / "demo" / "demo.json"))


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START-END, got {text!r}")
    lo, hi = _parse_int(start), _parse_int(end)
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"range end {hi:#x} is not above start {lo:#x}")
    return lo, hi


def _add_snapshot_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument(
        "snapshot",
        nargs="?" if optional else None,
        help="snapshot document (kctx JSON)" + ("; default: the bundled demo" if optional else ""),
    )
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let side files live outside the snapshot's folder",
    )


def _open(args: argparse.Namespace):
    from .pagetables.context import open_context

    path = args.snapshot or demo_snapshot_path()
    if not args.snapshot:
        print(f"(no snapshot given: opening the bundled demo {path})", file=sys.stderr)
    return open_context(path, allow_outside=args.allow_outside_paths)


def _cmd_summary(args: argparse.Namespace) -> int:
    from .repl.summary import describe_context

    ctx = _open(args)
    try:
        print(describe_context(ctx))
    finally:
        ctx.close()
    return 0


def _cmd_ptdump(args: argparse.Namespace) -> int:
    from .pagetables.dump import format_ptdump, iter_mappings, mappings_to_json

    ctx = _open(args)
    try:
        cr3 = args.cr3 if args.cr3 is not None else ctx.cpu.cr3
        root = ctx.paging.table_root(cr3)
        ranges = list(iter_mappings(ctx.mem, root, ctx.mode, va_range=args.range))
        if args.json:
            print(json.dumps(mappings_to_json(ranges), indent=1))
        else:
            sys.stdout.write(format_ptdump(ranges, mode=ctx.mode))
    finally:
        ctx.close()
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from .pagetables.render import render_walk, walk_to_json
    from .pagetables.walk import Access

    ctx = _open(args)
    try:
        access = Access.parse(args.access) if args.access else None
        result = ctx.translate(args.va, access)
        if args.json:
            print(json.dumps(walk_to_json(result), indent=1))
        else:
            print(render_walk(result))
        return 0 if result.fault is None and result.phys is not None else 2
    finally:
        ctx.close()


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    verbs: dict[str, argparse.ArgumentParser] = {}
    main = argparse.ArgumentParser(
        prog=PROG,
        description="x86-64 kernel-context emulator and debugger.",
        epilog="verbs: ptdump, translate (run '%(prog)s VERB --help')",
    )
    _add_snapshot_args(main, optional=True)
    main.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    main.set_defaults(func=_cmd_summary)

    p = argparse.ArgumentParser(
        prog=f"{PROG} ptdump",
        description="Dump the page-table layout in Linux ptdump format.",
    )
    _add_snapshot_args(p)
    p.add_argument("--cr3", type=_parse_int, help="walk from this CR3 instead of the CPU's")
    p.add_argument("--range", type=_parse_range, metavar="START-END", help="only this VA range")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=_cmd_ptdump)
    verbs["ptdump"] = p

    p = argparse.ArgumentParser(
        prog=f"{PROG} translate",
        description="Walk the page tables for one virtual address, every level shown.",
    )
    _add_snapshot_args(p)
    p.add_argument("va", type=_parse_int, help="virtual address")
    p.add_argument("--access", help="check an access, e.g. 'write,user' or 'fetch'")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=_cmd_translate)
    verbs["translate"] = p
    return main, verbs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    main_parser, verbs = _build_parser()
    parser = verbs.get(argv[0], main_parser) if argv else main_parser
    rest = argv[1:] if parser is not main_parser else argv
    try:
        args = parser.parse_args(rest)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except KctxError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
