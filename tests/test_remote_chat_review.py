"""`dsv4 chat --backend` and `dsv4 review --backend` against `dsv4 serve` on loopback: a tiny
real GGUF behind the real server (and, where the answer must be a finding, a scripted model
behind the same server), a stub server that never answers for --timeout, and a closed port."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dsv4cli.app import main
from dsv4cli.commands import review as review_command
from dsv4cli.commands.serve import EngineServedModel, build_server
from dsv4cli.server import ServedModel, start_in_thread
from engine.events import Done, Event, SamplingParams, TextDelta, Timings, Usage
from tests.gitrepos import calc_repo_with_change
from tests.stdins import PipedStdin
from tests.tinymodels import write_tiny_llama_gguf

API_KEY = "remote-test-key"


class RecordingModel(EngineServedModel):
    """The engine behind `dsv4 serve`, remembering each request's messages and answer."""

    def __init__(self, loaded, model_id: str):
        super().__init__(loaded, model_id)
        self.requests: list[list[dict[str, str]]] = []
        self.dones: list[Done] = []

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        self.requests.append([dict(m) for m in messages])
        return super().chat_prompt(messages)

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], bool]) -> Iterator[Event]:
        for event in super().generate(prompt_ids, params, cancel):
            if isinstance(event, Done):
                self.dones.append(event)
            yield event


