"""How answers, progress and model lists look in a terminal and in a pipe.

The answer goes to stdout: live-rendered Markdown on a terminal, raw text deltas (flushed
as they come) in a pipe, one JSON object with --json. Everything else (download bars,
the prefill/decode status line, -v statistics) goes to stderr and is drawn only when
stderr is a terminal. A terminal cannot host two live regions at once, so the stderr status
line shows while the prompt is read and, once the answer starts on the same terminal, it
moves into the answer's live region (transient: it is gone when the answer is complete).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, Literal

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from dsv4cli import console as consoles
from engine.events import Done, Event, PrefillProgress, TextDelta

AnswerMode = Literal["markdown", "plain", "json"]
_REFRESH_PER_SECOND = 4  # each refresh re-renders the Markdown; keep the decode loop's CPU


def stdout_console(file: IO[str] | None = None, **options: Any) -> Console:
    """The payload's console; `file` and `options` as for `console.stderr_console`."""
    return Console(file=file or sys.stdout, highlight=False, soft_wrap=False, **options)


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


# ---------------------------------------------------------------- downloads


@contextlib.contextmanager
def transfer_progress(console: Console | None = None) -> Iterator[Callable[[str, int, int | None], None]]:
    """A `progress(label, done, total)` callback for the model store: Rich bars on a terminal,
    one line per step otherwise. Safe to call from the store's polling thread."""
    console = console or consoles.err()
    if not console.is_terminal:
        announced: set[str] = set()

        def log_step(label: str, done: int, total: int | None) -> None:
            if label not in announced:
                announced.add(label)
                console.print(f"{label}" + (f" ({human_bytes(total)})" if total else "") + " …", markup=False)

        yield log_step
        return

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(label: str, done: int, total: int | None) -> None:
        if not tasks:
            bars.start()  # only once something is fetched: a present model draws nothing
        task = tasks.get(label)
        if task is None:
            for other in tasks.values():  # steps run one after another
                bars.update(other, completed=bars.tasks[other].total or bars.tasks[other].completed)
            task = tasks[label] = bars.add_task(label, total=total)
        bars.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bars.stop()


@contextlib.contextmanager
def working(message: str, console: Console | None = None) -> Iterator[None]:
    """A spinner on stderr for a step without counts (loading, packing); silent in a pipe."""
    console = console or consoles.err()
    if not console.is_terminal:
        yield
        return
    with console.status(Text(message, style="dim"), spinner="dots"):
        yield


# ---------------------------------------------------------------- the answer


class _Tail:
    """The last lines of a renderable that fit the screen, plus an optional status line:
    a live region taller than the terminal cannot be redrawn, so while streaming only the
    tail is shown and the whole answer is printed once at the end."""

    def __init__(self, body: Any, status: Text | None):
        self.body = body
        self.status = status

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        reserved = 1 if self.status is not None else 0
        room = max(1, console.size.height - 1 - reserved)
        lines = console.render_lines(self.body, options, pad=False)
        for line in lines[-room:]:
            yield from line
            yield Segment.line()
        if self.status is not None:
            yield self.status


