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
from pathlib import Path

__all__ = ["CLIError", "build_parser", "folder_blocker", "main"]


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
        print(f"favor {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return 2


def _blocking_file(path: Path) -> Path | None:
    """``path`` or its nearest parent that exists as something other than a folder, or None."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def folder_blocker(path: Path) -> str | None:
    """Why the folder ``path`` cannot be created (``path`` or one of its parents is a regular
    file), or None."""
    blocking = _blocking_file(path)
    if blocking is None:
        return None
    if blocking == path:
        return f"cannot create folder {path}: a file of that name exists"
    return f"cannot create folder {path}: {blocking} is a file, not a folder"


def _describe(exc: BaseException) -> str:
    """The one-line message for ``exc``.  For a path that runs through a regular file, name that
    file instead of the OS's bare errno text: mkdir's "File exists" is a folder that could not be
    created; "Not a directory" can come from a read too, so its wording says only what is wrong."""
    if isinstance(exc, FileExistsError) and exc.filename:
        reason = folder_blocker(Path(exc.filename))
        if reason is not None:
            return reason
    if isinstance(exc, NotADirectoryError) and exc.filename:
        path = Path(exc.filename)
        blocking = _blocking_file(path)
        if blocking is not None and blocking != path:
            return f"{path}: {blocking} is a file, not a folder"
    return str(exc)
