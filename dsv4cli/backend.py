"""Where `dsv4 ask`, `dsv4 chat` and `dsv4 review` get their answers: the embedded engine
or an OpenAI-compatible server (`--backend URL`), behind one object.

`Backend.events(...)` yields the engine's events either way: an engine model answers through
the persistent prefix cache (and a chat's state kept in memory), a server through
dsv4cli/remote.py with its own prefix cache, a test double by itself. The commands hold one
Backend and never ask which kind it is, except to say where the answers come from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dsv4cli import remote, render
from dsv4cli.errors import EXIT_USAGE, CliError
from engine.events import Event, SamplingParams


@dataclass(frozen=True)
class CacheOptions:
    enabled: bool = True
    read_only: bool = False
    cap: str | None = None


# `--backend` words that mean the embedded engine: `local` forces it over a URL in the config
# file or DSV4_BACKEND; the config file's device words (auto, cpu, cuda) mean it too.
LOCAL = "local"
LOCAL_WORDS = (LOCAL, "auto", "cpu", "cuda")


def backend_url(option: str | None) -> str | None:
    """The server to use, None for the embedded engine: --backend (or DSV4_BACKEND) when given,
    else `backend` in the config file when it is a URL. A word other than a URL or one of
    LOCAL_WORDS is a usage error, not a silent fallback to the local engine."""
    if option is not None and option.strip():
        option = option.strip()
        if remote.is_backend_url(option):
            return option
        if option.lower() in LOCAL_WORDS:
            return None
        raise CliError(f"--backend must be an http(s) URL or '{LOCAL}', not {option!r}",
                       "e.g. --backend http://127.0.0.1:8000/v1, or --backend local for the embedded engine",
                       exit_code=EXIT_USAGE)
    from dsv4cli.config import load_settings

    configured = load_settings(warn=lambda message: None)["backend"]
    return configured if remote.is_backend_url(configured) else None


@dataclass
class Backend:
    name: str
    model: Any          # engine.runtime.LoadedModel, remote.RemoteModel, or a test double
    url: str | None = None  # the server, for a remote model

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def cancellable(self) -> bool:
        """Engine models stop at a cancel flag; anything else is stopped by KeyboardInterrupt."""
        return hasattr(self.model, "stream") and not self.is_remote

    def events(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        *,
        prompt_ids: list[int] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        cache: CacheOptions = CacheOptions(),
        cancel: Callable[[], bool] | None = None,
        live: Any = None,
        deadline: float | None = None,
    ) -> Iterator[Event]:
        """One answer. `live` (a cached_generation.LiveState) keeps an engine model's state
        from turn to turn; `deadline` (time.monotonic()) bounds a server's whole request."""
        template_kwargs = template_kwargs or {}
        stop = {"cancel": cancel} if cancel is not None else {}  # stand-ins may take no cancel
        if self.is_remote:  # the server keeps its own prefix cache and renders its own template
            return self.model.chat(alternating(messages), params, deadline=deadline,
                                   thinking=bool(template_kwargs.get("thinking")))
        from engine import cached_generation  # imports torch, which loading the model already did

        if not cached_generation.supports(self.model):
            if hasattr(self.model, "stream"):
                ids = prompt_ids if prompt_ids is not None else self.tokenizer.render_chat(messages, **template_kwargs)
                return self.model.stream(ids, params, **stop)
            return self.model.chat(messages, params, **stop, **template_kwargs)  # a stand-in model
        ids = prompt_ids if prompt_ids is not None else self.tokenizer.render_chat(messages, **template_kwargs)
        settings = cached_generation.CacheSettings(enabled=cache.enabled, read_only=cache.read_only, cap=cache.cap)
        return cached_generation.stream(self.model, ids, params, settings=settings, cancel=cancel, live=live)

    def switch(self, name: str) -> Backend:
        """The backend for another model: another served model on the same server (one it
        lists), or another local model."""
        if self.is_remote:
            return _open_remote(str(self.url), name, exact=True)
        return open_local(name)


def alternating(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Consecutive user messages (the pack, then the question: ask.question_turns) joined into
    one: some servers' chat templates (Gemma's, Mistral's) reject two user turns in a row.
    The pack still comes first, so the server's prefix cache keeps it."""
    out: list[dict[str, str]] = []
    for message in messages:
        if out and message["role"] == "user" and out[-1]["role"] == "user" and set(message) == set(out[-1]) == {"role", "content"}:
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + message["content"]}
        else:
            out.append(message)
    return out


def open_backend(model: str, url: str | None, *, deadline: float | None = None) -> Backend:
    """`deadline` (time.monotonic()) bounds a server's answer to the model list."""
    return _open_remote(url, model, deadline=deadline) if url else open_local(model)


def open_local(model: str) -> Backend:
    from dsv4cli.commands import ask as ask_command  # its `_open_model` is the seam tests replace

    return Backend(*ask_command._open_model(model))


def _open_remote(url: str, model: str, *, exact: bool = False, deadline: float | None = None) -> Backend:
    from dsv4cli.config import load_settings

    configured_key = load_settings(warn=lambda message: None)["api_key"]
    with render.working(f"connecting to {url}"):
        client = remote.open_remote(url, model, configured_key=configured_key, note=render.note, exact=exact,
                                    deadline=deadline)
    return Backend(client.name, client, url)
