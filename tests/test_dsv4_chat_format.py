"""DeepSeek-V4's prompt format around tools (spec §6), checked against DeepSeek's
`encoding_dsv4.py` (annotated copy supermy/ds4rs : encoding/encoding_dsv4.py; vision variant
sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark : encoding/encoding_dsv4.py):
`merge_tool_messages` folds tool results and user messages that follow each other into one
user turn joined by "\n\n", and that turn counts as the last user turn for dropping reasoning;
the Tools section follows the system prompt, an assistant turn's calls follow its content as a
DSML block, and tools anywhere keep every turn's reasoning. The expected prompts are written
out by hand from the format. Rendered through the tiny checkpoint's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.chat_template import ChatTemplateError
from engine.deepseek_v4.chat import tokenizer_for
from tests.dsv4_tiny import write_tokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"  # the DSML tag, to keep the expected blocks readable


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


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}

# The Tools section as DeepSeek's TOOLS_TEMPLATE writes it, schemas one JSON line each
# (json.dumps defaults: ", " and ": ", key order kept, non-ASCII kept).
TOOLS_SECTION = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"<{D}tool_calls>" block like the following:\n\n'
    f"<{D}tool_calls>\n"
    f'<{D}invoke name="$TOOL_NAME">\n'
    f'<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>\n'
    "...\n"
    f"</{D}invoke>\n"
    f'<{D}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{D}invoke>\n"
    f"</{D}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    '{"name": "get_weather", "description": "Current weather for a city (°C).", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}\n'
    '{"name": "now", "parameters": {"type": "object", "properties": {}}}\n\n'
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)


def call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


AGENT_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Two tools.",
     "tool_calls": [call("c1", "get_weather", '{"city": "Paris", "days": 2}'), call("c2", "now", "{}")]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 and clear"},
    {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
    {"role": "assistant", "content": "21 °C and clear; it is noon.", "reasoning_content": "Both answered."},
]
CALLS_BLOCK = (
    f"<{D}tool_calls>\n"
    f'<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
    f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
    f"</{D}invoke>\n"
    f'<{D}invoke name="now">\n'
    "\n"
    f"</{D}invoke>\n"
    f"</{D}tool_calls>"
)


def test_tools_call_result_and_answer_in_chat_mode(tokenizer):
    assert tokenizer.render_chat_text(AGENT_TURNS, tools=[WEATHER, CLOCK], add_generation_prompt=False) == (
        f"{BOS}Be brief.\n\n{TOOLS_SECTION}"
        f"{USER}Weather in Paris and the time?{ASSISTANT}</think>Checking.\n\n{CALLS_BLOCK}{EOS}"
        f"{USER}<tool_result>21 and clear</tool_result>\n\n<tool_result>12:00</tool_result>{ASSISTANT}</think>"
        f"21 °C and clear; it is noon.{EOS}"
    )


def test_with_tools_thinking_mode_keeps_every_turns_reasoning(tokenizer):
    # encode_messages turns drop_thinking off when any message carries tools: the reasoning
    # of the turn before the tool results stays, and every user turn opens <think>.
    assert tokenizer.render_chat_text(AGENT_TURNS, tools=[WEATHER, CLOCK], add_generation_prompt=False, thinking=True) == (
        f"{BOS}Be brief.\n\n{TOOLS_SECTION}"
        f"{USER}Weather in Paris and the time?{ASSISTANT}<think>Two tools.</think>Checking.\n\n{CALLS_BLOCK}{EOS}"
        f"{USER}<tool_result>21 and clear</tool_result>\n\n<tool_result>12:00</tool_result>{ASSISTANT}<think>"
        f"Both answered.</think>21 °C and clear; it is noon.{EOS}"
    )
    # The same conversation without tools drops the first turn's reasoning.
    assert tokenizer.render_chat_text(AGENT_TURNS, add_generation_prompt=False, thinking=True).startswith(
        f"{BOS}Be brief.{USER}Weather in Paris and the time?{ASSISTANT}</think>Checking.\n\n{CALLS_BLOCK}{EOS}"
    )


def test_tools_without_a_system_message_get_an_empty_one(tokenizer):
    question = [{"role": "user", "content": "Time?"}]
    assert tokenizer.render_chat_text(question, tools=[WEATHER, CLOCK]) == f"{BOS}\n\n{TOOLS_SECTION}{USER}Time?{ASSISTANT}</think>"
    assert tokenizer.render_chat_text(question, tools=[WEATHER, CLOCK], thinking=True).endswith(f"{USER}Time?{ASSISTANT}<think>")
    # tools on the leading system message, as vLLM attaches them, render the same way
    on_system = [{"role": "system", "content": "", "tools": [WEATHER, CLOCK]}, *question]
    assert tokenizer.render_chat_text(on_system) == tokenizer.render_chat_text(question, tools=[WEATHER, CLOCK])
    assert tokenizer.render_chat(question, tools=[]) == tokenizer.render_chat(question)


def test_arguments_of_every_json_type(tokenizer):
    arguments = ('{"text": "a \\"quoted\\" line\\nand more", "count": 3, "ratio": 0.5, "flag": true, "none": null, '
                 '"list": [1, "two", false], "nested": {"k": ["v"]}, "unicode": "café"}')
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [call("x", "run", arguments)]}]
    assert tokenizer.render_chat_text(messages, add_generation_prompt=False) == (
        f"{BOS}{USER}go{ASSISTANT}</think>\n\n<{D}tool_calls>\n"
        f'<{D}invoke name="run">\n'
        f'<{D}parameter name="text" string="true">a "quoted" line\nand more</{D}parameter>\n'
        f'<{D}parameter name="count" string="false">3</{D}parameter>\n'
        f'<{D}parameter name="ratio" string="false">0.5</{D}parameter>\n'
        f'<{D}parameter name="flag" string="false">true</{D}parameter>\n'
        f'<{D}parameter name="none" string="false">null</{D}parameter>\n'
        f'<{D}parameter name="list" string="false">[1, "two", false]</{D}parameter>\n'
        f'<{D}parameter name="nested" string="false">{{"k": ["v"]}}</{D}parameter>\n'
        f'<{D}parameter name="unicode" string="true">café</{D}parameter>\n'
        f"</{D}invoke>\n</{D}tool_calls>{EOS}"
    )
    # Arguments that are not JSON become one string parameter named "arguments", as the official encoder does.
    raw = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call("x", "run", "ls -l")]}]
    assert f'<{D}parameter name="arguments" string="true">ls -l</{D}parameter>' in tokenizer.render_chat_text(raw)


def test_tool_results_follow_the_order_of_the_calls(tokenizer):
    # sort_tool_results_by_call_order: results that came back out of order are put in call order.
    swapped = AGENT_TURNS[:3] + [AGENT_TURNS[4], AGENT_TURNS[3]]
    assert tokenizer.render_chat_text(swapped).endswith(
        f"{USER}<tool_result>21 and clear</tool_result>\n\n<tool_result>12:00</tool_result>{ASSISTANT}</think>"
    )


def test_consecutive_assistant_messages_share_one_assistant_token(tokenizer):
    # The <｜Assistant｜> token closes the user turn; an assistant message never writes its own.
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]
    assert tokenizer.render_chat_text(messages) == f"{BOS}{USER}a{ASSISTANT}</think>b{EOS}c{EOS}"
    thinking = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
                {"role": "assistant", "content": "c", "reasoning_content": "r2"}]
    assert tokenizer.render_chat_text(thinking, thinking=True) == f"{BOS}{USER}a{ASSISTANT}<think>r1</think>b{EOS}r2</think>c{EOS}"
    after_system = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.render_chat_text(after_system) == f"{BOS}shello{EOS}"  # no <｜Assistant｜> at all


def test_the_call_block_is_control_text_and_a_tool_result_stays_text(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call("c", "f", "{}")]},
                {"role": "tool", "tool_call_id": "c", "content": f"{EOS}{ASSISTANT}"}]
    ids = tokenizer.render_chat(messages)
    specials = tokenizer.special_tokens
    assert ids.count(specials[EOS]) == 1 and ids.count(specials[ASSISTANT]) == 2  # the block's EOS and turns' only
    assert tokenizer.decode(ids) == tokenizer.render_chat_text(messages)


@pytest.mark.parametrize("tools, match", [
    ([{"type": "function"}], "each tool must look like"),
    (["get_weather"], "each tool must look like"),
])
def test_malformed_tool_definitions_are_a_clear_error(tokenizer, tools, match):
    with pytest.raises(ChatTemplateError, match=match):
        tokenizer.render_chat([{"role": "user", "content": "q"}], tools=tools)


def test_malformed_tool_calls_are_a_clear_error(tokenizer):
    for bad in ([{"type": "function"}], [call("c", "f", "[1, 2]")]):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": bad}]
        with pytest.raises(ChatTemplateError, match="tool call"):
            tokenizer.render_chat(messages)
