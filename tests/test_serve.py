"""`dsv4 serve` on loopback: the official `openai` client against a tiny real GGUF model
(streaming and not, chat and completions, concurrent requests), cancellation when a client
goes away mid-stream, the 4xx error bodies, and `dsv4 ask --backend` against it."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dsv4cli.app import main
from dsv4cli.commands.serve import EngineServedModel, build_server
from dsv4cli.server import ApiServer, start_in_thread
from engine.events import Done, Event, PrefillProgress, SamplingParams, TextDelta, Timings, Usage
from tests.stdins import TerminalStdin
from tests.tinymodels import write_tiny_llama_gguf

openai = pytest.importorskip("openai")

MODEL_ID = "tiny"
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import engine

    return engine.load(str(write_tiny_llama_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf")))


@pytest.fixture
def server(tiny_model):
    served = EngineServedModel(tiny_model, MODEL_ID)
    srv = build_server(served, "127.0.0.1", 0, API_KEY, max_body_bytes=64 << 10)
    start_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def client_for(srv: ApiServer, key: str = API_KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=key, max_retries=0, timeout=30)


def raw_request(srv: ApiServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    all_headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=body, headers=all_headers)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(server):
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == [MODEL_ID]


def test_chat_completion_non_streaming_reports_usage(server, tiny_model):
    answer = client_for(server).chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=6, temperature=0)
    prompt_tokens = len(tiny_model.tokenizer.render_chat(HELLO))
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == server.stats.last_done.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    assert answer.choices[0].message.content == server.stats.last_done.text
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming_under_greedy_decoding(server):
    client = client_for(server)
    whole = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_a_prompt_string(server, tiny_model):
    answer = client_for(server).completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens == len(tiny_model.tokenizer.encode("The quick brown fox"))
    assert answer.choices[0].text == server.stats.last_done.text
    streamed = client_for(server).completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def _greedy_answer_and_a_cut(client, start: int) -> tuple[str, str]:
    """The greedy answer to HELLO and the two characters of it from `start` on, to stop at;
    the test is skipped when the answer is too short to cut there."""
    free = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=12, temperature=0)
    text = free.choices[0].message.content
    if len(text) < start + 2:
        pytest.skip("the tiny model's answer is too short to cut")
    return text, text[start : start + 2]


def test_stop_string_and_seed_are_passed_to_the_engine(server):
    client = client_for(server)
    _, stop = _greedy_answer_and_a_cut(client, start=1)
    cut = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_all_answered(server):
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(index: int) -> None:
        try:
            answer = client_for(server).chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=6, temperature=0)
            results[index] = answer.choices[0].message.content
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(results) == 3 and len(set(results.values())) == 1  # greedy: the same answer each time


class SlowModel:
    """A scripted ServedModel that produces a token every few milliseconds until cancelled."""

    model_id = "slow"
    context_length = 4096

    def __init__(self, limit: int = 400, delay_s: float = 0.01, prefill_steps: int = 0):
        self.limit, self.delay_s, self.prefill_steps = limit, delay_s, prefill_steps
        self.produced = 0
        self.saw_cancel = threading.Event()
        self.started = threading.Event()

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return [1] * sum(len(m["content"]) for m in messages)

    def text_prompt(self, text: str) -> list[int]:
        return [1] * len(text)

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], bool]) -> Iterator[Event]:
        self.started.set()
        reason = "length"
        count = 0
        for step in range(1, self.prefill_steps + 1):  # a long prompt's prefill, in chunks
            if cancel():
                self.saw_cancel.set()
                yield Done("cancelled", Usage(len(prompt_ids), 0, 0), Timings(0, 0, 0, 0, 0))
                return
            time.sleep(self.delay_s)
            yield PrefillProgress(step, self.prefill_steps)
        for count in range(1, min(self.limit, params.max_tokens) + 1):
            if cancel():
                self.saw_cancel.set()
                reason, count = "cancelled", count - 1
                break
            time.sleep(self.delay_s)
            self.produced = count
            yield TextDelta("x", count)
        yield Done(reason, Usage(len(prompt_ids), 0, count), Timings(0, 0, 0, 0, 0), text="x" * count)


def slow_server(model: SlowModel, **kwargs) -> ApiServer:
    srv = ApiServer(("127.0.0.1", 0), model, **kwargs)
    start_in_thread(srv)
    return srv


@pytest.mark.parametrize("prefill_steps", [0, 400], ids=["while-decoding", "while-prefilling"])
def test_a_client_leaving_mid_stream_cancels_the_generation(prefill_steps):
    model = SlowModel(limit=400, delay_s=0.01, prefill_steps=prefill_steps)
    srv = slow_server(model)
    try:
        body = json.dumps({"model": "slow", "messages": HELLO, "max_tokens": 400, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            while b"data: " not in received:  # the first event arrived: generation is under way
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200")
        assert model.saw_cancel.wait(5), "the server kept generating for a client that had gone"
        deadline = time.monotonic() + 5
        while srv.stats.last_done is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.stats.cancelled == 1
        assert srv.stats.last_done.finish_reason == "cancelled"
        assert model.produced < 200  # 400 tokens would take 4 s; the disconnect is seen in a few
        if prefill_steps:
            assert model.produced == 0  # seen during the prefill, not at the first token
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_full_queue_answers_503_at_once():
    model = SlowModel(limit=100, delay_s=0.01)
    srv = slow_server(model, queue_limit=0)
    try:
        first = threading.Thread(target=lambda: raw_request(srv, "POST", "/v1/chat/completions", json.dumps({"messages": HELLO, "max_tokens": 100}).encode()))
        first.start()
        assert model.started.wait(5)
        status, body = raw_request(srv, "POST", "/v1/chat/completions", json.dumps({"messages": HELLO, "max_tokens": 5}).encode())
        assert status == 503 and body["error"]["code"] == "server_busy"
        first.join(10)
        status, _ = raw_request(srv, "POST", "/v1/chat/completions", json.dumps({"messages": HELLO, "max_tokens": 5}).encode())
        assert status == 200  # the slot came back
    finally:
        srv.shutdown()
        srv.server_close()


def assert_error(status: int, body: dict, expected_status: int, code: str | None = None) -> None:
    assert status == expected_status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (json.dumps({"model": "gpt-4", "messages": HELLO}).encode(), 404, "model_not_found"),
    (json.dumps({"messages": []}).encode(), 400, None),
    (json.dumps({"messages": HELLO, "temperature": "hot"}).encode(), 400, None),
    (json.dumps({"messages": HELLO, "max_tokens": 10_000}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "fox " * 400}]}).encode(), 400, "context_length_exceeded"),
])
def test_malformed_requests_get_openai_error_bodies(server, body, status, code):
    assert_error(*raw_request(server, "POST", "/v1/chat/completions", body), status, code)


def test_oversized_body_is_refused_unread(server):
    status, body = raw_request(server, "POST", "/v1/chat/completions", b"x" * (65 << 10))
    assert_error(status, body, 413, "request_too_large")


def test_missing_or_wrong_api_key_is_401(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}):
        status, body = raw_request(server, "GET", "/v1/models", headers=headers)
        assert_error(status, body, 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        client_for(server, key="wrong").models.list()


def test_answers_on_a_kept_alive_connection_are_not_held_back(server):
    """Headers and body go out as two writes: with Nagle's algorithm on, the body waited for
    the client's delayed ACK, 40 ms per answer once a connection is reused."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connection.request("GET", "/v1/models", headers=headers)
    connection.getresponse().read()
    started = time.perf_counter()
    for _ in range(5):
        connection.request("GET", "/v1/models", headers=headers)
        assert connection.getresponse().read()
        connection.request("POST", "/v1/chat/completions", body=b"{", headers=headers)  # a 400 answer, same path
        refused = connection.getresponse()
        assert refused.status == 400 and json.loads(refused.read())["error"]["code"] == "invalid_json"
    elapsed = time.perf_counter() - started
    connection.close()
    assert elapsed < 0.2, f"10 answers on one connection took {elapsed:.3f} s"


