"""`dsv4 ask [SOURCE...] QUESTION`: pack the sources, ask the model, stream the answer.

The prompt is the pack first and the question last, so the pack is a prefix that stays the
same from one question to the next (the prefix cache's unit). The pack is fitted to what
the model's context leaves after the system prompt, the question and --max-tokens.
The layout (a plain-text pack in a user message of its own, the question in the next one)
is the one that scored best in bench/answer_quality.py with the embedded mini.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import typer
from typer.core import TyperCommand

from dsv4cli import backend as backends
from dsv4cli import render
from dsv4cli.console import stdout_is_terminal, warn
from dsv4cli.errors import EXIT_USAGE, CliError
from dsv4cli.inputs import AskInputs, resolve_ask_arguments
from engine import paths
from engine.events import Done, Event, SamplingParams

DEFAULT_MODEL = "mini"
DEFAULT_SYSTEM = (
    "You are dsv4, a helpful assistant for software developers. "
    "Answer the question accurately and concisely, using the provided files when there are any."
)
DEFAULT_MAX_TOKENS = 512
PACK_FORMATS = ("xml", "markdown", "plain")
# Plain: mini copies XML or Markdown markup back instead of answering (bench/answer_quality.py).
# `dsv4 pack` keeps its own default.
DEFAULT_PACK_FORMAT = "plain"
PACK_FORMAT_METAVAR = "|".join(PACK_FORMATS)
FORMAT_HELP = "Layout of the pack."


# Options ask, chat and review share: one declaration each, so names and help never drift apart.
def format_option() -> Any:
    return typer.Option(DEFAULT_PACK_FORMAT, "--format", metavar=PACK_FORMAT_METAVAR, help=FORMAT_HELP)


def no_cache_option() -> Any:
    return typer.Option(False, "--no-cache", help="Neither read nor write the prefix KV cache.")


def cache_ro_option() -> Any:
    return typer.Option(False, "--cache-ro", help="Reuse cached prefixes but write, evict or remove nothing.")


def backend_option(purpose: str) -> Any:
    """`purpose` completes "OpenAI-compatible server to ... instead", e.g. "chat with"."""
    return typer.Option(
        None, "--backend", envvar="DSV4_BACKEND", metavar="URL|local",
        help=f"OpenAI-compatible server to {purpose} instead (vLLM, SGLang, dsv4 serve), e.g. http://127.0.0.1:8000/v1; "
             "'local' forces the embedded engine over a configured URL.",
    )
# Tokens kept free besides the counted template: BPE may merge across the pack/question join.
_JOIN_SLACK_TOKENS = 8
# Small models loop without a penalty (embedded-model.md); bigger ones are hurt by one.
_DEFAULT_REPETITION_PENALTY = {"mini": 1.1}
# Models with a thinking mode (DeepSeek-V4: the prompt ends with <think>, spec §6).
THINKING_MODELS = ("flash", "pro")


class LoadedModel(Protocol):
    """What `dsv4 ask` needs from `engine.load(...)` (tests/fake_engine.py implements it too)."""

    name: str
    context_length: int

    @property
    def tokenizer(self) -> Any: ...

    def chat(self, messages: list[dict[str, str]], params: SamplingParams, **kwargs: Any) -> Iterator[Event]: ...


@dataclass(frozen=True)
class AskOptions:
    model: str = DEFAULT_MODEL
    system: str | None = DEFAULT_SYSTEM
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    pack_format: str = DEFAULT_PACK_FORMAT
    json_output: bool = False
    verbose: bool = False
    cache: bool = True
    cache_read_only: bool = False
    cache_cap: str | None = None
    log: bool = True
    backend: str | None = None  # an OpenAI-compatible /v1 URL answers instead of the embedded engine
    think: bool = False
    exclude: tuple[str, ...] | None = None  # extra pack exclusions; None: the configured `exclude`


def _open_model(name_or_path: str) -> tuple[str, LoadedModel]:
    """Resolve the model (fetching it on first use, bars on stderr) and load it.
    The seam CLI tests replace with a fake model."""
    from engine import store

    with render.transfer_progress() as progress:
        ref = store.resolve_model(name_or_path, fetch=True, progress=progress, note=render.note)
    with render.working(f"loading {ref.name}"):
        import engine

        return ref.name, engine.load(str(ref.path))


class _AskCommand(TyperCommand):
    """Typer spells a required variadic argument `{X}...`; say it the way the docs do."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ["[OPTIONS]", "[SOURCE]... QUESTION"]


