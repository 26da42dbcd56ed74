"""Thinking mode end to end (issue #4/#6): DeepSeek-V4's `<think>`/`</think>` are control
tokens, so a detokenizer that drops control tokens would hide where the reasoning ends.
On the tiny official-format checkpoint, a scripted reply goes through the real generation
loop and detokenizer; the CLI then shows the reasoning dimmed on stderr and the answer
alone on stdout, or (--json) the reasoning as its own field."""

from __future__ import annotations

import copy
import io
import json
import sys
from typing import Any

import pytest

from dsv4cli import render
from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from engine.detokenizer import StreamingDetokenizer
from engine.events import Done, SamplingParams, TextDelta
from engine.generate import stream
from tests.dsv4_tiny import ForcedReply, load_tiny_model
from tests.stdins import PipedStdin, TerminalStdin

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REASONING, ANSWER = "Two and two: add them.", "It is 4."


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny_model(tmp_path_factory.mktemp("dsv4") / "tiny-v4")


def reply_ids(tokenizer: Any) -> list[int]:
    specials = tokenizer.special_tokens
    return ([*tokenizer.encode(REASONING), specials["</think>"], *tokenizer.encode(ANSWER),
             specials["<｜end▁of▁sentence｜>"]])


def test_the_reasoning_markers_are_control_tokens_and_stay_in_the_text(loaded):
    tokenizer = loaded.tokenizer
    think, end_think = tokenizer.special_tokens["<think>"], tokenizer.special_tokens["</think>"]
    assert tokenizer.is_special(think) and tokenizer.is_special(end_think)  # what made them vanish
    detok = StreamingDetokenizer(tokenizer, skip_special=True)
    ids = [think, *tokenizer.encode("a"), end_think, tokenizer.special_tokens["<｜User｜>"], *tokenizer.encode("b")]
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "<think>a</think>b"  # other controls still go


def test_generation_surfaces_the_end_of_reasoning(loaded):
    tokenizer = loaded.tokenizer
    prompt = tokenizer.render_chat([{"role": "user", "content": "2+2?"}], thinking=True)
    assert prompt[-1] == tokenizer.special_tokens["<think>"]  # the reply starts inside the reasoning
    events = list(stream(ForcedReply(loaded.model, reply_ids(tokenizer)), tokenizer, prompt, SamplingParams(max_tokens=64)))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == f"{REASONING}</think>{ANSWER}"


def _consoles(color: bool) -> tuple[io.StringIO, io.StringIO, Any, Any]:
    from dsv4cli.console import stderr_console

    out, err = io.StringIO(), io.StringIO()
    options = {"width": 60, "color_system": "standard" if color else None, "force_terminal": False, "no_color": not color}
    return out, err, render.stdout_console(out, **options), stderr_console(err, **options)


@pytest.mark.parametrize("pieces", [
    [f"{REASONING}</think>{ANSWER}"],
    ["\nTwo and two", ": add them.</th", "ink>\n\n", "It is", " 4."],      # a tag cut across deltas
])
def test_the_view_dims_the_reasoning_on_stderr_and_keeps_stdout_for_the_answer(pieces):
    out, err, out_console, err_console = _consoles(color=True)
    view = render.AnswerView("plain", "flash", out=out_console, err=err_console, thinking=True)
    with view:
        for index, piece in enumerate(pieces, start=1):
            view.handle(TextDelta(piece, index))
    assert out.getvalue() == f"{ANSWER}\n"
    assert view.text == ANSWER and view.reasoning.strip() == REASONING
    shown = err.getvalue()
    assert "\x1b[2m" in shown and "Two and two" in shown and "It is" not in shown  # dim SGR
    assert shown.replace("\x1b[2m", "").replace("\x1b[0m", "") == f"{REASONING}\n\n"


def test_a_reply_without_the_end_tag_is_all_answer_with_a_note():
    out, err, out_console, err_console = _consoles(color=False)
    view = render.AnswerView("plain", "flash", out=out_console, err=err_console, thinking=True)
    with view:
        view.handle(TextDelta("just an answer", 1))
        view.handle(Done("stop", *_usage(), text="just an answer"))
    assert view.text == "just an answer" and view.reasoning == ""
    assert out.getvalue() == "just an answer\n" and "no end of the reasoning" in err.getvalue()