class StatusLine:
    """Counts and rates for the status line, from events and our own clock."""

    def __init__(self, model_name: str, clock: Callable[[], float] = time.monotonic):
        self.model_name = model_name
        self.clock = clock
        self.prefill_done = 0
        self.prefill_total = 0
        self._prefill_start: tuple[float, int] | None = None
        self._prefill_rate: float | None = None
        self.completion_tokens = 0
        self._decode_start: tuple[float, int] | None = None

    def on_prefill(self, event: PrefillProgress) -> None:
        now = self.clock()
        if self._prefill_start is None:
            self._prefill_start = (now, event.done)
        else:
            start_time, start_done = self._prefill_start
            if now > start_time and event.done > start_done:
                self._prefill_rate = (event.done - start_done) / (now - start_time)
        self.prefill_done, self.prefill_total = event.done, event.total

    def on_delta(self, event: TextDelta) -> None:
        if self._decode_start is None:
            self._decode_start = (self.clock(), event.completion_tokens)
        self.completion_tokens = event.completion_tokens

    def text(self) -> Text:
        if self._decode_start is None:
            if not self.prefill_total:
                return Text(f"{self.model_name} · starting …", style="dim")
            percent = 100 * self.prefill_done / self.prefill_total
            line = f"{self.model_name} · reading prompt {self.prefill_done:,}/{self.prefill_total:,} tokens ({percent:.0f}%)"
            if self._prefill_rate:
                line += f" · {self._prefill_rate:,.0f} tok/s"
            return Text(line, style="dim")
        start_time, start_tokens = self._decode_start
        elapsed = self.clock() - start_time
        line = f"{self.model_name} · {self.completion_tokens:,} tokens"
        if elapsed > 0 and self.completion_tokens > start_tokens:
            line += f" · {(self.completion_tokens - start_tokens) / elapsed:,.1f} tok/s"
        return Text(line, style="dim")


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    """Splits streamed text into reasoning and answer on `<think>`/`</think>`, tags that may
    arrive cut across deltas. In thinking mode DeepSeek-V4's prompt already ends with
    `<think>`, so the reply starts inside the reasoning (`inside=True`)."""

    def __init__(self, inside: bool):
        self.thinking = inside
        self.reasoning = ""  # all reasoning text so far
        self.boundary_seen = False  # a `</think>` came through
        self._pending = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """(is_reasoning, text) pieces, in order; a possible tag prefix is held back."""
        self._pending += text
        pieces: list[tuple[bool, str]] = []
        while self._pending:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            at = self._pending.find(tag)
            if at >= 0:
                if at:
                    pieces.append((self.thinking, self._pending[:at]))
                self._pending = self._pending[at + len(tag):]
                self.boundary_seen = self.boundary_seen or self.thinking
                self.thinking = not self.thinking
                continue
            keep = _partial_tag_length(self._pending, tag)
            ready = self._pending[: len(self._pending) - keep]
            if ready:
                pieces.append((self.thinking, ready))
            self._pending = self._pending[len(ready):]
            break
        self.reasoning += "".join(piece for is_reasoning, piece in pieces if is_reasoning)
        return pieces

    def flush(self) -> list[tuple[bool, str]]:
        rest, self._pending = self._pending, ""
        if rest and self.thinking:
            self.reasoning += rest
        return [(self.thinking, rest)] if rest else []