def test_a_stream_leaves_the_connection_open_for_the_next_request(server):
    """Streams are chunked (HTTP/1.1), so a client reuses its connection; an HTTP/1.0 client
    gets the stream up to the connection's end instead."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    body = json.dumps({"messages": HELLO, "max_tokens": 3, "temperature": 0, "stream": True})
    streams = []
    for _ in range(2):
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = connection.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked" and not response.will_close
        streams.append(response.read())
    sock = connection.sock
    connection.request("GET", "/v1/models", headers=headers)
    assert connection.getresponse().read() and connection.sock is sock  # still the first connection
    connection.close()
    assert all(stream.startswith(b"data: ") and stream.endswith(b"data: [DONE]\n\n") for stream in streams)

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(f"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer {API_KEY}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while chunk := raw.recv(65536):  # the server closes the connection after the stream
            received += chunk
    head, _, stream = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert stream.startswith(b"data: ") and stream.endswith(b"data: [DONE]\n\n")


def test_unknown_route_is_404(server):
    assert_error(*raw_request(server, "GET", "/v2/nothing"), 404, "not_found")


def test_ask_with_backend_against_serve(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    monkeypatch.setenv("DSV4_API_KEY", API_KEY)
    url = f"http://127.0.0.1:{server.port}/v1"
    assert main(["ask", "--backend", url, "--max-tokens", "6", "--no-log", "What is the capital of France?"]) == 0
    plain = capsys.readouterr().out
    assert plain.strip() == server.stats.last_done.text.strip()

    assert main(["ask", "--backend", url, "--max-tokens", "6", "--no-log", "--json", "What is the capital of France?"]) == 0
    payload = json.loads(capsys.readouterr().out)
    done = server.stats.last_done
    assert payload["model"] == MODEL_ID  # the default `mini` is not served: the server's model is used
    assert payload["answer"] == done.text
    assert payload["usage"] == {"prompt_tokens": done.usage.prompt_tokens, "cached_tokens": done.usage.cached_tokens,
                                "completion_tokens": done.usage.completion_tokens}


def test_ask_with_backend_reads_dsv4_backend(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    monkeypatch.setenv("DSV4_API_KEY", API_KEY)
    monkeypatch.setenv("DSV4_BACKEND", f"http://127.0.0.1:{server.port}/v1")
    assert main(["ask", "--max-tokens", "4", "--no-log", "--json", "Hi"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == MODEL_ID


def test_ask_with_backend_without_key_is_one_line_error(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    monkeypatch.delenv("DSV4_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["ask", "--backend", f"http://127.0.0.1:{server.port}/v1", "--no-log", "Hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error:") and "401" in err[-1] and "DSV4_API_KEY" in err[-1]


def test_dsv4_serve_command_listens_and_warns_off_loopback(tmp_path):
    """The command itself, in its own process: it loads the model, says where it listens,
    answers, and warns when bound beyond loopback."""
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    process = subprocess.Popen(
        [sys.executable, "-m", "dsv4cli.app", "serve", "--model", str(gguf), "--host", "0.0.0.0", "--port", "0", "--api-key", API_KEY],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        while not any(line.startswith("dsv4: serving") for line in lines):
            line = process.stderr.readline()
            assert line, f"dsv4 serve ended: {lines}"
            lines.append(line)
        assert any(line.startswith("Warning: serving on 0.0.0.0") for line in lines)
        port = int(lines[-1].rsplit(":", 1)[1].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
    finally:
        process.terminate()
        process.wait(10)
        process.stderr.close()
        process.stdout.close()
    assert process.returncode is not None


# ---------------------------------------------------------------- request fields (issue #7)


def _bad_request(call: Callable[[], object]) -> dict:
    with pytest.raises(openai.BadRequestError) as failure:
        call()
    assert failure.value.status_code == 400
    body = failure.value.body
    return body.get("error", body) if isinstance(body, dict) else {}


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"n": 0}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),  # mini has no tool format
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_unsupported_or_invalid_chat_fields_are_a_400_naming_the_field(server, extra, param):
    error = _bad_request(lambda: client_for(server).chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2, **extra))
    assert error["param"] == param and param.split("_")[0] in error["message"]
    assert server.stats.requests == 0  # refused before the engine was asked


def test_unsupported_completion_fields_are_a_400(server):
    client = client_for(server)
    for extra, param in (({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
                         ({"n": 3}, "n"), ({"suffix": "end"}, "suffix")):
        error = _bad_request(lambda extra=extra: client.completions.create(model=MODEL_ID, prompt="The fox", max_tokens=2, **extra))
        assert error["param"] == param


def test_the_defaults_of_those_fields_are_accepted(server):
    answer = client_for(server).chat.completions.create(
        model=MODEL_ID, messages=HELLO, max_tokens=2, n=1, logprobs=False, top_logprobs=0,
        response_format={"type": "text"}, temperature=0,
    )
    assert len(answer.choices) == 1 and answer.choices[0].logprobs is None


def test_max_completion_tokens_limits_the_answer_and_wins_over_max_tokens(server):
    client = client_for(server)
    short = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_completion_tokens=2, temperature=0)
    assert short.usage.completion_tokens <= 2
    both = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=9, max_completion_tokens=1, temperature=0)
    assert both.usage.completion_tokens == 1 and both.choices[0].finish_reason == "length"


def test_stop_strings_cut_a_streamed_answer_too(server):
    client = client_for(server)
    text, stop = _greedy_answer_and_a_cut(client, start=2)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[: text.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_usage_chunk_only_when_asked_for(server):
    client = client_for(server)
    plain = list(client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in plain)
    off = list(client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0, stream=True,
                                              stream_options={"include_usage": False}))
    assert all(c.choices and c.usage is None for c in off)
    on = list(client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert on[-1].choices == [] and on[-1].usage.completion_tokens == server.stats.last_done.usage.completion_tokens


class DeepSeekV4PromptModel(SlowModel):
    """Prompts rendered in DeepSeek-V4's format by the tiny checkpoint's real tokenizer."""

    model_id = "v4"
    supports_tools = True

    def __init__(self, tokenizer):
        super().__init__(limit=2, delay_s=0.0)
        self.tokenizer = tokenizer

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.render_chat(messages)


def test_a_conversation_the_prompt_format_refuses_is_a_400(tmp_path):
    from dsv4_tiny import write_tokenizer
    from engine.deepseek_v4.chat import tokenizer_for

    srv = slow_server(DeepSeekV4PromptModel(tokenizer_for(write_tokenizer(tmp_path))))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="x", max_retries=0, timeout=30)
        tool_turn = [*HELLO, {"role": "assistant", "content": "checking"}, {"role": "tool", "content": "Paris"}]
        answer = client.chat.completions.create(model="v4", messages=tool_turn, max_tokens=2)
        assert answer.choices[0].message.content == "xx"  # tool results are part of the format
        error = _bad_request(lambda: client.chat.completions.create(
            model="v4", messages=[{"role": "narrator", "content": "hi"}], max_tokens=2))
        assert error["param"] == "messages" and "unknown role narrator" in error["message"]
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- tools (DeepSeek-V4)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
D = "｜DSML｜"
CALL_REPLY = (
    "Checking.\n\n"
    f"<{D}tool_calls>\n"
    f'<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
    f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
    f"</{D}invoke>\n"
    f'<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="city" string="true">Lyon</{D}parameter>\n'
    f"</{D}invoke>\n"
    f"</{D}tool_calls>"
)


@pytest.fixture(scope="module")
def dsv4_loaded(tmp_path_factory):
    from tests.dsv4_tiny import load_tiny_model

    return load_tiny_model(tmp_path_factory.mktemp("dsv4-serve") / "tiny-v4")


def as_generated(tokenizer, text: str) -> list[int]:
    """The ids a model generates for `text`: each special token's text as its one id (the
    DSML marker is an added token of its own, as in the official tokenizer), the rest BPE."""
    import re

    specials = tokenizer.special_tokens
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
        ids += [specials[part]] if part in specials else tokenizer.encode(part)
    return ids


def dsv4_server(loaded, reply_text: str) -> ApiServer:
    import copy

    from tests.dsv4_tiny import ForcedReply

    scripted = copy.copy(loaded)
    tokenizer = loaded.tokenizer
    scripted.model = ForcedReply(loaded.model, [*as_generated(tokenizer, reply_text), tokenizer.special_tokens["<｜end▁of▁sentence｜>"]])
    srv = build_server(EngineServedModel(scripted, "v4", cache=False), "127.0.0.1", 0, None)
    start_in_thread(srv)
    return srv


def v4_client(srv: ApiServer):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="x", max_retries=0, timeout=60)


ASK_WEATHER = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
EXPECTED_CALLS = [("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Lyon"})]


def test_a_deepseek_v4_call_comes_back_as_openai_tool_calls(dsv4_loaded):
    srv = dsv4_server(dsv4_loaded, CALL_REPLY)
    dsml = dsv4_loaded.tokenizer.special_tokens[D]
    assert dsv4_loaded.tokenizer.is_special(dsml) and dsml in srv.model.loaded.model._reply  # generated as the control token
    try:
        answer = v4_client(srv).chat.completions.create(model="v4", messages=ASK_WEATHER, tools=[WEATHER_TOOL], max_tokens=400, temperature=0)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking."
        calls = choice.message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED_CALLS
        assert calls[0].function.arguments == '{"city": "Paris", "days": 2}'  # as DeepSeek's parser writes it
        assert all(c.type == "function" and c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
        # the model was prompted with the tools, after an empty system prompt
        prompt = dsv4_loaded.tokenizer.decode(srv.model.loaded.model.prompt)
        assert prompt.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n") and '{"name": "get_weather", ' in prompt
        assert prompt.endswith("<｜User｜>Weather in Paris and Lyon?<｜Assistant｜></think>")
        assert answer.usage.prompt_tokens == len(srv.model.loaded.model.prompt)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_streamed_deepseek_v4_call_arrives_as_tool_call_deltas(dsv4_loaded):
    srv = dsv4_server(dsv4_loaded, CALL_REPLY)
    try:
        chunks = list(v4_client(srv).chat.completions.create(model="v4", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                             tool_choice="auto", max_tokens=400, temperature=0, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert content == "Checking." and D not in content
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
            (i, name, args) for i, (name, args) in enumerate(EXPECTED_CALLS)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_conversation_goes_on_with_the_calls_and_their_results(dsv4_loaded):
    srv = dsv4_server(dsv4_loaded, "Paris 21, Lyon 19.")
    try:
        first = v4_client(srv).chat.completions.create(model="v4", messages=ASK_WEATHER, tools=[WEATHER_TOOL], max_tokens=40)
        assert first.choices[0].message.tool_calls is None and first.choices[0].finish_reason == "stop"
        calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
                 {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]
        history = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": calls},
                   {"role": "tool", "tool_call_id": "c2", "content": "19"}, {"role": "tool", "tool_call_id": "c1", "content": "21"}]
        answer = v4_client(srv).chat.completions.create(model="v4", messages=history, tools=[WEATHER_TOOL], max_tokens=40)
        assert answer.choices[0].message.content == "Paris 21, Lyon 19."
        prompt = dsv4_loaded.tokenizer.decode(srv.model.loaded.model.prompt)
        assert prompt.endswith(  # the calls as a DSML block; the results in call order (by tool_call_id)
            f'<｜Assistant｜></think>\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
            f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n<{D}parameter name="days" string="false">2</{D}parameter>\n'
            f'</{D}invoke>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Lyon</{D}parameter>\n'
            f"</{D}invoke>\n</{D}tool_calls><｜end▁of▁sentence｜>"
            "<｜User｜><tool_result>21</tool_result>\n\n<tool_result>19</tool_result><｜Assistant｜></think>"
        )
        # tool_choice "none": the tools stay out of the prompt, the answer is text
        plain = v4_client(srv).chat.completions.create(model="v4", messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=40)
        assert "## Tools" not in dsv4_loaded.tokenizer.decode(srv.model.loaded.model.prompt)
        assert plain.usage.prompt_tokens == len(dsv4_loaded.tokenizer.render_chat(ASK_WEATHER))
        error = _bad_request(lambda: v4_client(srv).chat.completions.create(
            model="v4", messages=ASK_WEATHER, tools=[WEATHER_TOOL], max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        assert error["param"] == "tool_choice" and "get_weather" in error["message"]
        error = _bad_request(lambda: v4_client(srv).chat.completions.create(
            model="v4", messages=ASK_WEATHER, tools=[{"type": "function", "function": {"description": "no name"}}], max_tokens=4))
        assert error["param"] == "tools"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_malformed_call_block_reaches_the_client_as_text(dsv4_loaded):
    broken = f'Checking.\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="days" string="false">two</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
    srv = dsv4_server(dsv4_loaded, broken)
    try:
        answer = v4_client(srv).chat.completions.create(model="v4", messages=ASK_WEATHER, tools=[WEATHER_TOOL], max_tokens=400)
        assert answer.choices[0].message.content == broken and answer.choices[0].message.tool_calls is None
        assert answer.choices[0].finish_reason == "stop"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_client_resetting_a_kept_alive_connection_leaves_no_traceback(server, capfd):
    import socket
    import struct

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # Close with RST: the server's thread is waiting for the next request on this connection.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(0.3)
    assert raw_request(server, "GET", "/v1/models")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
