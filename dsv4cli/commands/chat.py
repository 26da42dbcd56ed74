"""`dsv4 chat [SOURCE...]`: a conversation about packed sources, one turn after another.

The sources are packed once and put first in the first user message; every later prompt is
the previous prompt, the previous answer and the new question, so each turn's prompt starts
with the one before it and the prefix cache serves everything but the newest turn. The pack
is fitted to a share of the context (the rest is left for the conversation). Conversations
go to the log as they happen; `--continue`/`--cid` rebuild the very same prompt from it.

With the embedded engine the model state stays in memory between turns and each turn
prefills only its new tokens (engine.cached_generation.LiveState); with `--backend URL` the
whole conversation is sent each turn and the server's prefix cache does the same.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from dsv4cli import backend as backends
from dsv4cli import render
from dsv4cli.commands import ask as ask_command
from dsv4cli.console import err, stdout_is_terminal, warn
from dsv4cli.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CliError, format_error
from dsv4cli.inputs import STDIN, AskInputs
from engine.events import Done, Event, SamplingParams, TextDelta

# The pack takes at most this share of what the context leaves; the rest holds the turns.
PACK_SHARE = 0.75
HELP = """\
/clear          forget the turns (the packed sources stay)
/save FILE      save the conversation (.md: Markdown, otherwise JSON)
/load FILE      load a conversation saved by /save
/model NAME     switch the model (mini, flash, pro or a path)
/stats          tokens and timings of the last turn and of the session
/help           this list
Ctrl-C stops a reply, Ctrl-D (or /exit) leaves. Multi-line: end a line with \\, or
start a block with \"\"\" and end it with \"\"\"; on a terminal Esc then Enter adds a line."""


@dataclass
class Turn:
    question: str
    answer: str
    logged: bool = False


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "cancelled"
    kept_tokens: int = 0  # of cached_tokens, those kept in memory from the previous turn

    def add(self, other: TurnStats) -> None:
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens", "ttft_s", "prefill_s", "decode_s", "kept_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class ChatOptions:
    model: str | None = None
    system: str | None = ask_command.DEFAULT_SYSTEM
    max_tokens: int = ask_command.DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    cache: bool = True
    cache_read_only: bool = False
    resume: str | None = None  # "latest" or a conversation id (prefix)
    log: bool = True
    think: bool = False
    backend: str | None = None  # an OpenAI-compatible /v1 URL answers instead of the embedded engine
    pack_format: str = ask_command.DEFAULT_PACK_FORMAT


