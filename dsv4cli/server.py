"""An OpenAI-compatible HTTP API in front of one model (`dsv4 serve`), on the standard library.

    GET  /v1/models
    POST /v1/chat/completions   (stream: server-sent events; else one JSON object)
    POST /v1/completions        (a prompt string)

The engine is not thread-safe, so one generation runs at a time: requests wait for the
engine lock, and at most `queue_limit` may wait; more get 503 at once. A client that goes
away mid-stream is noticed on the next write and its generation is cancelled. Nothing here
knows the engine: `ServedModel` is the seam (dsv4cli/commands/serve.py adapts engine models).

Honoured: max_tokens / max_completion_tokens, stop (up to 4 strings), temperature, top_p,
top_k, seed, repetition_penalty, stream and stream_options.include_usage. Refused with a 400
naming the field: n or best_of above 1, logprobs / top_logprobs (the engine streams text, not
its logits), echo, suffix, functions (the legacy form of tools), response_format other than text.

Tools: for a model whose prompt format writes them (DeepSeek-V4's DSML), `tools` go on the
leading system message as vLLM does, assistant `tool_calls` and tool `tool_call_id` pass
through to the prompt, and a call block in the answer comes back as OpenAI `tool_calls`
(message.tool_calls with finish_reason "tool_calls"; streamed, delta.tool_calls chunks).
tool_choice "auto" (the default) or "none" (the tools are left out of the prompt and the
answer is plain text); any other tool_choice, or tools for a model without them (mini), is a
400 naming the field.

Thinking mode: `chat_template_kwargs: {"thinking": true}` (vLLM and SGLang's switch) or
`thinking: {"type": "enabled"}` (the DeepSeek API's) renders the prompt in the model's
thinking mode when it has one (DeepSeek-V4: the prompt ends with `<think>`), and the reply's
reasoning, everything before the first `</think>`, comes back apart from the answer as
DeepSeek's API and vLLM's reasoning parsers return it: `message.reasoning_content` beside
`message.content`; streamed, `delta.reasoning_content` chunks, then `delta.content` ones. An
assistant message's `reasoning_content` goes back into the prompt where the format keeps it
(turns with tool calls). A model without a thinking mode (mini) ignores the switch.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from engine.chat_template import ChatTemplateError
from engine.deepseek_v4.tool_calls import ToolCall, ToolCallParser
from engine.events import Done, Event, PrefillProgress, SamplingParams, TextDelta

DEFAULT_MAX_BODY_BYTES = 16 << 20   # a 1M-token prompt is ~4 MB of text; leave room for JSON
DEFAULT_QUEUE_LIMIT = 8
DEFAULT_MAX_TOKENS = 512
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MAX_STOP_STRINGS = 4  # OpenAI's limit; each one is searched for after every token
END_OF_REASONING = "</think>"  # in thinking mode the reply starts inside the reasoning


class ServedModel(Protocol):
    """What the server needs from a model. Optionally (False when absent):
    `supports_tools: bool`: chat_prompt writes `tools` on a system message and `tool_calls`
    on assistant messages; `supports_thinking: bool`: chat_prompt takes `thinking=True` and
    then renders the prompt in thinking mode (the reply is reasoning, `</think>`, answer)."""

    model_id: str
    context_length: int

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...

    def text_prompt(self, text: str) -> list[int]: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], bool]) -> Iterator[Event]: ...


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServerStats:
    """Counters tests and the benchmark read."""

    requests: int = 0
    rejected_busy: int = 0
    cancelled: int = 0
    last_done: Done | None = None


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        model: ServedModel,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        default_repetition_penalty: float = 1.0,
    ):
        super().__init__(address, _Handler)
        self.model = model
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.default_repetition_penalty = default_repetition_penalty
        self.stats = ServerStats()
        self.engine_lock = threading.Lock()
        # The running request plus the waiting ones; acquiring never blocks.
        self.slots = threading.BoundedSemaphore(queue_limit + 1)
        self.created = int(time.time())

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping a kept-alive connection is routine, not worth a traceback on the
        # server's stderr; anything else still gets the standard report.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def start_in_thread(server: ApiServer) -> threading.Thread:
    """Serve in a daemon thread (tests, the benchmark); stop with server.shutdown()."""
    thread = threading.Thread(target=server.serve_forever, name="dsv4-serve", daemon=True)
    thread.start()
    return thread


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "dsv4"
    # TCP_NODELAY: a response is written as headers then body (and a stream as one write per
    # event); with Nagle's algorithm the second write waits for the client's delayed ACK,
    # 40 ms per answer on a kept-alive connection (the openai client keeps them).
    disable_nagle_algorithm = True
    _chunked = False  # whether the response being written uses chunked transfer encoding

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # stdout is the payload channel, and per-request lines on stderr are noise

    # ---------------------------------------------------------------- routing

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, handler: Callable[[], None]) -> None:
        self._chunked = False  # one handler serves every request on its connection
        try:
            self._check_auth()
            handler()
        except ApiError as exc:
            self._send_json(exc.status, exc.body)
        except _ClientGone:
            self.close_connection = True

    def _get(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            raise ApiError(404, f"no route {self.path}", code="not_found")
        entry = {"id": self.server.model.model_id, "object": "model", "created": self.server.created,
                 "owned_by": "dsv4", "max_model_len": self.server.model.context_length}
        self._send_json(200, {"object": "list", "data": [entry]})

    def _post(self) -> None:
        route = self.path.rstrip("/")
        if route not in ("/v1/chat/completions", "/v1/completions"):
            self._discard_body()
            raise ApiError(404, f"no route {self.path}", code="not_found")
        request = self._read_json()
        chat = route == "/v1/chat/completions"
        model = self.server.model
        requested = request.get("model")
        if requested is not None and requested != model.model_id:
            raise ApiError(404, f"the model {requested!r} does not exist; this server has {model.model_id!r}", param="model", code="model_not_found")
        tools_supported = chat and bool(getattr(model, "supports_tools", False))
        _refuse_unsupported(request, chat, tools_supported)
        tools = _tools(request) if chat else []
        thinking = chat and _thinking_requested(request) and bool(getattr(model, "supports_thinking", False))
        try:
            if chat:
                messages = _with_tools(_messages(request, keep_tool_fields=tools_supported, keep_reasoning=thinking), tools)
                prompt_ids = model.chat_prompt(messages, thinking=True) if thinking else model.chat_prompt(messages)
            else:
                prompt_ids = model.text_prompt(_prompt(request))
        except ChatTemplateError as exc:  # a role or shape the model's prompt format refuses
            raise ApiError(400, f"{exc} ({exc.hint})" if exc.hint else str(exc), param="messages") from None
        params = self._params(request, len(prompt_ids))
        if not self.server.slots.acquire(blocking=False):
            self.server.stats.rejected_busy += 1
            raise ApiError(503, "the server is busy: too many requests are waiting", type="server_error", code="server_busy")
        try:
            with self.server.engine_lock:
                self.server.stats.requests += 1
                self._answer(request, chat, prompt_ids, params, parse_calls=bool(tools), thinking=thinking)
        finally:
            self.server.slots.release()

    # ---------------------------------------------------------------- requests

    def _check_auth(self) -> None:
        key = self.server.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self._discard_body()
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def _body_length(self) -> int:
        try:
            return int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return -1

    def _discard_body(self) -> None:
        length = self._body_length()
        if 0 < length <= self.server.max_body_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _read_json(self) -> dict[str, Any]:
        length = self._body_length()
        if length < 0 or "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.close_connection = True
            raise ApiError(400, "send the request body with a Content-Length")
        if length > self.server.max_body_bytes:
            self.close_connection = True  # the unread body would be parsed as the next request
            raise ApiError(413, f"the request body has {length:,} bytes; the limit is {self.server.max_body_bytes:,}", code="request_too_large")
        try:
            request = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(request, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return request

    def _params(self, request: dict[str, Any], prompt_tokens: int) -> SamplingParams:
        context = self.server.model.context_length
        room = context - prompt_tokens
        # max_completion_tokens is the newer name (chat); when both are sent it wins.
        name = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
        asked = request.get(name)
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
            raise ApiError(400, f"{name} must be a positive integer", param=name)
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                f"and {asked or 1} more were asked for",
                param="messages", code="context_length_exceeded",
            )
        stop = request.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, not {len(stop)}", param="stop")
        try:
            return SamplingParams(
                max_tokens=asked if asked is not None else min(self.server.default_max_tokens, room),
                temperature=_number(request, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(request, "top_p", 1.0, 0.0, 1.0),
                top_k=int(_number(request, "top_k", 0, 0, 1 << 20)),
                repetition_penalty=_number(request, "repetition_penalty", self.server.default_repetition_penalty, 0.01, 10.0),
                seed=None if request.get("seed") is None else int(request["seed"]),
                stop=tuple(stop),
            )
        except (TypeError, ValueError):
            raise ApiError(400, "seed must be an integer", param="seed") from None

    # ---------------------------------------------------------------- answers

    def _answer(self, request: dict[str, Any], chat: bool, prompt_ids: list[int], params: SamplingParams, *,
                parse_calls: bool = False, thinking: bool = False) -> None:
        cancelled = threading.Event()
        events = self.server.model.generate(prompt_ids, params, cancelled.is_set)
        answer_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if request.get("stream"):
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            self._stream(events, cancelled, chat, answer_id, include_usage, ToolCallParser() if parse_calls else None,
                         ReasoningSeparator() if thinking else None)
            return
        done = None
        pieces: list[str] = []
        for event in events:
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            elif isinstance(event, Done):
                done = event
        assert done is not None, "a generation always ends with Done"
        self.server.stats.last_done = done
        text = done.text or "".join(pieces)
        reasoning = None
        if thinking:
            separator = ReasoningSeparator()
            reasoning, text = separator.feed(text)
            reasoning += separator.finish()
        calls: list[ToolCall] = []
        if parse_calls:
            parser = ToolCallParser()
            items = parser.feed(text) + parser.finish()
            text, calls = "".join(i for i in items if isinstance(i, str)), parser.calls
        if not chat:
            choice: dict[str, Any] = {"index": 0, "text": text}
        elif calls:
            choice = {"index": 0, "message": {"role": "assistant", "content": text or None,
                                              "tool_calls": [_call_json(call) for call in calls]}}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        if reasoning is not None:
            choice["message"]["reasoning_content"] = reasoning
        choice.update(finish_reason="tool_calls" if calls else _finish_reason(done), logprobs=None)
        self._send_json(200, {
            "id": answer_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.server.model.model_id, "choices": [choice], "usage": _usage(done),
        })

    def _stream(self, events: Iterator[Event], cancelled: threading.Event, chat: bool, answer_id: str, include_usage: bool,
                parser: ToolCallParser | None = None, separator: ReasoningSeparator | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # HTTP/1.1: chunked, so the connection serves the client's next request too;
        # an HTTP/1.0 client reads the stream until the connection closes.
        self._chunked = self.request_version == "HTTP/1.1"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        head = {"id": answer_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model.model_id}

        def chunk(content: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if content is None else {"content": content}
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": content or ""}
            choice.update(finish_reason=finish, logprobs=None)
            return {**head, "choices": [choice]}

        def send_answer(text: str) -> None:
            if parser is not None:
                send_text_and_calls(parser.feed(text))
            elif text:
                self._send_event(chunk(text, None))

        def send_reasoning(text: str) -> None:
            if text:
                self._send_event({**head, "choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None, "logprobs": None}]})

        def send_text_and_calls(items: list[str | ToolCall]) -> None:
            assert parser is not None
            for item in items:
                if isinstance(item, str):
                    self._send_event(chunk(item, None))
                else:  # the whole call at once: its block was held back until it closed
                    index = len(sent_calls)
                    sent_calls.append(item)
                    call = {"index": index, **_call_json(item)}
                    self._send_event({**head, "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None, "logprobs": None}]})

        done = None
        sent_calls: list[ToolCall] = []
        try:
            if chat:
                self._send_event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
            for event in events:
                if isinstance(event, TextDelta) and separator is not None:
                    reasoning, answer = separator.feed(event.text)
                    send_reasoning(reasoning)
                    send_answer(answer)
                elif isinstance(event, TextDelta):
                    send_answer(event.text)
                elif isinstance(event, PrefillProgress):
                    # An SSE comment: clients skip it, and a client gone during a long
                    # prefill is noticed here rather than at the first token.
                    self._write(f": prefill {event.done}/{event.total}\n\n".encode())
                elif isinstance(event, Done):
                    done = event
            assert done is not None, "a generation always ends with Done"
            if separator is not None:
                send_reasoning(separator.finish())
            if parser is not None:
                send_text_and_calls(parser.finish())
            self.server.stats.last_done = done  # before the client can see the end
            self._send_event(chunk(None, "tool_calls" if sent_calls else _finish_reason(done)))
            if include_usage:
                self._send_event({**head, "choices": [], "usage": _usage(done)})
            self._write(b"data: [DONE]\n\n")
            if self._chunked:
                self._write(b"")  # the last chunk: the answer is complete
        except _ClientGone:
            # The engine sees the flag before its next token and ends with Done("cancelled").
            cancelled.set()
            self.server.stats.cancelled += 1
            for event in events:
                if isinstance(event, Done):
                    self.server.stats.last_done = event
            raise

    # ---------------------------------------------------------------- writing

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_event(self, body: dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        if self._chunked:  # one chunk per write; an empty one ends the body
            data = b"%x\r\n%s\r\n" % (len(data), data)
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise _ClientGone from exc


def _messages(request: dict[str, Any], *, keep_tool_fields: bool = False, keep_reasoning: bool = False) -> list[dict[str, Any]]:
    """role + content of each message; with keep_tool_fields, also an assistant's tool_calls
    (whose content may then be null) and a tool result's tool_call_id; with keep_reasoning,
    an assistant's reasoning_content."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a role and content", param="messages")
        role, content = message["role"], message.get("content")
        calls = message.get("tool_calls") if keep_tool_fields and role == "assistant" else None
        if isinstance(content, list):  # content parts: only text is understood
            # DeepSeek's encoder joins a tool result's text parts with blank lines.
            joiner = "\n\n" if role == "tool" and keep_tool_fields else ""
            content = joiner.join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, "message content must be a string or text parts", param="messages")
        entry: dict[str, Any] = {"role": role, "content": content}
        if calls:
            entry["tool_calls"] = _checked_calls(calls)
        if keep_tool_fields and role == "tool" and isinstance(message.get("tool_call_id"), str):
            entry["tool_call_id"] = message["tool_call_id"]
        if keep_reasoning and role == "assistant" and isinstance(message.get("reasoning_content"), str):
            entry["reasoning_content"] = message["reasoning_content"]
        out.append(entry)
    return out


