"""Turn the library's typed errors into one-line messages and exit codes.

Exit codes: 0 ok, 1 error, 2 usage, 130 interrupted. `DSV4_DEBUG=1` re-raises so the
traceback shows (typer never prints local variables: see app.py).
"""

from __future__ import annotations

import os
import sys

from engine.errors import EngineError
from ingest.errors import IngestError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error detected by the CLI itself (bad combination of options, unreadable input)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


def debug_enabled() -> bool:
    return os.environ.get("DSV4_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def format_error(message: str, hint: str | None = None) -> str:
    line = f"Error: {one_line(message)}"
    if hint:
        line += f" ({one_line(hint)})"
    return line


def report(exc: BaseException) -> int:
    """Print `exc` as one line on stderr and return the exit code for it."""
    if isinstance(exc, CliError):
        code, hint = exc.exit_code, exc.hint
    elif isinstance(exc, (IngestError, EngineError)):
        code, hint = EXIT_ERROR, exc.hint
    elif isinstance(exc, MemoryError):
        code, hint = EXIT_ERROR, "the input is too large for this machine; try --budget"
    elif isinstance(exc, OSError):
        code, hint = EXIT_ERROR, None
        name = getattr(exc, "filename", None)
        message = f"{exc.strerror or exc}: {name}" if name else str(exc)
        print(format_error(message, hint), file=sys.stderr)
        return code
    else:
        code, hint = EXIT_ERROR, "set DSV4_DEBUG=1 for a traceback"
        print(format_error(f"{type(exc).__name__}: {exc}", hint), file=sys.stderr)
        return code
    print(format_error(str(exc), hint), file=sys.stderr)
    return code
