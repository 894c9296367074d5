"""The ``kctx-debug`` command line: the one place that sees every layer.

Every :class:`~kctx_debug.errors.KctxError` (usage errors included) becomes one
line on stderr and a non-zero exit; layers are imported only when a verb needs
them, so offline verbs never load Unicorn.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import CommandError, KctxError

__all__ = ["demo_snapshot_path", "main"]

PROG = "kctx-debug"


def demo_snapshot_path() -> Path:
    """The bundled demo snapshot, shipped inside the package."""
    return Path(str(resources.files("kctx_debug.demo") / "demo.json"))


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (try '{self.prog} --help')")


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
    if hi > 1 << 64:
        raise argparse.ArgumentTypeError(f"range end {hi:#x} is beyond the 64-bit address space")
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"range end {hi:#x} is not above start {lo:#x}")
    return lo, hi


def _add_snapshot_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument(
        "snapshot",
        nargs="?" if optional else None,
        help="kctx JSON snapshot or QEMU dump-guest-memory ELF core"
        + ("; default: the bundled demo" if optional else ""),
    )
    p.add_argument("--cpu", type=int, default=0, help="vCPU of a QEMU dump (default 0)")
    p.add_argument("--symbols", help="System.map, kallsyms or vmlinux for a QEMU dump")
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
    return open_context(
        path, allow_outside=args.allow_outside_paths, cpu=args.cpu, symbols=args.symbols
    )


def _cmd_ptdump(args: argparse.Namespace) -> int:
    from .pagetables.dump import dump_layout, format_ptdump, mappings_to_json

    ctx = _open(args)
    try:
        root = ctx.paging.table_root(args.cr3 if args.cr3 is not None else ctx.cpu.cr3)
        layout = dump_layout(ctx.mem, root, ctx.mode, ctx.paging.maxphyaddr, args.range)
        if args.json:
            doc = {
                "ranges": mappings_to_json(layout.ranges),
                "anomalies": [a.to_json() for a in layout.anomalies],
            }
            print(json.dumps(doc, indent=1))
        else:
            sys.stdout.write(format_ptdump(layout.ranges, mode=ctx.mode))
            for anomaly in layout.anomalies:
                print(f"kctx-debug: note: {anomaly}", file=sys.stderr)
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
        return 0 if result.ok and result.fault is None else 2
    finally:
        ctx.close()


def _cmd_import(args: argparse.Namespace) -> int:
    from .qemu_dump import import_qemu_dump

    snap = import_qemu_dump(args.dump, args.output, cpu=args.cpu, symbols=args.symbols)
    src = snap.source
    print(f"wrote {args.output}: vCPU {args.cpu}, {len(snap.memory)} memory ranges in place")
    if src.get("inferred"):
        print(f"inferred (not in the dump): {', '.join(src['inferred'])}")
    if "kaslr" in src:
        print(f"kaslr: {src['kaslr']}")
    if src.get("needs_allow_outside_paths"):
        print("note: the dump lies outside the document's folder: open with --allow-outside-paths")
    return 0


def _main_parser() -> argparse.ArgumentParser:
    from .repl.main import add_repl_arguments, repl_main

    p = _Parser(
        prog=PROG,
        description="x86-64 kernel-context emulator and debugger.",
        epilog="verbs: " + ", ".join(_VERB_PARSERS) + " (run '%(prog)s VERB --help')",
    )
    _add_snapshot_args(p, optional=True)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_repl_arguments(p)
    p.set_defaults(func=repl_main)
    return p


def _ptdump_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} ptdump", description="Dump the page-table layout in Linux ptdump format."
    )
    _add_snapshot_args(p)
    p.add_argument("--cr3", type=_parse_int, help="walk from this CR3 instead of the CPU's")
    p.add_argument("--range", type=_parse_range, metavar="START-END", help="only this VA range")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=_cmd_ptdump)
    return p


def _translate_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} translate",
        description="Walk the page tables for one virtual address, every level shown.",
    )
    _add_snapshot_args(p)
    p.add_argument("va", type=_parse_int, help="virtual address (exit status 2 if it faults)")
    p.add_argument("--access", help="check an access, e.g. 'write,user' or 'fetch'")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=_cmd_translate)
    return p


def _import_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} import",
        description="Convert a QEMU dump-guest-memory ELF core into a snapshot document "
        "whose memory references the ELF in place.",
    )
    p.add_argument("dump", help="QEMU ELF core")
    p.add_argument("-o", "--output", required=True, help="snapshot document to write")
    p.add_argument("--cpu", type=int, default=0, help="vCPU to take (default 0)")
    p.add_argument("--symbols", help="System.map, kallsyms or vmlinux")
    p.set_defaults(func=_cmd_import)
    return p


def _capture_parser() -> argparse.ArgumentParser:
    from .capture.capture import add_capture_arguments

    p = _Parser(
        prog=f"{PROG} capture",
        description="Capture a running process into a kernel-context snapshot (ptrace).",
    )
    add_capture_arguments(p)
    return p


def _record_parser() -> argparse.ArgumentParser:
    from .traps.replay import add_record_arguments

    p = _Parser(
        prog=f"{PROG} record",
        description="Run a snapshot with every trap delivered and record the trap log.",
    )
    add_record_arguments(p)
    return p


def _replay_parser() -> argparse.ArgumentParser:
    from .traps.replay import add_replay_arguments

    p = _Parser(
        prog=f"{PROG} replay",
        description="Re-run a recorded trace; exit 1 with the first divergent event and field.",
    )
    add_replay_arguments(p)
    return p


# Each verb's parser is built only when that verb runs, so offline verbs
# (ptdump, translate, import) never import Unicorn, capstone or prompt-toolkit.
_VERB_PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "ptdump": _ptdump_parser,
    "translate": _translate_parser,
    "import": _import_parser,
    "capture": _capture_parser,
    "record": _record_parser,
    "replay": _replay_parser,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        verb = _VERB_PARSERS.get(argv[0]) if argv else None
        if verb is not None:
            args = verb().parse_args(argv[1:])
        else:
            args = _main_parser().parse_args(argv)
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
