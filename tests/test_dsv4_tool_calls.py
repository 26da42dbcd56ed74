"""The DSML tool-call block the model generates, parsed back into calls (engine/deepseek_v4/
tool_calls.py): whole answers and streamed pieces agree, the arguments are the JSON DeepSeek's
parser builds (string parameters quoted, others kept as written), and every malformed block
comes out as the text it was, never as an error. The blocks are written out by hand."""

from __future__ import annotations

import json
import random

import pytest

from engine.deepseek_v4.tool_calls import (
    ToolCall,
    ToolCallParser,
    calls_block,
    parse_block,
    split_tool_calls,
)

D = "｜DSML｜"

TWO_CALLS = (
    f"<{D}tool_calls>\n"
    f'<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="city" string="true">Paris, "the capital"\nof France</{D}parameter>\n'
    f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
    f'<{D}parameter name="options" string="false">{{"units": ["C", null], "exact": true, "ratio": 0.25}}</{D}parameter>\n'
    f"</{D}invoke>\n"
    f'<{D}invoke name="now">\n'
    "\n"
    f"</{D}invoke>\n"
    f"</{D}tool_calls>"
)
EXPECTED = [
    ToolCall("get_weather", '{"city": "Paris, \\"the capital\\"\\nof France", "days": 2, '
                            '"options": {"units": ["C", null], "exact": true, "ratio": 0.25}}'),
    ToolCall("now", "{}"),
]


def stream(text: str, sizes: list[int]) -> list[str | ToolCall]:
    parser = ToolCallParser()
    items: list[str | ToolCall] = []
    position = 0
    for size in sizes:
        items += parser.feed(text[position : position + size])
        position += size
    items += parser.feed(text[position:])
    return items + parser.finish()


def merged(items: list[str | ToolCall]) -> list[str | ToolCall]:
    """Adjacent text items joined: how the pieces split is the stream's business."""
    out: list[str | ToolCall] = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] += item
        else:
            out.append(item)
    return out


def test_an_answer_with_content_and_two_calls():
    content, calls = split_tool_calls(f"Let me check.\n\n{TWO_CALLS}")
    assert content == "Let me check." and calls == EXPECTED
    assert [json.loads(c.arguments) for c in calls] == [
        {"city": 'Paris, "the capital"\nof France', "days": 2, "options": {"units": ["C", None], "exact": True, "ratio": 0.25}},
        {},
    ]


def test_an_answer_that_is_only_calls_has_no_content():
    assert split_tool_calls(f"\n\n{TWO_CALLS}") == ("", EXPECTED)
    assert split_tool_calls(TWO_CALLS) == ("", EXPECTED)


def test_an_answer_without_calls_is_all_text():
    for text in ("Plain answer.", "ends with a blank line\n\n", "mentions <｜DSML｜tool_calls without closing", "<", "<｜DSML｜tool"):
        assert split_tool_calls(text) == (text, [])


@pytest.mark.parametrize("seed", range(20))
def test_streamed_in_any_pieces_it_gives_the_same_items(seed):
    text = f"Let me check.\n\n{TWO_CALLS}"
    rng = random.Random(seed)
    sizes = [rng.randint(1, 7) for _ in range(len(text) // 3)]
    assert merged(stream(text, sizes)) == ["Let me check.", *EXPECTED]
    assert merged(stream(text, [1] * len(text))) == ["Let me check.", *EXPECTED]


def test_text_before_a_block_streams_out_before_the_block_ends():
    parser = ToolCallParser()
    assert parser.feed("Let me check") == ["Let me check"]
    assert parser.feed(".\n") == ["."]          # a newline might start the blank line before a block
    assert parser.feed("\n<｜DSML") == []        # held back: it might be a block
    assert parser.feed(TWO_CALLS[len("<｜DSML"):-3]) == []
    assert parser.feed(TWO_CALLS[-3:]) == EXPECTED
    assert parser.finish() == [] and parser.calls == EXPECTED
    held = ToolCallParser()
    assert held.feed("a\n\n<｜DS") == ["a"] and held.feed("x") == ["\n\n<｜DSx"]  # not a block after all


def test_what_the_encoder_writes_parses_back():
    calls = [{"id": "1", "type": "function", "function": {"name": "search", "arguments": '{"q": "dsv4", "k": 5, "tags": ["a"]}'}},
             {"id": "2", "type": "function", "function": {"name": "noop", "arguments": "{}"}}]
    assert parse_block(calls_block(calls)) == [ToolCall("search", '{"q": "dsv4", "k": 5, "tags": ["a"]}'), ToolCall("noop", "{}")]


MALFORMED = {
    "unterminated": f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n",
    "bad JSON value": f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="n" string="false">not json</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>',
    "duplicate parameter": (f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">1</{D}parameter>\n'
                            f'<{D}parameter name="a" string="true">2</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'),
    "no string attribute": f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a">1</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>',
    "string attribute neither true nor false": (f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="yes">1'
                                                f'</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'),
    "missing newline": f'<{D}tool_calls><{D}invoke name="f">\n\n</{D}invoke>\n</{D}tool_calls>',
    "invoke not closed": f'<{D}tool_calls>\n<{D}invoke name="f">\n\n</{D}tool_calls>',
    "text between calls": f'<{D}tool_calls>\n<{D}invoke name="f">\n\n</{D}invoke>\nand then\n</{D}tool_calls>',
    "parameter not closed": f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">1\n</{D}invoke>\n</{D}tool_calls>',
}


@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_block_is_left_as_text(block):
    text = f"Calling.\n\n{block}"
    assert parse_block(block) is None
    assert split_tool_calls(text) == (text, [])
    assert "".join(i for i in stream(text, [3] * (len(text) // 3)) if isinstance(i, str)) == text


def test_text_after_a_block_and_a_second_block_are_kept():
    one = f'<{D}tool_calls>\n<{D}invoke name="a">\n\n</{D}invoke>\n</{D}tool_calls>'
    content, calls = split_tool_calls(f"x\n\n{one} trailing\n\n{one}")
    assert content == "x trailing" and calls == [ToolCall("a", "{}"), ToolCall("a", "{}")]


@pytest.mark.parametrize("seed", range(30))
def test_random_text_with_dsml_fragments_never_raises_and_loses_nothing(seed):
    rng = random.Random(seed)
    fragments = ["<", "｜DSML｜", "tool_calls>", "</", "invoke", ' name="f">', "parameter", ' string="true">', "\n", "\n\n", "x", '"', "{", "}"]
    text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 60)))
    items = stream(text, [rng.randint(1, 9) for _ in range(len(text))])
    content, calls = split_tool_calls(text)
    assert "".join(i for i in items if isinstance(i, str)) == content
    assert [i for i in items if isinstance(i, ToolCall)] == calls
    if not calls:
        assert content == text