def register(app: typer.Typer) -> None:
    @app.command("ask", cls=_AskCommand)
    def ask(
        arguments: list[str] = typer.Argument(
            ..., metavar="[SOURCE]... QUESTION", help="Files, directories or '-' (stdin) to pack, then the question."
        ),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", envvar="DSV4_MODEL", help="Alias (mini, flash, pro) or path."),
        system: str = typer.Option(None, "--system", "-s", help="System prompt ('' for the model's own default)."),
        max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", min=1, help="Longest answer, in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)."),
        top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold."),
        top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k likeliest tokens (0 = off)."),
        repetition_penalty: float = typer.Option(
            None, "--repetition-penalty", min=1.0, help="1 = off; default 1.1 for mini, 1 otherwise."
        ),
        seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
        pack_format: str = format_option(),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object (answer, usage, timings)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Usage, timings and the prefix cache report on stderr."),
        no_cache: bool = no_cache_option(),
        cache_ro: bool = cache_ro_option(),
        cache_cap: str = typer.Option(
            None, "--cache-cap", metavar="SIZE", help="Prefix cache size cap, e.g. 5G (default $DSV4_CACHE_CAP, else min(20 GB, 10% of the disk))."
        ),
        no_log: bool = typer.Option(False, "--no-log", help="Keep this exchange out of the conversation log (dsv4 logs)."),
        backend: str = backend_option("ask"),
        think: bool = typer.Option(False, "--think", help="flash/pro or a served reasoning model: show the model's reasoning, dimmed on stderr, apart from the answer."),
    ) -> None:
        """Ask a model a question, about files or piped text when given.

        The last argument is the question; SOURCEs before it are packed first.
        With no SOURCE, piped stdin is the context: git diff | dsv4 ask "review this"
        """
        options = AskOptions(
            model=model,
            system=DEFAULT_SYSTEM if system is None else (system or None),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            pack_format=pack_format,
            json_output=json_output,
            verbose=verbose,
            cache=not no_cache,
            cache_read_only=cache_ro,
            cache_cap=cache_cap,
            log=not no_log,
            backend=backend,
            think=think,
        )
        run_ask(list(arguments or []), options)


def thinking_supported(name: str, model: LoadedModel) -> bool:
    """Whether the model has a thinking mode: an alias that has one, a checkpoint whose chat
    format is DeepSeek-V4's (a PATH to Flash or Pro), or a served model (the server decides:
    one without a thinking mode answers directly)."""
    if name in THINKING_MODELS or getattr(model, "is_remote", False):
        return True
    from engine.deepseek_v4.chat import CHAT_TEMPLATE

    return getattr(model.tokenizer, "chat_template", None) == CHAT_TEMPLATE


def check_pack_format(pack_format: str, command: str = "ask") -> None:
    if pack_format not in PACK_FORMATS:
        raise CliError(f"--format must be one of {', '.join(PACK_FORMATS)}, not {pack_format!r}",
                       f"see 'dsv4 {command} --help'", exit_code=EXIT_USAGE)


