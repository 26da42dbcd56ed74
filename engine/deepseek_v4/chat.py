"""DeepSeek-V4's prompt format (spec §6) and the tokenizer that carries it. Torch-free.

The checkpoints ship no Jinja template: DeepSeek's `encoding/encoding_dsv4.py` builds the
prompt in Python. We express the same layout as a Jinja template so it runs through
`engine.chat_template.ChatTemplate`, whose piece tracking keeps message contents plain text
(a user who types "<｜User｜>" gets text, not a control token) and whose source text feeds
the prefix cache's fingerprint like any other model's template.

    BOS + system content (raw, no role token)
    <｜User｜>{user}
    <｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>        chat mode, and every past turn
    <｜Assistant｜><think>{reasoning}</think>{answer}<｜end▁of▁sentence｜>  thinking mode, after the last user turn
    generation prompt: <｜Assistant｜></think> (chat) or <｜Assistant｜><think> (thinking=True)

User turns and tool results follow DeepSeek's `encoding_dsv4.py` (read in the annotated copy
supermy/ds4rs : encoding/encoding_dsv4.py and the vision variant
sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark : encoding/encoding_dsv4.py):
- There is no tool role: `merge_tool_messages` turns each tool result into a
  <tool_result>…</tool_result> block of a user turn, and a run of consecutive user and tool
  messages becomes ONE user turn whose blocks are joined by "\n\n".
- Such a merged turn counts as a user turn when finding the last one, so in thinking mode
  (without tools, i.e. with drop_thinking) an assistant turn before tool results loses its
  reasoning, and the model reasons again after them.
Not encoded, because the spec names them without their text: the Tools section appended to
the system prompt (`tools=`), and the `<｜DSML｜tool_calls>` block of an assistant turn that
calls tools (`tool_calls` on a message). Both are refused with an error instead of being
dropped, which would give a prompt the model was never trained on. Also not encoded: the
exact wording of the reasoning_effort="max" paragraph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"

_TOOLS_HINT = "for tool use, serve the model with vLLM or SGLang and use --backend"
_NO_TOOLS = repr("tool definitions (tools=) are not supported in DeepSeek-V4's prompt format yet: "
                 "the Tools section's text is not specified (design/deepseek-v4.md §6)") + ", " + repr(_TOOLS_HINT)
_NO_TOOL_CALLS = repr("assistant tool_calls are not supported in DeepSeek-V4's prompt format yet: "
                      "the <｜DSML｜tool_calls> block's text is not specified (design/deepseek-v4.md §6)") + ", " + repr(_TOOLS_HINT)

# One line per statement joined without newlines: the rendered prompt has no whitespace
# that the official encoder would not put there.
CHAT_TEMPLATE = "".join(
    [
        "{% set ns = namespace(last_user=-1) %}",
        "{% for m in messages %}{% if m['role'] in ('user', 'tool') %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}",
        "{% if tools %}{{ raise_exception(" + _NO_TOOLS + ") }}{% endif %}",
        "{{ bos_token }}",
        "{% for m in messages %}",
        "{% if m['role'] == 'system' %}{{ m['content'] }}",
        "{% elif m['role'] in ('user', 'tool') %}",
        "{% if loop.first or loop.previtem['role'] not in ('user', 'tool') %}" + USER + "{% else %}{{ '\\n\\n' }}{% endif %}",
        "{% if m['role'] == 'user' %}{{ m['content'] }}{% else %}<tool_result>{{ m['content'] }}</tool_result>{% endif %}",
        "{% elif m['role'] == 'assistant' %}",
        "{% if m.get('tool_calls') %}{{ raise_exception(" + _NO_TOOL_CALLS + ") }}{% endif %}" + ASSISTANT,
        "{% if thinking and loop.index0 > ns.last_user %}" + THINK + "{{ m.get('reasoning_content') or '' }}" + END_THINK,
        "{% else %}" + END_THINK + "{% endif %}",
        "{{ m['content'] or '' }}" + EOS,
        "{% else %}{{ raise_exception('unknown role ' ~ m['role']) }}",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}" + ASSISTANT + "{% if thinking %}" + THINK + "{% else %}" + END_THINK + "{% endif %}{% endif %}",
    ]
)


def is_deepseek_v4_config(config: dict) -> bool:
    """Whether a Hugging Face config.json describes a DeepSeek-V4 model."""
    architectures = config.get("architectures") or []
    return config.get("model_type") == "deepseek_v4" or "DeepseekV4ForCausalLM" in architectures


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint directory ({} when absent or unreadable as an object)."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tokenizer_for(directory: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer.json, with DeepSeek-V4's chat format when it ships no
    template, and the config's eos id as a stop id (spec §6: stop on id 1)."""
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(directory)
    # from_hf_dir memoises per file: setting the same values again is harmless.
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.bos_id is None:
        tokenizer.bos_id = tokenizer.special_tokens.get(BOS)
    eos = read_config(directory).get("eos_token_id")
    stops = {i for i in ([eos] if isinstance(eos, int) else eos or []) if isinstance(i, int)}
    if EOS in tokenizer.special_tokens:
        stops.add(tokenizer.special_tokens[EOS])
    tokenizer.stop_ids = tokenizer.stop_ids | frozenset(stops)
    return tokenizer
