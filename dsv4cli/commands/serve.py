"""`dsv4 serve`: the embedded engine behind an OpenAI-compatible HTTP API (dsv4cli/server.py).

The model is loaded once; every request goes through the persistent prefix cache, so
clients that resend the same long prefix (a pack, a conversation) only prefill what is new.
The last answer's state also stays in memory: a request that continues it or shares its
document starts from there without reading the prefix back from disk.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from dsv4cli import render
from dsv4cli.commands.ask import thinking_supported
from dsv4cli.errors import CliError
from engine.deepseek_v4.chat import encodes_tools
from engine.events import Event, SamplingParams

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Small models loop without a penalty (embedded-model.md); the same default as `dsv4 ask`.
_DEFAULT_REPETITION_PENALTY = {"mini": 1.1}


class EngineServedModel:
    """An engine model as dsv4cli.server.ServedModel: prompts rendered with its own
    template, answers through the prefix cache when the model supports it. Tools and
    thinking mode where its prompt format has them (DeepSeek-V4's), as `dsv4 ask` decides."""

    def __init__(self, loaded: Any, model_id: str, *, cache: bool = True):
        self.loaded = loaded
        self.model_id = model_id
        self.context_length = int(loaded.context_length)
        self.cache = cache
        self.supports_tools = encodes_tools(loaded.tokenizer)
        self.supports_thinking = thinking_supported(model_id, loaded)
        # The state of the last answer stays in memory: the next request rewinds it to the
        # prefix they share (a document, a conversation) and prefills only the rest, without
        # reading that prefix back from the disk cache. One state: requests run one at a time.
        self.live: Any = None

    def chat_prompt(self, messages: list[dict[str, Any]], *, thinking: bool = False) -> list[int]:
        if thinking:
            return list(self.loaded.tokenizer.render_chat(messages, thinking=True))
        return list(self.loaded.tokenizer.render_chat(messages))

    def text_prompt(self, text: str) -> list[int]:
        return list(self.loaded.tokenizer.encode(text))

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], bool]) -> Iterator[Event]:
        from engine import cached_generation

        if not cached_generation.supports(self.loaded):
            return self.loaded.stream(prompt_ids, params, cancel=cancel)
        if self.live is None:
            self.live = cached_generation.LiveState()
        settings = cached_generation.CacheSettings(enabled=self.cache)
        return cached_generation.stream(self.loaded, prompt_ids, params, settings=settings, cancel=cancel, live=self.live)


def open_served_model(name_or_path: str, *, cache: bool = True) -> EngineServedModel:
    from engine import store

    with render.transfer_progress() as progress:
        ref = store.resolve_model(name_or_path, fetch=True, progress=progress, note=render.note)
    with render.working(f"loading {ref.name}"):
        import engine

        return EngineServedModel(engine.load(str(ref.path)), ref.name, cache=cache)


def build_server(model: Any, host: str, port: int, api_key: str | None, **kwargs: Any) -> Any:
    from dsv4cli.server import ApiServer

    penalty = _DEFAULT_REPETITION_PENALTY.get(model.model_id, 1.0)
    try:
        return ApiServer((host, port), model, api_key=api_key or None, default_repetition_penalty=penalty, **kwargs)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", "choose another --port or stop the program using it") from None


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option("mini", "--model", "-m", envvar="DSV4_MODEL", metavar="MODEL", help="Alias (mini, flash, pro) or path."),
        host: str = typer.Option(DEFAULT_HOST, "--host", metavar="HOST", help="Address to listen on (loopback unless told otherwise)."),
        port: int = typer.Option(DEFAULT_PORT, "--port", metavar="PORT", min=0, max=65535, help="Port to listen on (0 = any free one)."),
        api_key: str = typer.Option(None, "--api-key", metavar="KEY", help="Require 'Authorization: Bearer KEY' (default $DSV4_API_KEY)."),
        queue: int = typer.Option(8, "--queue", metavar="N", min=0, help="Requests that may wait while one is answered; more get 503."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the prefix KV cache."),
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
        from dsv4cli.server import warn_if_exposed

        served = open_served_model(model, cache=not no_cache)
        key = api_key or os.environ.get("DSV4_API_KEY") or None
        server = build_server(served, host, port, key, queue_limit=queue)
        warn_if_exposed(host, has_key=key is not None)
        bound_host, bound_port = server.server_address[:2]
        print(f"dsv4: serving {served.model_id} at http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