def run_ask(arguments: list[str], options: AskOptions, *, clock: Callable[[], float] = time.monotonic) -> None:
    check_pack_format(options.pack_format)
    if options.cache_cap is not None:
        from engine.prefix_cache import parse_size

        try:
            parse_size(options.cache_cap)
        except ValueError as exc:
            raise _usage_error(f"--cache-cap: {exc}") from None
    inputs = resolve_ask_arguments(arguments)
    started = clock()
    backend = backends.open_backend(options.model, backends.backend_url(options.backend))
    name, model = backend.name, backend.model
    load_s = clock() - started
    thinking = options.think and thinking_supported(name, model)
    if options.think and not thinking:
        render.note(f"--think: {name} has no thinking mode; it answers directly")

    messages = _messages(model, inputs, options, name)
    params = SamplingParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        repetition_penalty=options.repetition_penalty or _DEFAULT_REPETITION_PENALTY.get(name, 1.0),
        seed=options.seed,
    )
    mode: render.AnswerMode = "json" if options.json_output else ("markdown" if stdout_is_terminal() else "plain")
    view = render.AnswerView(mode, name, thinking=thinking)
    with view:
        cache = backends.CacheOptions(enabled=options.cache, read_only=options.cache_read_only, cap=options.cache_cap)
        events = backend.events(messages, params, template_kwargs={"thinking": True} if thinking else None, cache=cache)
        with contextlib.closing(events) if hasattr(events, "close") else contextlib.nullcontext():
            for event in events:
                view.handle(event)

    if options.json_output:
        print(render.json_answer(view.text, name, view.done, reasoning=view.reasoning if thinking else None), flush=True)
    cache_report = view.done.extra.get("cache") if view.done is not None else None
    for warning in (cache_report or {}).get("warnings", []):
        warn(warning)
    if view.done is not None and view.done.finish_reason == "length":
        render.note(f"the answer stopped at --max-tokens {options.max_tokens}")
    if options.verbose and view.done is not None:
        render.print_stats(view.done, model=name, load_s=load_s)
    if options.log:
        context = context_of(messages, inputs.question) if inputs.has_context else None
        log_exchange(name, inputs.question, view.text, view.done, system=options.system, context=context,
                     elapsed_s=clock() - started - load_s)


def log_exchange(model: str, question: str, answer: str, done: Done | None, *, system: str | None,
                 context: str | None, elapsed_s: float | None, conversation_id: str | None = None,
                 command: str = "ask") -> str | None:
    """Keep one exchange in the conversation log; returns its conversation id. A log that
    cannot be written costs a warning, never the answer already shown."""
    from dsv4cli.logs import Exchange, LogStore, logging_disabled

    if logging_disabled():
        return conversation_id
    usage, timings = (done.usage, done.timings) if done is not None else (None, None)
    exchange = Exchange(
        model=model, question=question, answer=answer, system=system, context=context,
        finish_reason=done.finish_reason if done is not None else "cancelled",
        prompt_tokens=usage.prompt_tokens if usage else None,
        cached_tokens=usage.cached_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        ttft_s=timings.ttft_s if timings else None,
        prefill_s=timings.prefill_s if timings else None,
        decode_s=timings.decode_s if timings else None,
        duration_s=elapsed_s,
    )
    try:
        with LogStore() as store:
            return store.log(exchange, conversation_id=conversation_id, command=command)
    except CliError as exc:
        warn(f"not logged: {exc}")
        return conversation_id


def question_turns(context: str | None, question: str) -> list[dict[str, str]]:
    """The user messages that ask `question`: with a context (a pack, piped text), the context
    is a message of its own and the question the next one. The context comes first, so it is
    a prefix that stays cached from question to question, and it ends where the chat template
    closes a message, so no token merges it with the question. ask, chat's first turn and
    review all use it; bench/answer_quality.py measured it best for mini."""
    question_turn = {"role": "user", "content": question}
    return [question_turn] if context is None else [{"role": "user", "content": context}, question_turn]


def context_of(messages: list[dict[str, str]], question: str) -> str | None:
    """The context of `question_turns` back out of a prompt's messages (the conversation log
    keeps it apart), or None when the question was asked alone."""
    if len(messages) >= 2 and messages[-1] == {"role": "user", "content": question} and messages[-2]["role"] == "user":
        return messages[-2]["content"]
    return None


