"""`dsv4 serve` in thinking mode, on loopback with the official `openai` client: a request
with vLLM/SGLang's `chat_template_kwargs: {"thinking": true}` or the DeepSeek API's
`thinking: {"type": "enabled"}` gets the prompt in DeepSeek-V4's thinking mode, and the
reasoning back apart from the answer (`message.reasoning_content`; streamed,
`delta.reasoning_content` then `delta.content`). The tiny official-format checkpoint's logits
are forced onto a scripted reply, so the real generation loop and detokenizer produce it.
mini-style models (the tiny llama) ignore the switch. `dsv4 ask --think --backend` shows the
served reasoning as it shows the engine's."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from dsv4cli.app import main
from dsv4cli.commands.serve import EngineServedModel, build_server
from dsv4cli.server import ApiServer, ReasoningSeparator, start_in_thread
from tests.dsv4_tiny import ForcedReply, load_tiny_model
from tests.stdins import TerminalStdin
from tests.test_serve import WEATHER_TOOL, D, as_generated
from tests.tinymodels import write_tiny_llama_gguf

openai = pytest.importorskip("openai")

REASONING, ANSWER = "Two and two: add them.", "It is 4."
QUESTION = [{"role": "user", "content": "2+2?"}]
THINK_ON = {"chat_template_kwargs": {"thinking": True}}


@pytest.fixture(scope="module")
def v4_loaded(tmp_path_factory):
    return load_tiny_model(tmp_path_factory.mktemp("serve-think") / "tiny-v4")


def scripted_server(loaded, reply: str, model_id: str = "v4") -> ApiServer:
    scripted = copy.copy(loaded)
    tokenizer = loaded.tokenizer
    scripted.model = ForcedReply(loaded.model, [*as_generated(tokenizer, reply), tokenizer.special_tokens["<｜end▁of▁sentence｜>"]])
    srv = build_server(EngineServedModel(scripted, model_id, cache=False), "127.0.0.1", 0, None)
    start_in_thread(srv)
    return srv


@pytest.fixture
def thinking_server(v4_loaded):
    srv = scripted_server(v4_loaded, f"{REASONING}</think>{ANSWER}")
    yield srv
    srv.shutdown()
    srv.server_close()


def client_for(srv: ApiServer):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="x", max_retries=0, timeout=60)


def last_prompt(srv: ApiServer) -> str:
    return srv.model.loaded.tokenizer.decode(srv.model.loaded.model.prompt)


def test_the_served_model_declares_what_its_format_has(v4_loaded, tmp_path):
    import engine

    v4 = EngineServedModel(v4_loaded, "v4")
    assert v4.supports_tools and v4.supports_thinking
    llama = EngineServedModel(engine.load(str(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))), "mini")
    assert not llama.supports_tools and not llama.supports_thinking


def test_streamed_reasoning_comes_in_reasoning_content_then_the_answer_in_content(thinking_server):
    chunks = list(client_for(thinking_server).chat.completions.create(
        model="v4", messages=QUESTION, max_tokens=64, temperature=0, stream=True, extra_body=THINK_ON))
    assert last_prompt(thinking_server).endswith("<｜User｜>2+2?<｜Assistant｜><think>")  # thinking mode
    kinds = [("reasoning" if getattr(c.choices[0].delta, "reasoning_content", None) else "answer")
             for c in chunks if getattr(c.choices[0].delta, "reasoning_content", None) or c.choices[0].delta.content]
    assert kinds == sorted(kinds, reverse=True) and "reasoning" in kinds and "answer" in kinds  # all reasoning first
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == (REASONING, ANSWER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_the_deepseek_api_switch_gives_reasoning_content_beside_content(thinking_server):
    answer = client_for(thinking_server).chat.completions.create(
        model="v4", messages=QUESTION, max_tokens=64, temperature=0, extra_body={"thinking": {"type": "enabled"}})
    message = answer.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == thinking_server.stats.last_done.usage.completion_tokens


def test_without_the_switch_or_with_it_off_the_prompt_is_chat_mode(v4_loaded):
    srv = scripted_server(v4_loaded, ANSWER)
    try:
        for extra in ({}, {"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"thinking": False}}):
            answer = client_for(srv).chat.completions.create(model="v4", messages=QUESTION, max_tokens=16, extra_body=extra)
            assert last_prompt(srv).endswith("<｜Assistant｜></think>")
            assert answer.choices[0].message.content == ANSWER
            assert getattr(answer.choices[0].message, "reasoning_content", None) is None
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_reply_cut_off_inside_the_reasoning_is_all_reasoning(thinking_server):
    answer = client_for(thinking_server).chat.completions.create(
        model="v4", messages=QUESTION, max_tokens=3, extra_body=THINK_ON)
    message = answer.choices[0].message
    assert message.content == "" and message.reasoning_content and REASONING.startswith(message.reasoning_content)
    assert answer.choices[0].finish_reason == "length"


def test_reasoning_then_a_tool_call(v4_loaded):
    call = (f'<{D}tool_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
            f"</{D}invoke>\n</{D}tool_calls>")
    srv = scripted_server(v4_loaded, f"I need the weather.</think>{call}")
    try:
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        chunks = list(client_for(srv).chat.completions.create(
            model="v4", messages=ask, tools=[WEATHER_TOOL], max_tokens=200, stream=True, extra_body=THINK_ON))
        assert last_prompt(srv).endswith("<｜User｜>Weather in Paris?<｜Assistant｜><think>")
        assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == "I need the weather."
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
        calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in calls] == [("get_weather", {"city": "Paris"})]
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
        # The next turn sends the call back with its reasoning: with tools the format keeps it.
        history = [*ask, {"role": "assistant", "content": None, "reasoning_content": "I need the weather.",
                          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "21"}]
        client_for(srv).chat.completions.create(model="v4", messages=history, tools=[WEATHER_TOOL], max_tokens=200, extra_body=THINK_ON)
        assert f"<｜Assistant｜><think>I need the weather.</think>\n\n<{D}tool_calls>" in last_prompt(srv)
        assert last_prompt(srv).endswith("<tool_result>21</tool_result><｜Assistant｜><think>")
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(("extra", "param"), [
    ({"thinking": {"type": "sometimes"}}, "thinking"),
    ({"thinking": True}, "thinking"),
    ({"chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["thinking"]}, "chat_template_kwargs"),
])
def test_a_malformed_switch_is_a_400_naming_it(thinking_server, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(thinking_server).chat.completions.create(model="v4", messages=QUESTION, max_tokens=4, extra_body=extra)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_a_model_without_thinking_mode_ignores_the_switch(tmp_path):
    import engine

    tiny = engine.load(str(write_tiny_llama_gguf(tmp_path / "tiny.gguf")))
    srv = build_server(EngineServedModel(tiny, "mini"), "127.0.0.1", 0, None)
    start_in_thread(srv)
    try:
        plain = client_for(srv).chat.completions.create(model="mini", messages=QUESTION, max_tokens=6, temperature=0)
        switched = client_for(srv).chat.completions.create(model="mini", messages=QUESTION, max_tokens=6, temperature=0, extra_body=THINK_ON)
        assert switched.choices[0].message.content == plain.choices[0].message.content
        assert switched.usage.prompt_tokens == plain.usage.prompt_tokens
        assert getattr(switched.choices[0].message, "reasoning_content", None) is None
    finally:
        srv.shutdown()
        srv.server_close()


def _ask(monkeypatch, srv: ApiServer, *args: str) -> int:
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    monkeypatch.setenv("DSV4_API_KEY", "x")
    return main(["ask", "--backend", f"http://127.0.0.1:{srv.port}/v1", "--think", "--max-tokens", "64", "--no-log", *args, "2+2?"])


def test_ask_think_against_serve_shows_the_reasoning_on_stderr_and_the_answer_on_stdout(thinking_server, monkeypatch, capsys):
    assert _ask(monkeypatch, thinking_server) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{ANSWER}\n"
    assert f"{REASONING}\n\n" in captured.err and "no end of the reasoning" not in captured.err
    assert last_prompt(thinking_server).endswith("<｜Assistant｜><think>")


def test_ask_think_json_against_serve_has_the_reasoning_apart(thinking_server, monkeypatch, capsys):
    assert _ask(monkeypatch, thinking_server, "--json") == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert (payload["answer"], payload["reasoning"], payload["model"]) == (ANSWER, REASONING, "v4")
    assert REASONING not in captured.err


@pytest.mark.parametrize("pieces", [
    [f"{REASONING}</think>{ANSWER}"],
    ["Two and two", ": add them.</th", "ink>", "It is", " 4."],   # the tag cut across pieces
    ["Two and two: add them.<", "/", "think", ">It is 4."],
])
def test_the_separator_finds_the_first_end_tag_across_pieces(pieces):
    separator = ReasoningSeparator()
    parts = [separator.feed(piece) for piece in pieces]
    reasoning = "".join(r for r, _ in parts) + separator.finish()
    assert (reasoning, "".join(a for _, a in parts)) == (REASONING, ANSWER)
    after = ReasoningSeparator()
    assert after.feed("r</think>a</think>b") == ("r", "a</think>b") and after.feed("<think>c") == ("", "<think>c")
