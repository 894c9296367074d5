"""``python -m kctx_debug.repl [SNAPSHOT]``: the REPL without the rest of the CLI."""

from __future__ import annotations

import argparse
import sys

from ..errors import KctxError
from .main import add_repl_arguments, repl_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kctx_debug.repl", description="The kctx-debug REPL on a snapshot."
    )
    parser.add_argument("snapshot", nargs="?", help="snapshot (kctx JSON or QEMU ELF core)")
    parser.add_argument("--allow-outside-paths", action="store_true")
    add_repl_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return repl_main(args)
    except KctxError as e:
        print(f"kctx-debug: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
