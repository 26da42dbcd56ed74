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

User turns, tool results and tools follow DeepSeek's `encoding_dsv4.py` (read in the
annotated copy supermy/ds4rs : encoding/encoding_dsv4.py and the vision variant
sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark : encoding/encoding_dsv4.py):
- There is no tool role: `merge_tool_messages` turns each tool result into a
  <tool_result>…</tool_result> block of a user turn, and a run of consecutive user and tool
  messages becomes ONE user turn whose blocks are joined by "\n\n". When there are several
  results, `sort_tool_results_by_call_order` puts them in the order of the last assistant
  turn's calls (by tool_call_id).
- Such a merged turn counts as a user turn when finding the last one, so in thinking mode
  (without tools, i.e. with drop_thinking) an assistant turn before tool results loses its
  reasoning, and the model reasons again after them.
- `<｜Assistant｜>` plus `<think>`/`</think>` close a user turn that an assistant turn follows
  (or, with add_generation_prompt, the user turn that ends the conversation): two assistant
  messages in a row share one `<｜Assistant｜>`, an assistant message right after the system
  prompt has none, and nothing follows a conversation that ends with an assistant turn.
- Tools (`tools=`, or `tools` on the leading system message as vLLM attaches them): the
  Tools section of engine/deepseek_v4/tool_calls.py after the system prompt and "\n\n" (an
  empty system message is put first when there is none). With tools anywhere, reasoning is
  never dropped: every assistant turn keeps `{reasoning}</think>` in thinking mode, and every
  user turn closes with `<think>`.
- An assistant message's `tool_calls`: "\n\n" + the DSML block after its content, before EOS.
Not encoded: the reasoning_effort="max" paragraph, the `developer` and `latest_reminder`
roles, and the internal task tokens.

