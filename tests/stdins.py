"""Stand-ins for sys.stdin: the CLI reads piped stdin (as `dsv4 ask` context, as `dsv4 chat`
turns) and leaves a terminal alone, so each test says which one it runs under.

    PipedStdin(text): a pipe that holds text
    TerminalStdin(): a terminal; reading it fails the test
"""

from __future__ import annotations

import io


class PipedStdin(io.StringIO):
    def isatty(self) -> bool:
        return False


class TerminalStdin(io.StringIO):
    def isatty(self) -> bool:
        return True

    def read(self, *args: object) -> str:
        raise AssertionError("a terminal stdin must never be read")
