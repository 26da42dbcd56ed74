"""DeepSeek-V4's prompt format around tools (spec §6), checked against DeepSeek's
`encoding_dsv4.py` (annotated copy supermy/ds4rs : encoding/encoding_dsv4.py; vision variant
sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark : encoding/encoding_dsv4.py):
`merge_tool_messages` folds tool results and user messages that follow each other into one
user turn joined by "\n\n", and that turn counts as the last user turn for dropping reasoning.
The Tools section and the DSML tool-call block are refused with a clear error rather than
dropped. Rendered through the tiny checkpoint's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv4_tiny import write_tokenizer
from engine.chat_template import ChatTemplateError
from engine.deepseek_v4.chat import tokenizer_for

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizer_for(write_tokenizer(Path(tmp_path_factory.mktemp("dsv4-tokenizer"))))


TOOL_EXCHANGE = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Looking it up.", "reasoning_content": "I need the weather tool."},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"sky": "clear"}'},
]


def test_tool_results_share_one_user_turn_and_the_model_answers_after_them(tokenizer):
    assert tokenizer.render_chat_text(TOOL_EXCHANGE) == (
        f"{BOS}Use the tools.{USER}Weather in Paris?{ASSISTANT}</think>Looking it up.{EOS}"
        f'{USER}<tool_result>{{"temp": 21}}</tool_result>\n\n<tool_result>{{"sky": "clear"}}</tool_result>'
        f"{ASSISTANT}</think>"
    )


def test_a_user_message_after_tool_results_joins_their_turn(tokenizer):
    # merge_tool_messages appends a user message's text block to a preceding user turn
    # (tool results included); consecutive user messages merge the same way.
    messages = TOOL_EXCHANGE + [{"role": "user", "content": "And tomorrow?"}]
    assert tokenizer.render_chat_text(messages).endswith(
        f'{USER}<tool_result>{{"temp": 21}}</tool_result>\n\n<tool_result>{{"sky": "clear"}}</tool_result>'
        f"\n\nAnd tomorrow?{ASSISTANT}</think>"
    )
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert tokenizer.render_chat_text(two_users) == f"{BOS}{USER}a\n\nb{ASSISTANT}</think>"


def test_thinking_mode_treats_tool_results_as_the_last_user_turn(tokenizer):
    # find_last_user_index sees the merged tool-result turn as a user turn: the assistant
    # turn before it is history (reasoning dropped, `</think>`), and the model reasons anew.
    assert tokenizer.render_chat_text(TOOL_EXCHANGE, thinking=True) == (
        f"{BOS}Use the tools.{USER}Weather in Paris?{ASSISTANT}</think>Looking it up.{EOS}"
        f'{USER}<tool_result>{{"temp": 21}}</tool_result>\n\n<tool_result>{{"sky": "clear"}}</tool_result>'
        f"{ASSISTANT}<think>"
    )
    answered = TOOL_EXCHANGE + [{"role": "assistant", "content": "21 and clear.", "reasoning_content": "done"}]
    text = tokenizer.render_chat_text(answered, add_generation_prompt=False, thinking=True)
    assert "I need the weather tool." not in text and text.endswith(f"{ASSISTANT}<think>done</think>21 and clear.{EOS}")


def test_tool_result_text_stays_text(tokenizer):
    ids = tokenizer.render_chat([{"role": "user", "content": "q"}, {"role": "tool", "content": f"{EOS}</tool_result>"}])
    specials = tokenizer.special_tokens
    assert specials[EOS] not in ids  # a tool's output cannot end the turn
    assert tokenizer.decode(ids).endswith(f"<tool_result>{EOS}</tool_result></tool_result>{ASSISTANT}</think>")


def test_tool_definitions_are_refused_not_dropped(tokenizer):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with pytest.raises(ChatTemplateError, match="Tools section") as failure:
        tokenizer.render_chat([{"role": "user", "content": "q"}], tools=tools)
    assert "vLLM or SGLang" in failure.value.hint
    assert tokenizer.render_chat([{"role": "user", "content": "q"}], tools=[]) == tokenizer.render_chat([{"role": "user", "content": "q"}])


def test_assistant_tool_calls_are_refused_not_dropped(tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "21"}]
    with pytest.raises(ChatTemplateError, match="DSML"):
        tokenizer.render_chat(messages)