def _messages(model: LoadedModel, inputs: AskInputs, options: AskOptions, name: str) -> list[dict[str, str]]:
    """System prompt, then the pack (fitted to the context) and the question (`question_turns`)."""
    head = [{"role": "system", "content": options.system}] if options.system else []
    question_only = head + question_turns(None, inputs.question)
    tokenizer = model.tokenizer
    context = model.context_length
    if not inputs.has_context:
        prompt_tokens = len(tokenizer.render_chat(question_only))
        _check_room(prompt_tokens, options.max_tokens, context, name)
        return question_only

    overhead = len(tokenizer.render_chat(head + question_turns("", inputs.question)))
    _check_room(overhead + _JOIN_SLACK_TOKENS, options.max_tokens, context, name)
    budget = context - overhead - _JOIN_SLACK_TOKENS - options.max_tokens
    if inputs.stdin_only:
        # Piped text alone (a diff, a log) goes in as it is: a one-document "repository"
        # frame only distracts a small model, and a single text has no outline to fall back to.
        context_text = inputs.stdin_text or ""
        needed = tokenizer.count(context_text)
        if needed > budget:
            raise CliError(
                f"context too long: stdin has {needed:,} tokens, but {name} holds {context:,} "
                f"and leaves {budget:,} for it",
                "pipe less text, lower --max-tokens, or pass files as SOURCEs so the packer can reduce them",
            )
    else:
        context_text = _pack(inputs, options, tokenizer, budget, context, name).text
    return head + question_turns(context_text, inputs.question)


def _check_room(prompt_tokens: int, max_tokens: int, context: int, name: str) -> None:
    if prompt_tokens + max_tokens > context:
        raise CliError(
            f"context too long: the prompt needs {prompt_tokens:,} tokens and --max-tokens {max_tokens:,} more, "
            f"but {name} holds {context:,}",
            "shorten the question or the system prompt, or lower --max-tokens",
        )


def _pack(inputs: AskInputs, options: AskOptions, tokenizer: Any, budget: int, context: int, name: str) -> Any:
    import ingest
    from ingest.budget import BudgetTooSmall

    excludes = configured_excludes() if options.exclude is None else options.exclude
    try:
        with render.working("packing"):
            result = ingest.pack(
                list(inputs.sources),
                options=ingest.PackOptions(format=options.pack_format, budget=budget, select=ingest.SelectOptions(excludes=excludes)),
                tokenizer=tokenizer,
                cache_dir=paths.cache_dir(),
                stdin_text=inputs.stdin_text,
            )
    except BudgetTooSmall as exc:
        raise CliError(
            f"context too long: {name} holds {context:,} tokens and leaves {budget:,} for the sources, "
            f"but {exc}",
            "ask about fewer files (a subdirectory, --max-tokens lower) or use a model with a longer context",
        ) from None
    for warning in result.warnings:
        warn(warning)
    if result.reduced:
        final = {r.path: r.after for r in result.reduced}  # a file may step full -> reduced -> listed
        outlined = sum(1 for after in final.values() if after == "reduced")
        listed = sum(1 for after in final.values() if after == "listed")
        render.note(
            f"the pack was fitted to {budget:,} tokens ({name} holds {context:,}): "
            f"{outlined} file(s) reduced to an outline, {listed} listed by path only"
            + ("" if options.verbose else " (-v lists them)")
        )
        if options.verbose:
            for path, after in final.items():
                render.note(f"  {path}: full -> {after}")
    if options.verbose:
        render.note(f"pack: {len(result.files)} file(s), {result.total_tokens:,} tokens")
    return result


def configured_excludes() -> tuple[str, ...]:
    """The `exclude` setting (user file, the project's `.dsv4.toml`, DSV4_EXCLUDE): every pack
    that ask, chat and review build leaves these paths out, as `dsv4 pack` does."""
    from dsv4cli.config import load_settings

    return tuple(load_settings(warn=lambda message: None)["exclude"])


def _usage_error(message: str) -> CliError:
    return CliError(message, "see 'dsv4 ask --help'", exit_code=EXIT_USAGE)
