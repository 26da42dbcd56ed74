"""Reading `dsv4 chat` messages: an editing prompt on a terminal, plain lines from a pipe.

Both sources follow the same multi-line rules, so a piped script reads like a typed session:
- a line ending in a backslash continues on the next line (the backslash is dropped);
- a line starting with `\"\"\"` opens a block that runs to a line ending in `\"\"\"`.
On a terminal, Esc then Enter (or Alt+Enter) also inserts a newline. `read()` raises
EOFError at the end (Ctrl-D) and, on a terminal, KeyboardInterrupt for a Ctrl-C at the prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TextIO

from engine import paths

HISTORY_FILE = "chat_history"
BLOCK_QUOTE = '"""'
PROMPT = ">>> "
CONTINUATION = "... "


class MessageSource(Protocol):
    def read(self) -> str: ...


def history_path() -> Path:
    return paths.logs_dir() / HISTORY_FILE


def join_lines(first: str, next_line: Callable[[], str]) -> str:
    """One message from its first line, pulling more lines while the rules above ask for them."""
    if first.lstrip().startswith(BLOCK_QUOTE):
        body = first.lstrip()[len(BLOCK_QUOTE):]
        lines: list[str] = []
        while not body.rstrip().endswith(BLOCK_QUOTE):
            lines.append(body)
            try:
                body = next_line()
            except EOFError:
                return "\n".join(lines).strip("\n")  # an unclosed block ends with the input
        lines.append(body.rstrip()[: -len(BLOCK_QUOTE)])
        return "\n".join(lines).strip("\n")
    lines = []
    line = first
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = next_line()
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


class PipedMessages:
    """One message per line of a non-terminal stdin; no prompts are drawn."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdin

    def _line(self) -> str:
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").rstrip("\r")

    def read(self) -> str:
        return join_lines(self._line(), self._line)


class TerminalMessages:
    """prompt_toolkit's line editor, with history kept in `<DSV4_HOME>/logs/chat_history`."""

    def __init__(self, history: Path | None = None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.output import create_output
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event) -> None:  # type: ignore[no-untyped-def]
            event.current_buffer.insert_text("\n")

        history = history or history_path()
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            stored = FileHistory(str(history))
        except OSError:
            stored = InMemoryHistory()  # an unwritable home still gets a working prompt
        # `dsv4 chat > answers.md`: the prompt is drawn on stderr so stdout keeps only answers
        output = None if sys.stdout.isatty() else create_output(stdout=sys.stderr)
        self._session = PromptSession(history=stored, key_bindings=bindings, prompt_continuation=CONTINUATION, output=output)

    def _continued(self) -> str:
        return self._session.prompt(CONTINUATION)

    def read(self) -> str:
        return join_lines(self._session.prompt(PROMPT), self._continued)


def message_source(stdin: TextIO | None = None) -> MessageSource:
    stdin = stdin if stdin is not None else sys.stdin
    try:
        interactive = stdin.isatty() and (sys.stdout.isatty() or sys.stderr.isatty())
    except (AttributeError, ValueError):
        interactive = False
    return TerminalMessages() if interactive else PipedMessages(stdin)