def _partial_tag_length(text: str, tag: str) -> int:
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class AnswerView:
    """Shows one streamed answer; feed it every event, in order, inside `with`.

    With `thinking=True` the stream is split on `<think>`/`</think>`: the reasoning goes to
    stderr, dimmed (on a terminal its tail shows in the status region while it streams, then
    it is printed whole above the answer), and only the answer reaches stdout. `--json`
    keeps the reasoning for its own field and streams none of it."""

    def __init__(
        self,
        mode: AnswerMode,
        model_name: str,
        *,
        out: Console | None = None,
        err: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        thinking: bool = False,
    ):
        self.mode = mode
        self.out = out or stdout_console()
        self.err = err or consoles.err()
        self.status = StatusLine(model_name, clock)
        self.text = ""
        self.done: Done | None = None
        self._show_status = self.err.is_terminal
        self._status_live: Live | None = None
        self._answer_live: Live | None = None
        self._splitter = ReasoningSplitter(inside=True) if thinking else None
        self._reasoning_open = False  # reasoning shown whose end is not shown yet

    @property
    def reasoning(self) -> str:
        return self._splitter.reasoning if self._splitter is not None else ""

    def __enter__(self) -> AnswerView:
        if self._show_status:
            self._status_live = Live(
                self.status.text(),
                console=self.err,
                transient=True,
                refresh_per_second=_REFRESH_PER_SECOND,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._status_live.start()
        return self

    def handle(self, event: Event) -> None:
        if isinstance(event, PrefillProgress):
            self.status.on_prefill(event)
            self._refresh_status()
        elif isinstance(event, TextDelta):
            self.status.on_delta(event)
            self._take(event.text)
        elif isinstance(event, Done):
            if event.text and not self.text and not self.reasoning:
                # A model that only reports the whole text at the end still gets shown.
                self._take(event.text)
            if self._splitter is not None:
                self._split(self._splitter.flush())
                if not self._splitter.boundary_seen and self._splitter.reasoning and not self.text:
                    # No end of reasoning came through (a model that skipped the tag): the
                    # payload must not be empty, so all of it is taken as the answer.
                    self._end_reasoning()
                    note("no end of the reasoning was seen; all of it is taken as the answer", self.err)
                    text, self._splitter.reasoning = self._splitter.reasoning, ""
                    self._answer(text.strip("\n"))
            self.done = event if self._splitter is None else dataclasses.replace(event, text=self.text)

    def __exit__(self, *exc_info: object) -> None:
        self._end_reasoning()
        self._stop_status()
        if self._answer_live is not None:
            self._answer_live.stop()  # transient: the tail view and status line vanish
            self._answer_live = None
            self.out.print(Markdown(self.text))
        elif self.mode == "plain" and self.text and not self.text.endswith("\n"):
            self._write_plain("\n")
        elif self.mode == "markdown" and self.text:
            self.out.print(Markdown(self.text))

    # ---- internals

    def _take(self, text: str) -> None:
        if self._splitter is None:
            self._answer(text)
        else:
            self._split(self._splitter.feed(text))

    def _split(self, pieces: list[tuple[bool, str]]) -> None:
        for is_reasoning, text in pieces:
            if is_reasoning:
                self._reason(text)
            else:
                self._answer(text)

    def _answer(self, text: str) -> None:
        if not text:
            return
        if self._reasoning_open:
            self._end_reasoning()
            if not self.text:
                text = text.lstrip("\n")  # the model's own break after </think>; we put one
                if not text:
                    return
        self.text += text
        self._show_delta(text)

    def _reason(self, text: str) -> None:
        if not text:
            return
        if not self._reasoning_open:
            text = text.lstrip("\n")  # the model's own break after <think>
            if not text:
                return
        self._reasoning_open = True
        if self._status_live is not None:
            self._refresh_status()
        elif self.mode != "json":
            self.err.print(text, style="dim", end="", markup=False, highlight=False)

    def _end_reasoning(self) -> None:
        """The reasoning is complete: on a terminal it moves from the transient status region
        to stderr for good; elsewhere its last line is ended. A blank line parts it from the answer."""
        if not self._reasoning_open:
            return
        self._reasoning_open = False
        shown = self.reasoning.strip("\n")
        if self._status_live is not None:
            self.err.print(Text(shown, style="dim"))
            self.err.print()
            self._refresh_status()
        elif self.mode != "json":
            self.err.print("\n" if self.reasoning.endswith("\n") else "\n\n", end="", markup=False, highlight=False)

    def _reasoning_renderable(self) -> _Tail:
        return _Tail(Text(self.reasoning.strip("\n"), style="dim"), self.status.text())

    def _show_delta(self, delta: str) -> None:
        if self.mode == "plain":
            self._write_plain(delta)
        elif self.mode == "markdown":
            if not self.out.is_terminal:
                return  # printed whole at the end (a markdown renderer handed a non-terminal)
            if self._answer_live is None:
                self._stop_status()
                self._answer_live = Live(
                    self._answer_renderable(),
                    console=self.out,
                    transient=True,
                    auto_refresh=True,
                    refresh_per_second=_REFRESH_PER_SECOND,
                    vertical_overflow="visible",
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                self._answer_live.start()
            else:
                self._answer_live.update(self._answer_renderable(), refresh=False)
        else:
            self._refresh_status()

    def _answer_renderable(self) -> _Tail:
        status = self.status.text() if self._show_status else None
        return _Tail(Markdown(self.text), status)

    def _write_plain(self, text: str) -> None:
        stream = self.out.file
        stream.write(text)
        stream.flush()
        self._refresh_status()

    def _refresh_status(self) -> None:
        if self._status_live is not None:
            shown = self._reasoning_renderable() if self._reasoning_open else self.status.text()
            self._status_live.update(shown, refresh=False)

    def _stop_status(self) -> None:
        if self._status_live is not None:
            self._status_live.stop()
            self._status_live = None


def json_answer(answer: str, model: str, done: Done | None, *, reasoning: str | None = None) -> str:
    """The one JSON object `dsv4 ask --json` prints; `reasoning` (thinking mode) is its own field."""
    usage = done.usage if done is not None else None
    timings = done.timings if done is not None else None
    payload: dict[str, Any] = {
        "answer": answer,
        **({"reasoning": reasoning.strip("\n")} if reasoning is not None else {}),
        "model": model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        },
        "timings": {
            "ttft_s": round(timings.ttft_s, 4) if timings else None,
            "prefill_tok_s": round(timings.prefill_tok_s, 2) if timings else None,
            "decode_tok_s": round(timings.decode_tok_s, 2) if timings else None,
        },
        "finish_reason": done.finish_reason if done is not None else "cancelled",
    }
    if done is not None and "cache" in done.extra:
        payload["cache"] = done.extra["cache"]
    return json.dumps(payload, ensure_ascii=False)


def print_stats(done: Done, *, model: str, load_s: float | None, console: Console | None = None) -> None:
    """`-v`: usage and timings on stderr."""
    console = console or consoles.err()
    usage, timings = done.usage, done.timings
    load = f" · load {load_s:.2f} s" if load_s is not None else ""
    console.print(f"model {model}{load} · finish {done.finish_reason}", markup=False, highlight=False)
    console.print(
        f"tokens: prompt {usage.prompt_tokens:,} ({usage.cached_tokens:,} cached) · completion {usage.completion_tokens:,}",
        markup=False,
        highlight=False,
    )
    console.print(
        f"time: first token {timings.ttft_s:.2f} s · prefill {timings.prefill_s:.2f} s "
        f"({timings.prefill_tok_s:,.0f} tok/s) · decode {timings.decode_s:.2f} s ({timings.decode_tok_s:,.1f} tok/s)",
        markup=False,
        highlight=False,
    )
    cache = done.extra.get("cache")
    if cache:
        for line in cache_lines(cache, ttft_s=timings.ttft_s):
            console.print(line, markup=False, highlight=False)


def cache_lines(cache: dict[str, Any], *, ttft_s: float | None = None) -> list[str]:
    """The prefix cache report: what was reused and how fast, what was prefilled, why not more."""
    total = cache.get("prompt_tokens", 0)
    reused = cache.get("reused_tokens", 0)
    share = f" ({100 * reused / total:.1f}%)" if total else ""
    line = f"cache: {reused:,}/{total:,} tokens reused{share}"
    if cache.get("bytes_loaded"):
        rate = cache.get("load_bytes_per_s") or 0
        line += f" · {human_bytes(cache['bytes_loaded'])} in {cache.get('load_s', 0):.2f} s ({human_bytes(rate)}/s)"
    line += f" · prefilled {cache.get('prefilled_tokens', 0):,} tok"
    if ttft_s is not None:
        line += f" · first token {ttft_s:.2f} s"
    if cache.get("segments_written"):
        line += f" · wrote {cache['segments_written']} segment(s), {human_bytes(cache.get('bytes_written', 0))}"
    if cache.get("read_only"):
        line += " · read-only"
    lines = [line]
    if cache.get("miss_reason"):
        lines.append(f"cache miss: {cache['miss_reason']}")
    lines += [f"cache: dropped {entry}" for entry in cache.get("removed", [])]
    return lines


def note(message: str, console: Console | None = None) -> None:
    """A neutral stderr note (what was fetched, what was reduced)."""
    (console or consoles.err()).print(f"[dim]note:[/dim] {message}", markup=True, highlight=False)


# ---------------------------------------------------------------- dsv4 models


def models_table(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    """Installed models as a table (for a terminal; `models_lines` is the piped form)."""
    console = console or stdout_console()
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("model", "size", "verified", "path"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for row in rows:
        table.add_row(row["alias"], human_bytes(row["size"]), "yes" if row["verified"] else "no", row["path"])
    console.print(table)


def models_lines(rows: Sequence[dict[str, Any]]) -> str:
    """alias, size in bytes, verified, path: tab-separated, one model a line."""
    return "".join(f"{row['alias']}\t{row['size']}\t{'yes' if row['verified'] else 'no'}\t{row['path']}\n" for row in rows)


__all__ = [
    "AnswerView",
    "ReasoningSplitter",
    "StatusLine",
    "cache_lines",
    "human_bytes",
    "json_answer",
    "models_lines",
    "models_table",
    "note",
    "print_stats",
    "transfer_progress",
    "working",
]
