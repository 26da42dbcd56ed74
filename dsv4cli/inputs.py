"""What `dsv4 ask` was given: SOURCE paths, the question, and whether stdin is context.

The last argument is the question. Before it, SOURCEs are paths (`-` = stdin). With no
SOURCE and a piped stdin, stdin is the context (`git diff | dsv4 ask "review this"`); with
no SOURCE and a terminal on stdin, the question is asked alone (we never wait for typing).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dsv4cli.errors import EXIT_USAGE, CliError

STDIN = "-"


@dataclass(frozen=True)
class AskInputs:
    sources: tuple[str, ...]         # as given, '-' standing for stdin
    question: str
    stdin_text: str | None           # the text read from stdin, when stdin is context

    @property
    def has_context(self) -> bool:
        return bool(self.sources)

    @property
    def stdin_only(self) -> bool:
        """Piped text is the whole context (no SOURCE paths given)."""
        return self.sources == (STDIN,)


def stdin_is_piped(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stdin
    if stream is None or stream.closed:
        return False
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return False


def resolve_ask_arguments(arguments: list[str], *, stdin: TextIO | None = None) -> AskInputs:
    """Split `[SOURCE...] QUESTION`, check the SOURCE paths, read stdin when it is context."""
    stdin = stdin if stdin is not None else sys.stdin
    if not arguments:
        raise CliError("missing QUESTION", "usage: dsv4 ask [SOURCE...] QUESTION", exit_code=EXIT_USAGE)
    *sources, question = arguments
    if question == STDIN:
        raise CliError(
            "the last argument is the question, not '-'",
            'put the question last: dsv4 ask - "your question"',
            exit_code=EXIT_USAGE,
        )
    if not question.strip():
        raise CliError("the question is empty", 'usage: dsv4 ask [SOURCE...] "question"', exit_code=EXIT_USAGE)
    if sources.count(STDIN) > 1:
        raise CliError("'-' (stdin) can be given only once", exit_code=EXIT_USAGE)
    for source in sources:
        if source != STDIN and not Path(source).expanduser().exists():
            raise CliError(
                f"no such file or directory: {source}",
                "SOURCEs are paths and the last argument is the question; quote a question with spaces",
            )

    if STDIN in sources:
        return AskInputs(tuple(sources), question, _read(stdin))
    if not sources and stdin_is_piped(stdin):
        text = _read(stdin)
        # An empty pipe (`< /dev/null`, a script with nothing to say) means no context.
        if text.strip():
            return AskInputs((STDIN,), question, text)
    return AskInputs(tuple(sources), question, None)


def _read(stream: TextIO) -> str:
    try:
        return stream.read()
    except UnicodeDecodeError as exc:
        raise CliError(f"stdin is not valid text ({exc.reason})", "pipe UTF-8 text, or pass the file as a SOURCE") from None