def _usage() -> tuple[Any, Any]:
    from engine.events import Timings, Usage

    return Usage(5, 0, 3), Timings(0.1, 0.1, 50.0, 0.2, 10.0)


def _ask_with_scripted(monkeypatch, loaded, args: list[str]) -> int:
    scripted = copy.copy(loaded)
    scripted.model = ForcedReply(loaded.model, reply_ids(loaded.tokenizer))
    monkeypatch.setattr(ask_command, "_open_model", lambda name: (loaded.name, scripted))
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    return main(["ask", "--model", "ignored", "--think", "--no-cache", "--no-log", *args, "2+2?"])


def test_ask_think_json_has_the_reasoning_apart(loaded, monkeypatch, capsys):
    assert _ask_with_scripted(monkeypatch, loaded, ["--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert (payload["answer"], payload["reasoning"]) == (ANSWER, REASONING)
    assert REASONING not in captured.err  # --json streams none of it


def test_ask_think_prints_reasoning_on_stderr_and_the_answer_on_stdout(loaded, monkeypatch, capsys):
    assert _ask_with_scripted(monkeypatch, loaded, []) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{ANSWER}\n"
    assert f"{REASONING}\n\n" in captured.err


def test_think_on_a_model_without_thinking_mode_is_a_note(monkeypatch, capsys, tmp_path):
    from tests.fake_engine import FakeModel, tiny_tokenizer

    fake = FakeModel(tiny_tokenizer(tmp_path), answer=["plain </think>answer"])
    monkeypatch.setattr(ask_command, "_open_model", lambda name: ("mini", fake))
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    assert main(["ask", "--think", "--no-log", "q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "plain </think>answer\n"  # not split: mini has no thinking mode
    assert "--think: mini has no thinking mode" in captured.err


def test_on_a_terminal_the_reasoning_streams_in_the_status_region_then_stays_dimmed():
    from dsv4cli.console import stderr_console

    err = io.StringIO()
    err_console = stderr_console(err, width=60, height=10, color_system="standard", force_terminal=True)
    out = io.StringIO()
    view = render.AnswerView("plain", "flash", out=render.stdout_console(out, width=60, force_terminal=False),
                             err=err_console, thinking=True)
    with view:
        for index, piece in enumerate(["\nstep one\n", "step two", "</think>", ANSWER], start=1):
            view.handle(TextDelta(piece, index))
            if index == 2:
                assert "step one" in view._reasoning_renderable().body.plain  # the live tail
    assert out.getvalue() == f"{ANSWER}\n"
    shown = err.getvalue()
    assert "\x1b[2mstep one\x1b[0m\n\x1b[2mstep two\x1b[0m\n" in shown  # printed whole, dimmed, above the answer


def test_chat_think_on_the_tiny_checkpoint_keeps_each_turns_reasoning_out_of_the_next_prompt(loaded, monkeypatch, capsys):
    """Two turns through the real generation loop: each shows its reasoning on stderr and its
    answer on stdout, and the second prompt carries the first turn as `</think>` + answer only."""
    tokenizer = loaded.tokenizer
    scripted = copy.copy(loaded)
    scripted.model = ForcedReply(loaded.model, reply_ids(tokenizer))
    rendered: list[str] = []
    real_render = tokenizer.render_chat

    def render_chat(messages, *args, **kwargs):
        rendered.append(tokenizer.render_chat_text(messages, *args, **kwargs))
        return real_render(messages, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "render_chat", render_chat)
    monkeypatch.setattr(ask_command, "_open_model", lambda name: (loaded.name, scripted))
    monkeypatch.setattr(sys, "stdin", PipedStdin("2+2?\nAnd 3+3?\n"))
    assert main(["chat", "--model", "ignored", "--think", "--no-cache", "--no-log", "--system", ""]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{ANSWER}\n" * 2
    assert captured.err.count(REASONING) == 2
    second = rendered[-1]
    assert second.endswith("<｜Assistant｜><think>") and "2+2?<｜Assistant｜></think>" + ANSWER in second
    assert REASONING not in second
