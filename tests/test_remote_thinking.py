"""`--think` against an OpenAI-compatible server, over real HTTP on loopback: a small fake
server streams the reasoning in `delta.reasoning_content` (or vLLM's newer `delta.reasoning`)
and the answer in `delta.content`, as vLLM, SGLang and the DeepSeek API do with a reasoning
parser. The CLI shows the reasoning dimmed on stderr, the answer alone on stdout, `--json`
gives it its own field, and the request carries the thinking switch the server understands."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsv4cli.app import main
from dsv4cli.remote import RemoteModel
from engine.events import Done, SamplingParams, TextDelta
from tests.stdins import PipedStdin

REASONING = ["The user", " wants a sum.", " 2+2 is 4."]
ANSWER = ["It is", " 4."]


class FakeReasoningServer:
    """GET /v1/models and a streaming POST /v1/chat/completions: reasoning deltas under
    `field`, then content deltas, then usage. Each request body is kept."""

    def __init__(self, field: str = "reasoning_content", model_id: str = "deepseek-ai/DeepSeek-V4-Flash"):
        self.field = field
        self.model_id = model_id
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, "application/json", json.dumps(
                    {"object": "list", "data": [{"id": server.model_id, "object": "model", "max_model_len": 32768}]}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                self._send(200, "text/event-stream", b"".join(server.events(body)))

            def _send(self, status: int, content_type: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def events(self, body: dict) -> Iterator[bytes]:
        def chunk(delta: dict, finish: str | None = None) -> bytes:
            data = {"id": "c1", "object": "chat.completion.chunk", "model": self.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for piece in REASONING:  # a server with a reasoning parser always separates it
            yield chunk({self.field: piece, "content": None})
        for piece in ANSWER:
            yield chunk({"content": piece})
        yield chunk({}, "stop")
        usage = {"prompt_tokens": 40, "completion_tokens": len(REASONING) + len(ANSWER), "total_tokens": 45,
                 "prompt_tokens_details": {"cached_tokens": 32}}
        yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def __enter__(self) -> FakeReasoningServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(params=["reasoning_content", "reasoning"])
def server(request) -> Iterator[FakeReasoningServer]:
    with FakeReasoningServer(request.param) as fake:
        yield fake


@pytest.fixture(autouse=True)
def no_backend_from_the_environment(monkeypatch):
    for name in ("DSV4_BACKEND", "DSV4_MODEL", "DSV4_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _ask(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    return main(["ask", "--no-log", *args, "What is 2+2?"])


def test_ask_think_shows_the_servers_reasoning_dimmed_and_the_answer_alone(server, monkeypatch, capsys):
    assert _ask(monkeypatch, "--backend", server.url, "--think") == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(ANSWER) + "\n"
    assert "".join(REASONING) + "\n\n" in captured.err
    assert "has no thinking mode" not in captured.err  # the server decides
    assert server.requests[0]["chat_template_kwargs"] == {"thinking": True}  # vLLM / SGLang's switch


def test_ask_think_json_has_the_servers_reasoning_in_its_own_field(server, monkeypatch, capsys):
    assert _ask(monkeypatch, "--backend", server.url, "--think", "--json") == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert (payload["answer"], payload["reasoning"]) == ("".join(ANSWER), "".join(REASONING))
    assert (payload["usage"]["prompt_tokens"], payload["usage"]["cached_tokens"]) == (40, 32)
    assert "".join(REASONING) not in captured.err  # --json streams none of it


def test_without_think_the_request_has_no_switch_and_unasked_reasoning_is_not_the_answer(server, monkeypatch, capsys):
    assert _ask(monkeypatch, "--backend", server.url, "--json") == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["answer"] == "".join(ANSWER) and "reasoning" not in payload
    assert "chat_template_kwargs" not in server.requests[0] and "thinking" not in server.requests[0]
    assert "reasoning too; --think shows it" in captured.err


def test_chat_think_over_http_keeps_only_answers_in_the_conversation(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", PipedStdin("What is 2+2?\nAnd again?\n"))
    assert main(["chat", "--no-log", "--system", "", "--backend", server.url, "--think"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ("".join(ANSWER) + "\n") * 2
    assert captured.err.count("".join(REASONING)) == 2
    second = server.requests[1]
    assert second["chat_template_kwargs"] == {"thinking": True}
    assert second["messages"] == [{"role": "user", "content": "What is 2+2?"},
                                  {"role": "assistant", "content": "".join(ANSWER)},
                                  {"role": "user", "content": "And again?"}]


def test_the_events_end_the_reasoning_with_the_engines_own_tag(server):
    model = RemoteModel(server.url, server.model_id)
    events = list(model.chat([{"role": "user", "content": "q"}], SamplingParams(max_tokens=8), thinking=True))
    texts = [event.text for event in events if isinstance(event, TextDelta)]
    assert texts == [*REASONING, "</think>" + ANSWER[0], *ANSWER[1:]]
    done = events[-1]
    assert isinstance(done, Done) and done.usage.completion_tokens == len(REASONING) + len(ANSWER)


def test_the_deepseek_api_is_told_its_thinking_switch_either_way():
    # The DeepSeek API thinks unless told otherwise; vLLM and SGLang only when asked.
    deepseek = RemoteModel("https://api.deepseek.com/v1", "deepseek-v4-flash")
    assert deepseek.thinking_switch(True) == {"thinking": {"type": "enabled"}}
    assert deepseek.thinking_switch(False) == {"thinking": {"type": "disabled"}}
    vllm = RemoteModel("http://10.0.0.5:8000/v1", "deepseek-ai/DeepSeek-V4-Pro")
    assert vllm.thinking_switch(True) == {"chat_template_kwargs": {"thinking": True}}
    assert vllm.thinking_switch(False) == {}
