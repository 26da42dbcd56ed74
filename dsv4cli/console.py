"""Terminal output policy: the payload goes to stdout, everything else to stderr.

Rich's Console already honours NO_COLOR, FORCE_COLOR and TERM=dumb and only colours a
terminal; these helpers make sure nobody builds a console that writes chatter to stdout.
"""

from __future__ import annotations

import functools
import sys
from typing import IO, Any

from rich.console import Console


def stderr_console(file: IO[str] | None = None, **options: Any) -> Console:
    """How the stderr console is set up; `file` and `options` (width, color_system) let golden
    tests build the very same console over a buffer."""
    return Console(file=file or sys.stderr, stderr=file is None, highlight=False, soft_wrap=True, **options)


@functools.lru_cache(maxsize=1)
def _stderr_console(stream_id: int) -> Console:
    return stderr_console()


def err() -> Console:
    """The console for progress, stats and warnings (stderr)."""
    return _stderr_console(id(sys.stderr))


def warn(message: str) -> None:
    err().print(f"[yellow]warning:[/yellow] {message}", markup=True)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