The Jinja template does the layout; the JSON inside the Tools section and the DSML blocks
(which Jinja's `tojson` would sort and HTML-escape) is written in Python by
`DeepSeekV4Template` and handed to the template as `tools_section` and `calls_block` fields.
Those texts are template text, not message content, so the specials in them are control
tokens, as when the official encoder's prompt string is tokenized.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.deepseek_v4.tool_calls import ToolFormatError, calls_block, tools_section

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"

# One line per statement joined without newlines: the rendered prompt has no whitespace
# that the official encoder would not put there. `keep_reasoning` and the `tools_section` /
# `calls_block` fields come from DeepSeekV4Template.
CHAT_TEMPLATE = "".join(
    [
        "{% set ns = namespace(last_user=-1) %}",
        "{% for m in messages %}{% if m['role'] in ('user', 'tool') %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}",
        "{{ bos_token }}",
        "{% for m in messages %}",
        "{% if m['role'] == 'system' %}{{ m['content'] or '' }}{% if m.get('tools_section') %}{{ '\\n\\n' }}{{ m['tools_section'] }}{% endif %}",
        "{% elif m['role'] in ('user', 'tool') %}",
        "{% if loop.first or loop.previtem['role'] not in ('user', 'tool') %}" + USER + "{% else %}{{ '\\n\\n' }}{% endif %}",
        "{% if m['role'] == 'user' %}{{ m['content'] }}{% else %}<tool_result>{{ m['content'] }}</tool_result>{% endif %}",
        "{% if (loop.last and add_generation_prompt) or (not loop.last and loop.nextitem['role'] == 'assistant') %}" + ASSISTANT,
        "{% if thinking and (keep_reasoning or loop.index0 >= ns.last_user) %}" + THINK + "{% else %}" + END_THINK + "{% endif %}",
        "{% endif %}",
        "{% elif m['role'] == 'assistant' %}",
        "{% if thinking and (keep_reasoning or loop.index0 > ns.last_user) %}{{ m.get('reasoning_content') or '' }}" + END_THINK + "{% endif %}",
        "{{ m['content'] or '' }}{% if m.get('calls_block') %}{{ '\\n\\n' }}{{ m['calls_block'] }}{% endif %}" + EOS,
        "{% else %}{{ raise_exception('unknown role ' ~ m['role']) }}",
        "{% endif %}",
        "{% endfor %}",
    ]
)


class DeepSeekV4Template:
    """CHAT_TEMPLATE with the Python half of the format (tools attached to the system prompt,
    tool results in call order, the JSON-bearing texts written out), in the interface of
    engine.chat_template.ChatTemplate; jinja2 is imported at the first render, so counting
    tokens with this tokenizer never loads it."""

    source = CHAT_TEMPLATE

    def __init__(self) -> None:
        self._jinja: Any = None

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        prepared, kwargs = self._prepare(messages, kwargs)
        return self._template().render(prepared, add_generation_prompt=add_generation_prompt, **kwargs)

    def render_pieces(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> list[tuple[bool, str]]:
        prepared, kwargs = self._prepare(messages, kwargs)
        return self._template().render_pieces(prepared, add_generation_prompt=add_generation_prompt, **kwargs)

    def _template(self) -> Any:
        if self._jinja is None:
            from engine.chat_template import ChatTemplate

            self._jinja = ChatTemplate(CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)
        return self._jinja

    @staticmethod
    def _prepare(messages: Sequence[dict[str, Any]], kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        kwargs = dict(kwargs)
        try:
            prepared = _prepare(list(messages), kwargs.pop("tools", None))
        except ToolFormatError as exc:
            from engine.chat_template import ChatTemplateError

            raise ChatTemplateError(f"chat template refused the conversation: {exc}", "check the tools and tool_calls") from None
        # Official: any tools in the conversation turn drop_thinking off.
        kwargs["keep_reasoning"] = any(m.get("tools_section") for m in prepared)
        return prepared, kwargs


def _prepare(messages: list[dict[str, Any]], tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    if tools:
        # vLLM's DeepSeek-V4 tokenizer: request-level tools go on the leading system message,
        # or on an empty one put first.
        if messages and messages[0].get("role") == "system":
            messages[0] = {**messages[0], "tools": tools}
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise ToolFormatError("each message must be an object with a role")
        if message.get("tools") and message.get("role") == "system":
            message = {**message, "tools_section": tools_section(message["tools"])}
        if message.get("tool_calls") and message.get("role") == "assistant":
            message = {**message, "calls_block": calls_block(message["tool_calls"])}
        prepared.append(message)
    return _tool_results_in_call_order(prepared)


def _tool_results_in_call_order(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Within each run of user/tool messages, the tool results take the order of the latest
    assistant turn's calls (a stable sort; an unknown id sorts as the first call), the user
    messages keep their places: the official `sort_tool_results_by_call_order`."""
    order: dict[str, int] = {}
    out = list(messages)
    index = 0
    while index < len(out):
        message = out[index]
        if message.get("role") == "assistant" and message.get("tool_calls"):
            order = {}
            for position, call in enumerate(message["tool_calls"]):
                call_id = call.get("id") or (call.get("function") or {}).get("id", "")
                if call_id:
                    order[call_id] = position
        if message.get("role") not in ("user", "tool"):
            index += 1
            continue
        end = index
        while end < len(out) and out[end].get("role") in ("user", "tool"):
            end += 1
        slots = [i for i in range(index, end) if out[i].get("role") == "tool"]
        if len(slots) > 1 and order:
            results = sorted((out[i] for i in slots), key=lambda m: order.get(m.get("tool_call_id", ""), 0))
            for slot, result in zip(slots, results):
                out[slot] = result
        index = end
    return out


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


def encodes_tools(tokenizer: Any) -> bool:
    """Whether a tokenizer's chat format writes tools and tool calls (DeepSeek-V4's does)."""
    return getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE


def tokenizer_for(directory: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer.json, with DeepSeek-V4's chat format when it ships no
    template, and the config's eos id as a stop id (spec §6: stop on id 1)."""
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(directory)
    # from_hf_dir memoises per file: setting the same values again is harmless.
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.chat_template == CHAT_TEMPLATE and not isinstance(tokenizer._template, DeepSeekV4Template):
        # The tokenizer builds a plain ChatTemplate from the source at first use; ours first
        # writes the JSON-bearing parts in Python.
        tokenizer._template = DeepSeekV4Template()
    if tokenizer.bos_id is None:
        tokenizer.bos_id = tokenizer.special_tokens.get(BOS)
    eos = read_config(directory).get("eos_token_id")
    stops = {i for i in ([eos] if isinstance(eos, int) else eos or []) if isinstance(i, int)}
    if EOS in tokenizer.special_tokens:
        stops.add(tokenizer.special_tokens[EOS])
    tokenizer.stop_ids = tokenizer.stop_ids | frozenset(stops)
    return tokenizer
