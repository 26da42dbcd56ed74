"""A model behind an OpenAI-compatible chat-completions endpoint (`--backend URL`): vLLM,
SGLang, the DeepSeek API or `dsv4 serve`.

`RemoteModel.chat()` yields the engine's events (TextDelta..., Done with Usage, the server's
cached-token count included), so `dsv4 ask` renders, reports and prints JSON unchanged.
Errors become one EngineError line with a hint (BackendTimeout when time ran out). A request
is retried only when no byte of an answer arrived and the failure was a refused/reset
connection or a 503 (the server did no work). A `deadline` (time.monotonic()) bounds the whole
request, every read included, for `dsv4 review --timeout`.

Thinking mode (`--think`): servers with a reasoning parser stream the reasoning apart from
the answer, in `delta.reasoning_content` (vLLM, SGLang, the DeepSeek API) or `delta.reasoning`
(vLLM's newer name). It is passed on the way the engine streams DeepSeek-V4's own reply,
reasoning, then `</think>`, then the answer, so one AnswerView (render.py) splits both alike.
Reasoning a server sends unasked (the DeepSeek API thinks by default) is not shown as answer.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from engine.errors import EngineError
from engine.events import Done, Event, SamplingParams, TextDelta, Timings, Usage

DEFAULT_TIMEOUT_S = 600.0          # a long prompt's prefill on a busy server takes minutes
DEFAULT_CONNECT_TIMEOUT_S = 10.0
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
# When the server does not say its context length (the DeepSeek API does not).
FALLBACK_CONTEXT = 131072
# Without the served model's tokenizer, a pack is fitted with a conservative estimate:
# BPE vocabularies average 3.5-4.5 bytes a token on code and prose, dense code less
# (SmolLM2: 3.7 on dsv4cli/server.py, 2.5 on a one-line recursive function).
_ESTIMATE_BYTES_PER_TOKEN = 2.5
_MESSAGE_OVERHEAD_TOKENS = 8
# The end of the reasoning in the engine's own stream (render.ReasoningSplitter splits on it).
THINK_CLOSE = "</think>"
# Delta fields that carry reasoning: `reasoning_content` (DeepSeek API, SGLang, vLLM before
# 0.11), `reasoning` (vLLM since 0.11: https://docs.vllm.ai/en/v0.11.2/features/reasoning_outputs/).
REASONING_FIELDS = ("reasoning_content", "reasoning")
# Hosts of DeepSeek's own API, which takes `thinking: {"type": "enabled"|"disabled"}` and
# thinks by default (https://api-docs.deepseek.com/guides/thinking_mode).
_DEEPSEEK_API_HOSTS = ("api.deepseek.com",)


def is_backend_url(value: str | None) -> bool:
    return bool(value) and str(value).startswith(("http://", "https://"))


def api_key_from_environment(configured: str | None = None) -> str | None:
    return os.environ.get("DSV4_API_KEY") or os.environ.get("OPENAI_API_KEY") or configured or None


class EstimatingTokenizer:
    """Token counts for fitting a pack when the served model's tokenizer is not at hand:
    an upper-side estimate from the UTF-8 length."""

    digest = "estimate-bytes-per-token-2.5"

    def count(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / _ESTIMATE_BYTES_PER_TOKEN)

    def count_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[int]:
        return [self.count(text) for text in texts]

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **_: Any) -> list[int]:
        total = sum(self.count(str(m.get("content", ""))) + _MESSAGE_OVERHEAD_TOKENS for m in messages)
        return [0] * total  # only the length is used


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    base_path: str  # e.g. "/v1"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineError(f"--backend {url!r} is not an http(s) URL", "e.g. --backend http://127.0.0.1:8000/v1")
        path = parts.path.rstrip("/")
        if path.endswith("/chat/completions"):
            path = path[: -len("/chat/completions")]
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), path or "/v1")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base_path}"


class _Retryable(Exception):
    pass


class BackendTimeout(EngineError):
    """The server did not answer (or finish answering) in the time allowed."""


def _time_left(timeout_s: float, deadline: float | None) -> float:
    """Seconds the next network step may take; BackendTimeout when the deadline has passed."""
    if deadline is None:
        return timeout_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise BackendTimeout("the time budget ran out before the server answered", "raise --timeout")
    return min(timeout_s, left)


class RemoteModel:
    """The `LoadedModel` interface `dsv4 ask` uses, answered by a server."""

    is_remote = True

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        context_length: int = FALLBACK_CONTEXT,
        tokenizer: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        sleep: Callable[[float], None] = time.sleep,
        note: Callable[[str], None] | None = None,
    ):
        self.endpoint = Endpoint.parse(url)
        self.name = model
        self.api_key = api_key
        self.context_length = context_length
        self.tokenizer = tokenizer or EstimatingTokenizer()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry_delays_s = tuple(retry_delays_s)
        self._sleep = sleep
        self._note = note
        self._unasked_reasoning_noted = False

    # ---------------------------------------------------------------- discovery

    def served_models(self, deadline: float | None = None) -> list[dict[str, Any]]:
        """GET /models: the ids (and context lengths, where the server gives them)."""
        response, connection = self._request("GET", "/models", None, deadline)
        try:
            body = _read_json(response, self.endpoint)
        finally:
            connection.close()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise EngineError(f"{self.endpoint.url}/models answered without a model list", "is --backend an OpenAI-compatible /v1 URL?")
        return [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]

    # ---------------------------------------------------------------- generation

    def chat(self, messages: list[dict[str, str]], params: SamplingParams, *, deadline: float | None = None,
             thinking: bool = False, **_: Any) -> Iterator[Event]:
        """One streamed answer; `thinking` asks for the model's reasoning (see the module's note)."""
        body: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        # Extensions vLLM, SGLang and dsv4 serve understand; sent only when they change anything.
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        body.update(self.thinking_switch(thinking))
        return self._stream(body, deadline, thinking)

    def thinking_switch(self, thinking: bool) -> dict[str, Any]:
        """The request fields that turn thinking mode on (or, for the DeepSeek API, off).

        vLLM and SGLang take it as a chat-template variable: DeepSeek-V3.1 and later think only
        with `chat_template_kwargs: {"thinking": true}`, which also tells their DeepSeek
        reasoning parsers to split the reasoning out (https://docs.vllm.ai/en/stable/features/
        reasoning_outputs/; DeepSeek-V4 "keep reasoning controls in chat_template_kwargs":
        https://recipes.vllm.ai/deepseek-ai/DeepSeek-V4-Flash; SGLang's "thinking parameter":
        https://docs.sglang.io/docs/advanced_features/separate_reasoning). A template that does
        not use the variable ignores it. Without --think nothing is sent: the request stays as
        it was and the server's default holds. The DeepSeek API has its own `thinking` object
        and thinks unless told not to, so it is always told."""
        if self.endpoint.host in _DEEPSEEK_API_HOSTS:
            return {"thinking": {"type": "enabled" if thinking else "disabled"}}
        return {"chat_template_kwargs": {"thinking": True}} if thinking else {}

    def _stream(self, body: dict[str, Any], deadline: float | None = None, thinking: bool = False) -> Iterator[Event]:
        started = time.perf_counter()
        response, connection = self._request("POST", "/chat/completions", body, deadline)
        first_token_at: float | None = None
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        completion_tokens = 0
        answered = False  # some answer text came (reasoning after it is not expected)
        try:
            if not (response.getheader("Content-Type") or "").startswith("text/event-stream"):
                raise EngineError(f"{self.endpoint.url} did not stream its answer", "is --backend an OpenAI-compatible /v1 URL?")
            ended_properly = False
            for data in _sse_data(response, self.endpoint, self._read_timeouts(connection, deadline)):
                if data == "[DONE]":
                    ended_properly = True
                    break
                chunk = _parse_chunk(data, self.endpoint)
                if "error" in chunk:
                    raise EngineError(f"{self.endpoint.url}: {_error_message(chunk)}", "the server failed mid-answer")
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    reasoning = _reasoning_text(delta)
                    answer = delta.get("content") or ""
                    if reasoning or answer:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        completion_tokens += 1  # one chunk is one token on vLLM and SGLang; usage corrects it
                    if reasoning and not thinking:
                        self._note_unasked_reasoning()
                    elif reasoning and not answered:
                        pieces.append(reasoning)
                        yield TextDelta(reasoning, completion_tokens)
                    if answer:
                        if thinking and not answered:
                            answer = THINK_CLOSE + answer  # the reasoning, if any, is over
                        answered = True
                        pieces.append(answer)
                        yield TextDelta(answer, completion_tokens)
                    finish = choice.get("finish_reason") or finish
            if not ended_properly and finish is None:
                raise EngineError(f"{self.endpoint.url} broke the answer off before its end", "check the server's log")
        finally:
            connection.close()
        ended = time.perf_counter()
        yield _done(pieces, finish, usage, completion_tokens, started, first_token_at, ended)

    def _note_unasked_reasoning(self) -> None:
        if self._note is not None and not self._unasked_reasoning_noted:
            self._unasked_reasoning_noted = True
            self._note(f"{self.endpoint.url} sends {self.name}'s reasoning too; --think shows it")

    # ---------------------------------------------------------------- transport

    def _read_timeouts(self, connection: http.client.HTTPConnection, deadline: float | None) -> Callable[[], None]:
        """Before each read of the stream: a read may take what is left of the deadline."""
        sock = getattr(connection, "_dsv4_socket", None)

        def before_read() -> None:
            if deadline is not None and sock is not None:
                sock.settimeout(_time_left(self.timeout_s, deadline))

        return before_read

    def _request(self, method: str, path: str, body: dict[str, Any] | None, deadline: float | None = None) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        attempts = len(self.retry_delays_s) + 1
        for attempt in range(attempts):
            try:
                return self._request_once(method, path, body, deadline)
            except _Retryable as exc:
                if attempt == attempts - 1:
                    raise _unreachable(self.endpoint, exc.__cause__ or exc) from None
                delay = self.retry_delays_s[attempt]
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise _unreachable(self.endpoint, exc.__cause__ or exc) from None  # no time for another try
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, body: dict[str, Any] | None, deadline: float | None = None) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        endpoint = self.endpoint
        factory = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
        timeout_s = _time_left(self.timeout_s, deadline)
        connection = factory(endpoint.host, endpoint.port, timeout=min(self.connect_timeout_s, timeout_s))
        headers = {"Accept": "text/event-stream, application/json", "User-Agent": "dsv4"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = None
        if body is not None:
            payload = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.connect()
            connection.sock.settimeout(timeout_s)
            # Kept for the stream's reads: http.client drops `sock` when the response owns it.
            connection._dsv4_socket = connection.sock  # type: ignore[attr-defined]
            connection.request(method, endpoint.base_path + path, body=payload, headers=headers)
            response = connection.getresponse()
        except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, http.client.RemoteDisconnected) as exc:
            # Nothing of an answer arrived: the request can be sent again safely.
            connection.close()
            raise _Retryable() from exc
        except (socket.timeout, TimeoutError) as exc:
            connection.close()
            if deadline is not None and timeout_s < self.timeout_s:
                raise BackendTimeout(f"{endpoint.url} did not answer within the time budget", "raise --timeout") from exc
            raise BackendTimeout(f"{endpoint.url} did not answer within {self.timeout_s:g} s", "the server may be overloaded; try again later") from exc
        except OSError as exc:
            connection.close()
            raise _unreachable(endpoint, exc) from None
        if response.status == 503:
            detail = _error_detail(response)
            connection.close()
            raise _Retryable(f"503 {detail}")
        if response.status >= 400:
            detail = _error_detail(response)
            connection.close()
            raise _status_error(endpoint, response.status, detail)
        return response, connection


def _done(pieces: list[str], finish: str | None, usage: dict[str, Any] | None, counted: int, started: float, first: float | None, ended: float) -> Done:
    usage = usage or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or counted)
    details = usage.get("prompt_tokens_details") or {}
    # DeepSeek's own API reports prompt_cache_hit_tokens instead of the OpenAI field.
    cached = int((details.get("cached_tokens") if isinstance(details, dict) else 0) or usage.get("prompt_cache_hit_tokens") or 0)
    ttft = (first if first is not None else ended) - started
    decode_s = ended - first if first is not None else 0.0
    return Done(
        finish_reason="length" if finish == "length" else "stop",
        usage=Usage(prompt_tokens=prompt_tokens, cached_tokens=cached, completion_tokens=completion_tokens),
        timings=Timings(
            ttft_s=ttft,
            prefill_s=ttft,  # as seen from here: the server's prefill plus the network
            prefill_tok_s=(prompt_tokens - cached) / ttft if ttft > 0 else 0.0,
            decode_s=decode_s,
            decode_tok_s=(completion_tokens - 1) / decode_s if decode_s > 0 and completion_tokens > 1 else 0.0,
        ),
        text="".join(pieces),
        extra={"backend": "remote"},
    )


def _reasoning_text(delta: dict[str, Any]) -> str:
    for name in REASONING_FIELDS:
        value = delta.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def _sse_data(response: http.client.HTTPResponse, endpoint: Endpoint, before_read: Callable[[], None] = lambda: None) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, one per event."""
    lines: list[str] = []
    try:
        while True:
            before_read()
            raw = response.readline()
            if not raw:
                break
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if lines:
                    yield "\n".join(lines)
                    lines = []
            elif line.startswith("data:"):
                lines.append(line[5:].lstrip(" "))
            # comments (":" keep-alives), event: and id: lines carry nothing we use
    except (socket.timeout, TimeoutError) as exc:
        raise BackendTimeout(f"{endpoint.url} stopped sending mid-answer", "the server may be overloaded; try again later") from exc
    except (ConnectionError, http.client.IncompleteRead, UnicodeDecodeError) as exc:
        raise EngineError(f"{endpoint.url} broke the answer off ({exc.__class__.__name__})", "check the server's log") from exc
    if lines:
        yield "\n".join(lines)


def _parse_chunk(data: str, endpoint: Endpoint) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise EngineError(f"{endpoint.url} sent an event that is not JSON: {data[:80]!r}", "is --backend an OpenAI-compatible /v1 URL?") from None
    if not isinstance(chunk, dict):
        raise EngineError(f"{endpoint.url} sent an event that is not a JSON object", "is --backend an OpenAI-compatible /v1 URL?")
    return chunk


def _read_json(response: http.client.HTTPResponse, endpoint: Endpoint) -> Any:
    try:
        return json.loads(response.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EngineError(f"{endpoint.url} answered with something that is not JSON", "is --backend an OpenAI-compatible /v1 URL?") from None
    except (socket.timeout, TimeoutError) as exc:
        raise EngineError(f"{endpoint.url} did not finish its answer in time", "the server may be overloaded; try again later") from exc


def _error_detail(response: http.client.HTTPResponse) -> str:
    try:
        raw = response.read(64 << 10)
        return _error_message(json.loads(raw))
    except Exception:  # noqa: BLE001 - a broken error body still leaves the status line
        return ""


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "")
    if isinstance(error, str):
        return error
    return str(body.get("message") or "") if isinstance(body, dict) else ""


def _status_error(endpoint: Endpoint, status: int, detail: str) -> EngineError:
    hints = {
        401: "set DSV4_API_KEY (or OPENAI_API_KEY, or api_key in the config file)",
        403: "the API key may not use this model",
        404: "check the --backend URL (it usually ends in /v1) and --model",
        413: "the prompt is too large for the server; ask about fewer files",
        429: "the server is rate-limiting; wait and try again",
    }
    hint = hints.get(status) or ("the server failed; check its log" if status >= 500 else "the server rejected the request")
    what = f"{endpoint.url} answered {status} {http.client.responses.get(status, '')}".rstrip()
    return EngineError(f"{what}: {detail}" if detail else what, hint)


def _unreachable(endpoint: Endpoint, exc: BaseException) -> EngineError:
    if isinstance(exc, _Retryable) and str(exc).startswith("503"):
        return _status_error(endpoint, 503, str(exc)[4:])
    reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
    return EngineError(f"cannot reach {endpoint.url} ({reason})", "is the server running? check --backend / DSV4_BACKEND")


def open_remote(url: str, requested_model: str, *, configured_key: str | None = None, note: Callable[[str], None] | None = None,
                exact: bool = False, deadline: float | None = None) -> RemoteModel:
    """Connect to the backend and pick the model: the one asked for when the server has it,
    else the server's first (a default `mini` means nothing to a remote server); with
    `exact` (chat's /model NAME) a model the server does not list is an error."""
    client = RemoteModel(url, requested_model, api_key=api_key_from_environment(configured_key), note=note)
    entries = client.served_models(deadline)
    ids = [entry["id"] for entry in entries]
    if exact and requested_model not in ids:
        raise EngineError(f"{client.endpoint.url} has no model {requested_model!r}", f"it serves: {', '.join(ids) or 'nothing'}")
    chosen = next((entry for entry in entries if entry["id"] == requested_model), entries[0] if entries else None)
    if chosen is None:
        raise EngineError(f"{client.endpoint.url} serves no models", "check the server")
    # The built-in default `mini` says nothing about a server with one model: no note then.
    if chosen["id"] != requested_model and note is not None and (requested_model != "mini" or len(ids) > 1):
        note(f"{client.endpoint.url} has no model {requested_model!r}; using {chosen['id']!r} (of {', '.join(ids)})")
    client.name = chosen["id"]
    context = chosen.get("max_model_len") or chosen.get("context_length")
    if isinstance(context, int) and context > 0:
        client.context_length = context
    client.tokenizer = _local_tokenizer(client.name) or client.tokenizer
    return client


def _local_tokenizer(model_id: str) -> Any:
    """The served model's own tokenizer when it is installed here (exact pack fitting)."""
    from engine import store

    try:
        return store.load_tokenizer(model_id, fetch=False)
    except Exception:  # noqa: BLE001 - not installed or not readable: estimate instead
        return None