@dataclass
class ChatSession:
    """The conversation: its system prompt, the pack, the turns, and where it is logged."""

    system: str | None
    context: str | None
    turns: list[Turn] = field(default_factory=list)
    conversation_id: str | None = None

    def messages(self, question: str) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for index, turn in enumerate([*self.turns, Turn(question, "")]):
            # The pack goes before the first question only, as `dsv4 ask` lays it out.
            out += ask_command.question_turns(self.context if index == 0 else None, turn.question)
            if index < len(self.turns):
                out.append({"role": "assistant", "content": turn.answer})
        return out

    def to_dict(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "system": self.system,
            "context": self.context,
            "turns": [{"question": t.question, "answer": t.answer} for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatSession:
        turns = [Turn(str(t["question"]), str(t["answer"])) for t in data.get("turns", [])]
        return cls(data.get("system"), data.get("context"), turns)


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat(
        sources: list[str] = typer.Argument(None, metavar="SOURCE", help="Files or directories to pack once, before the conversation."),
        model: str = typer.Option(None, "--model", "-m", envvar="DSV4_MODEL", help="Alias (mini, flash, pro) or path; default mini, or the resumed conversation's."),
        system: str = typer.Option(None, "--system", "-s", help="System prompt ('' for the model's own default)."),
        max_tokens: int = typer.Option(ask_command.DEFAULT_MAX_TOKENS, "--max-tokens", min=1, help="Longest answer per turn, in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)."),
        pack_format: str = ask_command.format_option(),
        no_cache: bool = ask_command.no_cache_option(),
        cache_ro: bool = ask_command.cache_ro_option(),
        resume_latest: bool = typer.Option(False, "--continue", "-c", help="Resume the latest conversation."),
        cid: str = typer.Option(None, "--cid", metavar="ID", help="Resume this conversation (an id from 'dsv4 logs', or a unique prefix)."),
        no_log: bool = typer.Option(False, "--no-log", help="Keep this conversation out of the log."),
        think: bool = typer.Option(False, "--think", help="flash/pro or a served reasoning model: show the model's reasoning, dimmed, apart from the answer."),
        backend: str = ask_command.backend_option("chat with"),
    ) -> int:
        """Talk with a model about files: the SOURCEs are packed once, each turn reuses the cached prefix.

        Type /help in the chat for its commands. With a piped stdin, each line is one message.
        """
        if resume_latest and cid:
            raise CliError("--continue and --cid cannot be combined", "see 'dsv4 chat --help'", exit_code=EXIT_USAGE)
        options = ChatOptions(
            model=model,
            system=None if system is None else (system or ""),
            max_tokens=max_tokens,
            temperature=temperature,
            cache=not no_cache,
            cache_read_only=cache_ro,
            resume="latest" if resume_latest else cid,
            log=not no_log,
            think=think,
            backend=backend,
            pack_format=pack_format,
        )
        return run_chat(list(sources or []), options)


def run_chat(sources: list[str], options: ChatOptions) -> int:
    from dsv4cli import repl

    ask_command.check_pack_format(options.pack_format, "chat")
    if STDIN in sources:
        raise CliError("chat reads its messages from stdin, so '-' cannot be a SOURCE", "pass files or directories", exit_code=EXIT_USAGE)
    for source in sources:
        if not Path(source).expanduser().exists():
            raise CliError(f"no such file or directory: {source}", "SOURCEs are files or directories to pack")
    resumed = _resumed_session(options.resume) if options.resume else None
    if resumed is not None and sources:
        raise CliError("a resumed conversation keeps its own sources", "give no SOURCE with --continue or --cid", exit_code=EXIT_USAGE)
    model_name = options.model or (resumed[1] if resumed else None) or ask_command.DEFAULT_MODEL
    chat = _Chat(options, backends.open_backend(model_name, backends.backend_url(options.backend)))
    if resumed is not None:
        chat.session = resumed[0]
        if options.system is not None:
            chat.session.system = options.system or None
        render.note(f"resumed conversation {chat.session.conversation_id} ({len(chat.session.turns)} turn(s))")
    else:
        system = ask_command.DEFAULT_SYSTEM if options.system is None else (options.system or None)
        chat.session = ChatSession(system, chat.pack(sources, system) if sources else None)
    return chat.loop(repl.message_source())


def _resumed_session(which: str) -> tuple[ChatSession, str] | None:
    from dsv4cli.logs import LogStore

    with LogStore() as store:
        conversation_id = store.latest_conversation() if which == "latest" else store.resolve_id(which)
        if conversation_id is None:
            raise CliError("there is no conversation to continue", "start one with 'dsv4 chat' or 'dsv4 ask'")
        conversation = store.get_conversation(conversation_id)
        exchanges = conversation.exchanges
        if not exchanges:
            raise CliError(f"conversation {conversation_id} has no exchanges", "start a new one with 'dsv4 chat'")
        first = exchanges[0]
        context = store.blob(first.context_sha256) if first.context_sha256 else None
    session = ChatSession(first.system, context, [Turn(e.question, e.answer, logged=True) for e in exchanges], conversation_id)
    return session, exchanges[-1].model


class _Chat:
    def __init__(self, options: ChatOptions, backend: backends.Backend):
        self.options = options
        self.backend = backend
        self.live: Any = None  # engine.cached_generation.LiveState, made at the first local turn
        self._live_miss_noted = False
        self.session = ChatSession(None, None)
        self.last: TurnStats | None = None
        self.total = TurnStats()
        self.turns_answered = 0
        self.failed = False
        self._warn_about_think()

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def model(self) -> Any:
        return self.backend.model

    # ---- setup

    def pack(self, sources: list[str], system: str | None) -> str:
        tokenizer, context = self.model.tokenizer, self.model.context_length
        head = [{"role": "system", "content": system}] if system else []
        overhead = len(tokenizer.render_chat(head + ask_command.question_turns("", "")))
        room = context - overhead - ask_command._JOIN_SLACK_TOKENS - self.options.max_tokens
        budget = int(room * PACK_SHARE)
        if budget <= 0:
            raise CliError(f"context too long: {self.name} holds {context:,} tokens, which leaves no room for a pack",
                           "lower --max-tokens or use a model with a longer context")
        inputs = AskInputs(tuple(sources), "", None)
        pack_options = ask_command.AskOptions(model=self.name, max_tokens=self.options.max_tokens,
                                              pack_format=self.options.pack_format)
        return ask_command._pack(inputs, pack_options, tokenizer, budget, context, self.name).text

    def _thinking(self) -> bool:
        return self.options.think and ask_command.thinking_supported(self.name, self.model)

    def _warn_about_think(self) -> None:
        if self.options.think and not self._thinking():
            render.note(f"--think: {self.name} has no thinking mode; it answers directly")

    # ---- the loop

    def loop(self, source: Any) -> int:
        from dsv4cli.repl import PipedMessages

        interactive = not isinstance(source, PipedMessages)
        if interactive:
            where = f" at {self.backend.url}" if self.backend.is_remote else ""
            render.note(f"chatting with {self.name}{where}; /help for commands, Ctrl-D to leave")
        while True:
            try:
                message = source.read()
            except EOFError:
                break
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line, as in a shell
            if not message.strip():
                continue
            if message.strip() in ("/exit", "/quit", "/bye"):
                break
            try:
                if message.startswith("/"):
                    self.command(message.strip())
                else:
                    self.turn(message)
            except CliError as exc:
                self.failed = True
                err().print(format_error(str(exc), exc.hint), markup=False, highlight=False)
            except Exception as exc:  # noqa: BLE001 - an engine error ends the turn, not the chat
                from dsv4cli import errors

                if errors.debug_enabled():
                    raise
                self.failed = True
                errors.report(exc)
        return EXIT_ERROR if self.failed and not interactive else EXIT_OK

    def command(self, line: str) -> None:
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name == "/help":
            _say(HELP)
        elif name == "/clear":
            self.session = ChatSession(self.session.system, self.session.context)
            _say("conversation cleared (the packed sources stay)")
        elif name == "/save":
            self.save(_needs(argument, "/save FILE"))
        elif name == "/load":
            self.load(_needs(argument, "/load FILE"))
        elif name == "/model":
            self.switch_model(_needs(argument, "/model NAME"))
        elif name == "/stats":
            self.stats()
        else:
            raise CliError(f"unknown command {name}", "/help lists the commands")

    def turn(self, question: str) -> None:
        session = self.session
        messages = session.messages(question)
        thinking = self._thinking()
        template_kwargs = {"thinking": True} if thinking else {}
        prompt_ids = self.model.tokenizer.render_chat(messages, **template_kwargs)
        context = self.model.context_length
        if len(prompt_ids) + self.options.max_tokens > context:
            raise CliError(
                f"context full: this turn needs {len(prompt_ids):,} tokens and --max-tokens {self.options.max_tokens:,} more, "
                f"but {self.name} holds {context:,}",
                "/clear starts over with the same sources, or /save then start a new chat",
            )
        params = SamplingParams(
            max_tokens=self.options.max_tokens,
            temperature=self.options.temperature,
            repetition_penalty=ask_command._DEFAULT_REPETITION_PENALTY.get(self.name, 1.0),
        )
        started = time.monotonic()
        mode: render.AnswerMode = "markdown" if stdout_is_terminal() else "plain"
        # Thinking mode: the view shows the reasoning dimmed on stderr and keeps only the answer
        # in view.text, which is all the history keeps: DeepSeek-V4's format drops an earlier
        # turn's reasoning (its assistant turn is `</think>` + answer, deepseek-v4.md §6).
        view = render.AnswerView(mode, self.name, thinking=thinking)
        answer_tokens = 0
        interrupted = False
        with view, _ctrl_c_cancels(enabled=self._cancellable()) as cancel:
            events = self._events(messages, prompt_ids, params, template_kwargs, cancel)
            try:
                with contextlib.closing(events) if hasattr(events, "close") else contextlib.nullcontext():
                    for event in events:
                        if isinstance(event, TextDelta):
                            answer_tokens = event.completion_tokens
                        view.handle(event)
            except KeyboardInterrupt:
                interrupted = True
        interrupted = interrupted or cancel()
        if interrupted:
            render.note("stopped")
        done = view.done
        stats = _stats(done)
        if interrupted or done is None:
            stats.completion_tokens = answer_tokens
        self.last = stats
        self.total.add(stats)
        self.turns_answered += 1
        cache_report = (done.extra.get("cache") if done is not None else None) or {}
        for warning in cache_report.get("warnings", []):
            warn(warning)
        if cache_report.get("live_miss") and not self._live_miss_noted:
            self._live_miss_noted = True  # once: a model whose state cannot be rewound misses every turn
            render.note(f"the conversation kept in memory was not reused: {cache_report['live_miss']}")
        if done is not None and done.finish_reason == "length":
            render.note(f"the answer stopped at --max-tokens {self.options.max_tokens}")
        session.turns.append(Turn(question, view.text))
        self._log(done, time.monotonic() - started)

    def _events(self, messages: list[dict[str, str]], prompt_ids: list[int], params: SamplingParams,
                template_kwargs: dict[str, Any], cancel: Callable[[], bool]) -> Iterator[Event]:
        if self.live is None and not self.backend.is_remote:
            from engine.cached_generation import LiveState

            self.live = LiveState()
        cache = backends.CacheOptions(enabled=self.options.cache, read_only=self.options.cache_read_only)
        return self.backend.events(messages, params, prompt_ids=prompt_ids, template_kwargs=template_kwargs,
                                   cache=cache, cancel=cancel, live=self.live)

    def _cancellable(self) -> bool:
        return self.backend.cancellable

    def _log(self, done: Done | None, elapsed_s: float) -> None:
        if not self.options.log:
            return
        session = self.session
        for index, turn in enumerate(session.turns):
            if turn.logged:
                continue
            is_last = index == len(session.turns) - 1
            session.conversation_id = ask_command.log_exchange(
                self.name, turn.question, turn.answer, done if is_last else None,
                system=session.system, context=session.context if session.conversation_id is None else None,
                elapsed_s=elapsed_s if is_last else None, conversation_id=session.conversation_id, command="chat",
            )
            turn.logged = session.conversation_id is not None

    # ---- slash commands

    def save(self, target: str) -> None:
        path = Path(target).expanduser()
        data = self.session.to_dict(self.name)
        if path.suffix.lower() in (".md", ".markdown"):
            text = _markdown(data)
        else:
            text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
        _say(f"saved {len(self.session.turns)} turn(s) to {path}")

    def load(self, target: str) -> None:
        path = Path(target).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = _parse_saved(text)
            session = ChatSession.from_dict(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(f"{path} is not a conversation saved by /save ({exc})") from None
        self.session = session  # a new log conversation: the loaded turns are logged with the next one
        _say(f"loaded {len(session.turns)} turn(s) from {path}")

    def switch_model(self, name: str) -> None:
        self.backend = self.backend.switch(name)
        if self.live is not None:
            self.live.clear()  # another model's state means nothing to this one
        self._warn_about_think()
        _say(f"now chatting with {self.name}")

    def stats(self) -> None:
        if self.last is None:
            _say("no turns yet")
            return
        if self.backend.is_remote:
            _say(f"{self.name} at {self.backend.url} (token counts are the server's; cached = its prefix cache)")
        _say("last turn: " + _stats_line(self.last))
        _say(f"session ({self.turns_answered} turn(s)): " + _stats_line(self.total))


@contextlib.contextmanager
def _ctrl_c_cancels(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """While a reply streams, the first Ctrl-C asks the engine to stop at its next token (the
    turn ends with finish 'cancelled' and cache segments stay whole); a second one interrupts."""
    import signal
    import threading

    requested = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _stats(done: Done | None) -> TurnStats:
    if done is None:
        return TurnStats()
    usage, timings = done.usage, done.timings
    kept = int(((done.extra.get("cache") or {}).get("live_tokens")) or 0)
    return TurnStats(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, timings.ttft_s,
                     timings.prefill_s, timings.decode_s, done.finish_reason, kept)


def _stats_line(stats: TurnStats) -> str:
    kept = f", {stats.kept_tokens:,} kept in memory" if stats.kept_tokens else ""
    return (f"prompt {stats.prompt_tokens:,} tokens ({stats.cached_tokens:,} cached{kept}) · completion {stats.completion_tokens:,}"
            f" · first token {stats.ttft_s:.2f} s · prefill {stats.prefill_s:.2f} s · decode {stats.decode_s:.2f} s")


def _say(text: str) -> None:
    """Replies to slash commands go to stderr: stdout carries only the answers."""
    err().print(text, markup=False, highlight=False)


def _needs(argument: str, usage: str) -> str:
    if not argument:
        raise CliError(f"missing argument: {usage}", "/help lists the commands")
    return argument


_SAVED_MARKER = "<!-- dsv4-chat "


def _markdown(data: dict[str, Any]) -> str:
    """Readable Markdown, with the exact conversation as JSON in a trailing comment for /load."""
    parts = [f"# Chat with {data['model']}\n"]
    if data["system"]:
        parts.append(f"**System:** {data['system']}\n")
    if data["context"]:
        parts.append(f"<details><summary>Packed sources</summary>\n\n{data['context']}\n\n</details>\n")
    for turn in data["turns"]:
        parts.append(f"## You\n\n{turn['question']}\n\n## {data['model']}\n\n{turn['answer']}\n")
    # '>' escaped so the JSON can never close the comment early
    parts.append(_SAVED_MARKER + json.dumps(data, ensure_ascii=False).replace(">", "\\u003e") + " -->\n")
    return "\n".join(parts)


def _parse_saved(text: str) -> dict[str, Any]:
    at = text.rfind(_SAVED_MARKER)
    if at >= 0:
        text = text[at + len(_SAVED_MARKER):].rsplit("-->", 1)[0]
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("turns"), list):
        raise ValueError("no turns")
    return data