class ScriptedReviewer:
    """A ServedModel whose answer is given (a small random model writes no findings)."""

    model_id = "reviewer"
    context_length = 8192

    def __init__(self, answer: str):
        self.answer = answer
        self.requests: list[list[dict[str, str]]] = []

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        self.requests.append([dict(m) for m in messages])
        return [1] * sum(len(m["content"]) // 4 + 4 for m in messages)

    def text_prompt(self, text: str) -> list[int]:
        return [1] * len(text)

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], bool]) -> Iterator[Event]:
        lines = self.answer.splitlines(keepends=True)
        for count, line in enumerate(lines, start=1):
            yield TextDelta(line, count)
        yield Done("stop", Usage(len(prompt_ids), 512, len(lines)), Timings(0.1, 0.1, 1.0, 0.1, 1.0), text=self.answer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import engine

    return engine.load(str(write_tiny_llama_gguf(tmp_path_factory.mktemp("remote") / "tiny.gguf", ctx=2048)))


@contextmanager
def serving(model: ServedModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`dsv4 serve` for model, the CLI given its API key; yields the base URL."""
    srv = build_server(model, "127.0.0.1", 0, API_KEY, max_body_bytes=1 << 20)
    start_in_thread(srv)
    monkeypatch.setenv("DSV4_API_KEY", API_KEY)
    try:
        yield f"http://127.0.0.1:{srv.port}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def engine_server(tiny, monkeypatch):
    model = RecordingModel(tiny, "tiny")
    with serving(model, monkeypatch) as url:
        yield url, model


@pytest.fixture
def reviewer_server(monkeypatch):
    model = ScriptedReviewer("src/calc.py:2: error: add subtracts instead of adding\nsrc/calc.py:6: warning: b may be 0\n")
    with serving(model, monkeypatch) as url:
        yield url, model


@pytest.fixture
def stalling_server():
    """Lists a model, then answers a chat request with nothing (or with a first line, then
    nothing) until the test ends: a server that stalls."""
    release = threading.Event()
    behaviour = {"first_line": b"", "stall_models": False}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if behaviour["stall_models"]:
                release.wait(30)
                return
            body = json.dumps({"object": "list", "data": [{"id": "stuck", "object": "model", "max_model_len": 8192}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if behaviour["first_line"]:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = {"choices": [{"index": 0, "delta": {"content": behaviour["first_line"].decode()}}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            release.wait(30)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", behaviour
    release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    root = calc_repo_with_change(tmp_path / "repo", staged=True)
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    for name in ("DSV4_REVIEW_FAIL_ON", "DSV4_REVIEW_TIMEOUT", "DSV4_NO_LOG", "DSV4_BACKEND", "DSV4_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return root


def last_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


# ---------------------------------------------------------------- chat


def test_chat_sends_the_conversation_each_turn_and_reports_the_servers_usage(engine_server, tmp_path, monkeypatch, capsys):
    url, model = engine_server
    notes = tmp_path / "notes.md"
    notes.write_text("".join(f"Note {i}: the greeting is friendly and short.\n" for i in range(20)))
    script = "What is the greeting like?\n/stats\nAnd the notes?\n/stats\n/model tiny\n"
    monkeypatch.setattr(sys, "stdin", PipedStdin(script))
    assert main(["chat", "--backend", url, "--max-tokens", "6", "--no-log", str(notes)]) == 0
    captured = capsys.readouterr()

    first, second = model.requests
    # Byte-stable: the second request starts with the first, then its answer and the new question.
    assert second[: len(first)] == first
    assert first[0]["role"] == "system" and first[-1]["content"].startswith("=== notes.md ===") and first[-1]["content"].endswith("What is the greeting like?")
    assert second[len(first):] == [{"role": "assistant", "content": model.dones[0].text},
                                   {"role": "user", "content": "And the notes?"}]
    # stdout holds the two answers and nothing else (the tiny model writes mostly whitespace)
    assert captured.out.split() == "\n".join(done.text for done in model.dones).split()
    assert captured.out.count("\n") >= 2

    stats = re.findall(r"last turn: prompt ([\d,]+) tokens \(([\d,]+) cached\)", captured.err)
    served = [(d.usage.prompt_tokens, d.usage.cached_tokens) for d in model.dones]
    assert [(int(p.replace(",", "")), int(c.replace(",", ""))) for p, c in stats] == served
    assert served[1][1] > 0  # the server's prefix cache served the first turn's prompt
    assert "token counts are the server's" in captured.err
    assert "now chatting with tiny" in captured.err


def test_chat_model_switch_to_a_model_the_server_lacks_is_one_line_error(engine_server, monkeypatch, capsys):
    url, model = engine_server
    monkeypatch.setattr(sys, "stdin", PipedStdin("/model nope\nHi\n"))
    assert main(["chat", "--backend", url, "--max-tokens", "3", "--no-log"]) == 1  # piped: a failed command is exit 1
    captured = capsys.readouterr()
    error = next(line for line in captured.err.splitlines() if line.startswith("Error:"))
    assert "has no model 'nope'" in error and "it serves: tiny" in error
    assert len(model.requests) == 1  # the chat went on with the model it had
    assert captured.out.strip() == model.dones[0].text.strip()


def test_chat_backend_from_the_config_file(engine_server, monkeypatch, capsys):
    from dsv4cli.config import set_user_value

    url, model = engine_server
    set_user_value("backend", url)
    monkeypatch.setattr(sys, "stdin", PipedStdin("Hi\n"))
    assert main(["chat", "--max-tokens", "3", "--no-log"]) == 0
    assert len(model.requests) == 1


def test_ask_think_against_a_server_without_a_thinking_mode_prints_its_plain_answer(engine_server, monkeypatch, capsys):
    # `dsv4 serve` with a llama-family model ignores the thinking switch: its content is all answer.
    url, model = engine_server
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    assert main(["ask", "--backend", url, "--think", "--max-tokens", "4", "--no-log", "--json", "Hi"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["answer"] == model.dones[0].text
    assert payload["reasoning"] == "" and "no end of the reasoning" not in captured.err


def test_chat_connection_refused_is_one_line_error(closed_port_url, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", PipedStdin("Hi\n"))
    assert main(["chat", "--backend", closed_port_url, "--no-log"]) == 1
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("Error: cannot reach") and "is the server running?" in line


# ---------------------------------------------------------------- review


def test_review_findings_and_fail_on_from_a_server(repo, reviewer_server, capsys):
    url, model = reviewer_server
    assert main(["review", "--staged", "--backend", url, "--no-log"]) == 0  # advisory
    out = capsys.readouterr().out
    assert "src/calc.py" in out and "add subtracts instead of adding" in out and "b may be 0" in out

    assert main(["review", "--staged", "--backend", url, "--no-log", "--fail-on", "error"]) == 1
    assert "1 finding(s) at or above error" in capsys.readouterr().err

    system, user = model.requests[-1]
    assert system == {"role": "system", "content": review_command.REVIEW_SYSTEM}
    # The repository's pack first, the diff and the instructions last: the pack stays a cached prefix.
    assert user["content"].index("def add(a, b)") < user["content"].index("```diff")
    assert user["content"].endswith(review_command.REVIEW_INSTRUCTIONS)
    assert model.requests[0] == model.requests[1]  # the same review is the same bytes


def test_review_json_reports_the_servers_usage(repo, engine_server, capsys):
    url, model = engine_server
    assert main(["review", "--staged", "--backend", url, "--no-log", "--json", "--max-tokens", "8"]) == 0
    payload = json.loads(capsys.readouterr().out)
    done = model.dones[-1]
    assert payload["model"] == "tiny" and payload["timed_out"] is False
    assert payload["usage"] == {"prompt_tokens": done.usage.prompt_tokens, "cached_tokens": done.usage.cached_tokens,
                                "completion_tokens": done.usage.completion_tokens}
    assert payload["files"] == ["src/calc.py"]


def test_review_timeout_bounds_a_server_that_never_answers(repo, stalling_server, capsys):
    url, _ = stalling_server
    started = time.monotonic()
    assert main(["review", "--staged", "--backend", url, "--no-log", "--json", "--timeout", "1", "--fail-on", "info"]) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["timed_out"] is True and payload["findings"] == [] and payload["failed"] is False
    assert "stopped at the --timeout of 1 s" in captured.err


def test_review_timeout_bounds_a_server_that_does_not_even_list_its_models(repo, stalling_server, capsys):
    url, behaviour = stalling_server
    behaviour["stall_models"] = True
    started = time.monotonic()
    assert main(["review", "--staged", "--backend", url, "--no-log", "--json", "--timeout", "1"]) == 0
    assert time.monotonic() - started < 5
    captured = capsys.readouterr()
    assert json.loads(captured.out)["timed_out"] is True
    assert "stopped at the --timeout of 1 s" in captured.err


def test_review_timeout_keeps_what_a_stalling_server_sent(repo, stalling_server, capsys):
    url, behaviour = stalling_server
    behaviour["first_line"] = b"src/calc.py:2: error: add subtracts\n"
    assert main(["review", "--staged", "--backend", url, "--no-log", "--timeout", "1", "--fail-on", "error"]) == 1
    captured = capsys.readouterr()
    assert "add subtracts" in captured.out
    assert "stopped at the --timeout of 1 s" in captured.err


def test_review_without_timeout_reads_dsv4_backend_and_fails_on_a_refused_connection(repo, closed_port_url, monkeypatch, capsys):
    monkeypatch.setenv("DSV4_BACKEND", closed_port_url)
    assert main(["review", "--staged", "--no-log"]) == 1
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("Error: cannot reach") and closed_port_url in line