def _checked_calls(calls: Any) -> list[dict[str, Any]]:
    if isinstance(calls, list) and all(
        isinstance(call, dict) and isinstance(call.get("function"), dict)
        and isinstance(call["function"].get("name"), str) and isinstance(call["function"].get("arguments", "{}"), str)
        for call in calls
    ):
        return calls
    raise ApiError(400, 'each tool call needs {"type": "function", "function": {"name": ..., "arguments": "..."}}', param="messages")


def _thinking_requested(request: dict[str, Any]) -> bool:
    """Whether a chat request asks for thinking mode: the DeepSeek API's `thinking` object
    when given, else vLLM/SGLang's `chat_template_kwargs.thinking`."""
    switch = request.get("thinking")
    if switch is not None:
        if not isinstance(switch, dict) or switch.get("type") not in ("enabled", "disabled"):
            raise ApiError(400, 'thinking must be {"type": "enabled"} or {"type": "disabled"}', param="thinking")
        return switch["type"] == "enabled"
    kwargs = request.get("chat_template_kwargs")
    if kwargs is None:
        return False
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("thinking", False), bool):
        raise ApiError(400, 'chat_template_kwargs must be an object like {"thinking": true}', param="chat_template_kwargs")
    return kwargs.get("thinking", False)


class ReasoningSeparator:
    """Splits a thinking-mode reply, streamed in pieces, into reasoning and answer: the reply
    starts inside the reasoning and the first `</think>` ends it (it may arrive cut across
    pieces, so a possible start of it is held back). Later tags are answer text."""

    def __init__(self) -> None:
        self.inside = True
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) completed by this piece; either may be empty."""
        if not self.inside:
            return "", text
        held = self._held + text
        at = held.find(END_OF_REASONING)
        if at >= 0:
            self.inside, self._held = False, ""
            return held[:at], held[at + len(END_OF_REASONING):]
        keep = next((n for n in range(min(len(held), len(END_OF_REASONING) - 1), 0, -1)
                     if END_OF_REASONING.startswith(held[-n:])), 0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep], ""

    def finish(self) -> str:
        """The reasoning held back at the end (a reply cut off before `</think>` is all reasoning)."""
        held, self._held = self._held, ""
        return held


def _tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool definitions to put in the prompt: none when tool_choice is "none"."""
    tools = request.get("tools") or []
    if not isinstance(tools, list) or not all(
        isinstance(tool, dict) and tool.get("type", "function") == "function"
        and isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str)
        for tool in tools
    ):
        raise ApiError(400, 'tools must be a list of {"type": "function", "function": {"name": ..., "parameters": {...}}}', param="tools")
    return [] if request.get("tool_choice") == "none" else tools


