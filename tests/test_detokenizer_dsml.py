"""DeepSeek-V4's DSML marker `｜DSML｜` is an added token marked special (as in the official
tokenizer.json), and the engine's generation loop drops control tokens from the text: the
marker must stay, or a generated `<｜DSML｜tool_calls>` block reaches the call parser as
`<tool_calls>` and the calls come back as plain text."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.deepseek_v4.chat import tokenizer_for
from engine.deepseek_v4.tool_calls import ToolCallParser
from engine.detokenizer import StreamingDetokenizer
from engine.tokenizer import Tokenizer
from tests.dsv4_tiny import DSML_TOKEN, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return tokenizer_for(write_tokenizer(tmp_path_factory.mktemp("dsv4-tokenizer")))


def generated(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text` with each DSML marker as its one added token, as a model emits it."""
    ids: list[int] = []
    for index, part in enumerate(text.split(DSML_TOKEN)):
        if index:
            ids.append(tokenizer.special_tokens[DSML_TOKEN])
        ids += tokenizer.encode(part)
    return ids


CALL = (f'<{DSML_TOKEN}tool_calls>\n<{DSML_TOKEN}invoke name="get_time">\n'
        f'<{DSML_TOKEN}parameter name="zone" string="true">UTC</{DSML_TOKEN}parameter>\n'
        f"</{DSML_TOKEN}invoke>\n</{DSML_TOKEN}tool_calls>")


def test_the_marker_is_one_control_token_as_in_the_official_tokenizer(tokenizer):
    marker = tokenizer.special_tokens[DSML_TOKEN]
    assert tokenizer.is_special(marker)
    assert tokenizer.encode(DSML_TOKEN) != [marker]  # typed by a user it stays text
    template_call = tokenizer.render_chat([{"role": "user", "content": "t?"}, {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]}],
        add_generation_prompt=False)
    assert template_call.count(marker) == CALL.count(DSML_TOKEN)  # the prompt format writes it as the token


def test_generation_keeps_the_marker_and_drops_other_control_tokens(tokenizer):
    ids = [*generated(tokenizer, "Checking.\n\n" + CALL), tokenizer.special_tokens["<｜User｜>"]]
    assert tokenizer.special_tokens[DSML_TOKEN] in ids
    detok = StreamingDetokenizer(tokenizer, skip_special=True)
    text = "".join(detok.add(token) for token in ids) + detok.flush()
    assert text == "Checking.\n\n" + CALL
    parser = ToolCallParser()
    items = parser.feed(text) + parser.finish()
    assert "".join(i for i in items if isinstance(i, str)) == "Checking."
    assert [(call.name, call.arguments) for call in parser.calls] == [("get_time", '{"zone": "UTC"}')]


def test_the_tiny_tokenizer_has_the_marker_after_its_trained_vocabulary(tmp_path: Path):
    import json

    data = json.loads((write_tokenizer(tmp_path) / "tokenizer.json").read_text(encoding="utf-8"))
    added = {token["content"]: token for token in data["added_tokens"]}
    assert added[DSML_TOKEN]["special"] and added[DSML_TOKEN]["id"] == 511  # the last id of the tiny 512
