"""The ``fracstore`` command line: verbs that mirror the :class:`~fracstore.Store` API (docs/cli.md).

argparse rather than click: it is in the standard library, so the command adds no dependency (click is only present
as a test tool's dependency), and sub-parsers, repeatable options and typed arguments cover every verb.

Exit codes (documented in docs/cli.md and ``fracstore --help``): 0 ok, 1 error, 2 usage, 3 integrity, 4 not found.
:func:`main` holds the only broad ``try``: it maps errors to a one-line message and an exit code, and shows the
traceback only when ``FRACSTORE_DEBUG`` is set.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

from ..config import ENV_DEBUG
from ..errors import FracstoreError, IntegrityError, NotFoundError
from ..interop import LegacyFormatWarning
from .commands import Context, UsageError, build_parser

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_NOT_FOUND = 4
EXIT_INTERRUPTED = 130

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "exit_code_for",
    "main",
]


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error that reached :func:`main`."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def _show_warning(  # noqa: PLR0917 (the signature warnings.showwarning calls)
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # Warnings are messages for a person: one line on stderr, without the source line warnings normally shows.
    print(f"fracstore: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    ctx = Context(args)
    verb = " ".join(v for v in (args.verb, getattr(args, "cache_verb", None), getattr(args, "remote_verb", None)) if v)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", LegacyFormatWarning)  # the migration warning is for the user, every time
        try:
            code: Any = args.handler(ctx, args)
            return int(code)
        except BrokenPipeError:
            # The reader went away (`fracstore ls | head`): stop quietly, as other command-line tools do, and keep
            # the interpreter's exit-time flush of stdout from raising again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_ERROR
        except BaseException as exc:  # the one broad try: every error becomes a message and an exit code
            if isinstance(exc, SystemExit):
                raise
            code = exit_code_for(exc)
            if os.environ.get(ENV_DEBUG):
                traceback.print_exc(file=sys.stderr)
            if isinstance(exc, KeyboardInterrupt):
                print("fracstore: interrupted", file=sys.stderr)
            elif isinstance(exc, UsageError):
                print(f"usage: fracstore {verb} ...\nfracstore {verb}: error: {exc}", file=sys.stderr)
            elif isinstance(exc, FracstoreError | OSError):
                print(f"fracstore {verb}: error: {exc}", file=sys.stderr)
            else:
                print(
                    f"fracstore {verb}: internal error: {type(exc).__name__}: {exc}\n"
                    f"(set {ENV_DEBUG}=1 for the traceback, and please report it)",
                    file=sys.stderr,
                )
            return int(code)