def _with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Request-level tools on the leading system message (an empty one put first when there
    is none), where vLLM's DeepSeek-V4 tokenizer puts them."""
    if not tools:
        return messages
    if messages[0]["role"] == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *messages]


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _refuse_unsupported(request: dict[str, Any], chat: bool, tools_supported: bool = False) -> None:
    """Fields this server cannot honour get a 400 that names them, rather than an answer
    that silently ignores them (a client asking for two choices or for token probabilities
    would otherwise read a wrong answer as a right one)."""
    for key in ("n", "best_of"):
        value = request.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(400, f"{key} must be a positive integer", param=key)
        if value > 1:
            raise ApiError(400, f"{key}={value} is not supported: this server generates one choice per request "
                           "(send the request again for another sample)", param=key, code="unsupported_parameter")
    # Token probabilities: the engine streams text and does not hand out its logits.
    logprobs = request.get("logprobs")
    wants_logprobs = logprobs is True if chat else (logprobs is not None and logprobs is not False)
    if wants_logprobs:
        raise ApiError(400, "logprobs are not supported by this server: the engine does not report token probabilities",
                       param="logprobs", code="unsupported_parameter")
    if request.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "top_logprobs is not supported by this server: the engine does not report token probabilities",
                       param="top_logprobs", code="unsupported_parameter")
    if not chat and request.get("echo"):
        raise ApiError(400, "echo is not supported by this server", param="echo", code="unsupported_parameter")
    if not chat and request.get("suffix"):
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this server", param="suffix", code="unsupported_parameter")
    if request.get("functions"):
        raise ApiError(400, "functions are not supported by this server: send tools instead", param="functions", code="unsupported_parameter")
    if request.get("tools") and not tools_supported:
        raise ApiError(400, "tools are not supported for this model: its prompt format has no tool definitions "
                       "(DeepSeek-V4's has)", param="tools", code="unsupported_parameter")
    tool_choice = request.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {json.dumps(tool_choice)} is not supported by this server: only \"auto\" and \"none\"",
                       param="tool_choice", code="unsupported_parameter")
    response_format = request.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported by this server",
                       param="response_format", code="unsupported_parameter")
    options = request.get("stream_options")
    if options is not None:
        if not request.get("stream"):
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")


def _prompt(request: dict[str, Any]) -> str:
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return prompt


def _number(request: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = request.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}", param=key)
    return float(value)


def _finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _usage(done: Done) -> dict[str, Any]:
    usage = done.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def warn_if_exposed(host: str, *, has_key: bool) -> None:
    if not is_loopback(host):
        advice = "" if has_key else " without an API key (set --api-key or DSV4_API_KEY)"
        print(f"Warning: serving on {host}, reachable from other machines{advice}", file=sys.stderr)
