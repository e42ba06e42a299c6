"""The ``favor`` command line.  One module per command in this package; each defines

    def register(subparsers) -> None   # adds its sub-parser and sets ``func`` (args -> int exit code)

Commands are discovered from the modules present here, so adding a command touches no other file.
Errors meant for the user are raised as :class:`CLIError` (or ValueError/TypeError/OSError
from the library) and printed as one line without a traceback; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

__all__ = ["CLIError", "build_parser", "main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="favor", description="FAVOR+ (Performer) attention: training, generation and experiments."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # OSError: missing/unwritable paths; ArithmeticError: a diverging run (non-finite loss)
    except (CLIError, ValueError, TypeError, OSError, ArithmeticError) as exc:
        print(f"favor {args.command}: error: {exc}", file=sys.stderr)
        return 2
