"""The remote model behind `--backend` (dsv4cli/remote.py) against a small stdlib server on
loopback that answers as told: a proper stream (usage with cached tokens), 401, 500, 503
then success, garbage, a stream broken off, and silence (timeout). Retries happen only for
refused connections and 503, never once an answer has started."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsv4cli import remote as remote_module
from dsv4cli.remote import EstimatingTokenizer, RemoteModel, open_remote
from engine.errors import EngineError
from engine.events import Done, SamplingParams, TextDelta

PARAMS = SamplingParams(max_tokens=16, temperature=0.0)
MESSAGES = [{"role": "user", "content": "hi"}]


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


GOOD_STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 2, "total_tokens": 1002,
                              "prompt_tokens_details": {"cached_tokens": 768}}},
)


class Script:
    """What the stub answers, one behaviour per request in order (the last one repeats)."""

    def __init__(self, *behaviours: Callable[[BaseHTTPRequestHandler], None]):
        self.behaviours = list(behaviours)
        self.requests: list[dict] = []

    def next(self) -> Callable[[BaseHTTPRequestHandler], None]:
        return self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]


def status(code: int, body: bytes = b'{"error": {"message": "nope", "type": "x", "param": null, "code": null}}'):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def stream(payload: bytes, *, content_type: str = "text/event-stream", cut: bool = False):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Connection", "close")
        if cut:  # promise more than is sent, then hang up
            handler.send_header("Content-Length", str(len(payload) + 1000))
        handler.end_headers()
        handler.wfile.write(payload)
        handler.close_connection = True
    return answer


def silent(seconds: float):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        threading.Event().wait(seconds)
    return answer


@pytest.fixture
def stub():
    script_holder: dict[str, Script] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            script_holder["script"].requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
            script_holder["script"].next()(self)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script_holder["script"].requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            script_holder["script"].next()(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def start(*behaviours) -> tuple[str, Script]:
        script_holder["script"] = Script(*behaviours)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", script_holder["script"]

    yield start
    server.shutdown()
    server.server_close()


def remote(url: str, **kwargs) -> RemoteModel:
    delays: list[float] = []
    model = RemoteModel(url, "m", api_key="k", retry_delays_s=(0.01, 0.01), sleep=delays.append, **kwargs)
    model.slept = delays  # type: ignore[attr-defined]
    return model


def test_a_stream_becomes_engine_events_with_the_servers_usage(stub):
    url, script = stub(stream(GOOD_STREAM))
    events = list(remote(url).chat(MESSAGES, SamplingParams(max_tokens=16, temperature=0.5, top_k=40, seed=3, stop=("END",))))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hel", "lo"]
    done = events[-1]
    assert isinstance(done, Done) and done.text == "Hello" and done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.cached_tokens, done.usage.completion_tokens) == (1000, 768, 2)
    request = script.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    body = request["body"]
    assert body["messages"] == MESSAGES and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["seed"], body["stop"]) == (16, 0.5, 40, 3, ["END"])
    assert "repetition_penalty" not in body  # only sent when it changes anything


def test_deepseek_api_cache_hit_field_is_read(stub):
    payload = sse({"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 1, "prompt_cache_hit_tokens": 32}})
    url, _ = stub(stream(payload))
    done = list(remote(url).chat(MESSAGES, PARAMS))[-1]
    assert done.usage.cached_tokens == 32 and done.finish_reason == "stop"


@pytest.mark.parametrize("code, words", [(401, "DSV4_API_KEY"), (404, "--backend URL"), (500, "server failed"), (429, "rate-limiting")])
def test_error_statuses_are_one_engine_error_without_retry(stub, code, words):
    url, script = stub(status(code))
    model = remote(url)
    with pytest.raises(EngineError) as caught:
        list(model.chat(MESSAGES, PARAMS))
    assert str(code) in str(caught.value) and "nope" in str(caught.value) and words in caught.value.hint
    assert len(script.requests) == 1 and model.slept == []


def test_503_is_retried_then_succeeds(stub):
    url, script = stub(status(503), stream(GOOD_STREAM))
    model = remote(url)
    assert list(model.chat(MESSAGES, PARAMS))[-1].text == "Hello"
    assert len(script.requests) == 2 and model.slept == [0.01]


def test_503_every_time_gives_up_after_the_bounded_retries(stub):
    url, script = stub(status(503))
    model = remote(url)
    with pytest.raises(EngineError) as caught:
        list(model.chat(MESSAGES, PARAMS))
    assert "503" in str(caught.value) and len(script.requests) == 3 and model.slept == [0.01, 0.01]


def test_connection_refused_is_retried_then_one_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = remote(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(EngineError) as caught:
        list(model.chat(MESSAGES, PARAMS))
    assert "cannot reach" in str(caught.value) and "server running" in caught.value.hint
    assert model.slept == [0.01, 0.01]


@pytest.mark.parametrize("behaviour, words", [
    (stream(b"<html>hello</html>", content_type="text/html"), "did not stream"),
    (stream(b"data: {not json\n\n"), "not JSON"),
    (stream(b'data: {"error": {"message": "out of memory"}}\n\n'), "out of memory"),
    (stream(b'data: {"choices": [{"index": 0, "delta": {"content": "par"}}]}\n\n', cut=True), "broke the answer off"),
])
def test_garbage_and_broken_streams_are_errors_not_retried(stub, behaviour, words):
    url, script = stub(behaviour)
    model = remote(url)
    with pytest.raises(EngineError) as caught:
        list(model.chat(MESSAGES, PARAMS))
    assert words in str(caught.value)
    assert len(script.requests) == 1 and model.slept == []


def test_a_silent_server_times_out(stub):
    url, script = stub(silent(3))
    model = remote(url, timeout_s=0.3)
    with pytest.raises(EngineError) as caught:
        list(model.chat(MESSAGES, PARAMS))
    assert "did not answer within 0.3 s" in str(caught.value) and len(script.requests) == 1


def test_open_remote_picks_the_served_model_and_its_context(stub, monkeypatch):
    monkeypatch.setenv("DSV4_API_KEY", "env-key")
    models = json.dumps({"object": "list", "data": [{"id": "deepseek-ai/DeepSeek-V4-Flash", "max_model_len": 65536}]}).encode()
    url, script = stub(status(200, models))
    notes: list[str] = []
    model = open_remote(url, "flash", note=notes.append)
    assert model.name == "deepseek-ai/DeepSeek-V4-Flash" and model.context_length == 65536
    assert script.requests[0] == {"path": "/v1/models", "auth": "Bearer env-key"}
    assert len(notes) == 1 and "'flash'" in notes[0]
    open_remote(url, "mini", note=notes.append)  # the unconfigured default: the one served model, silently
    assert len(notes) == 1
    assert isinstance(model.tokenizer, EstimatingTokenizer)


@pytest.mark.model
def test_estimating_tokenizer_counts_no_fewer_tokens_than_a_real_bpe():
    from engine.tokenizer import Tokenizer
    from tests.tinymodels import real_model_gguf_or_skip

    path = real_model_gguf_or_skip()
    real = Tokenizer.from_gguf(path)
    for text in (
        Path(remote_module.__file__).read_text(),
        "The quick brown fox jumps over the lazy dog; Paris is the capital of France.\n" * 5,
    ):
        assert EstimatingTokenizer().count(text) >= real.count(text)
