"""DeepSeek-V4's tool calling (spec §6): the Tools section of the system prompt, the DSML
block with which an assistant turn calls tools, and a streaming parser that turns the block
the model generates back into calls. Torch-free.

The text is DeepSeek's `encoding/encoding_dsv4.py` (`TOOLS_TEMPLATE`, `tool_call_template`,
`encode_arguments_to_dsml`, `parse_tool_calls`), read in the annotated copy
supermy/ds4rs : encoding/encoding_dsv4.py and the vision variant
sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark : encoding/encoding_dsv4.py. It is a
wire format the model was trained on, so every byte (newlines, JSON separators) matters:

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY" string="false">JSON</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

An assistant turn puts the block after its content, separated by "\\n\\n", and ends with EOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DSML = "｜DSML｜"
BLOCK_START = f"<{DSML}tool_calls>"
BLOCK_END = f"</{DSML}tool_calls>"
_INVOKE_OPEN = f"<{DSML}invoke"
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_OPEN = f"<{DSML}parameter"
_PARAM_CLOSE = f"</{DSML}parameter>"
# The content of an assistant turn and its call block are joined by this.
BLOCK_SEPARATOR = "\n\n"

_TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "{BLOCK_START}" block like the following:

{BLOCK_START}
{_INVOKE_OPEN} name="$TOOL_NAME">
{_PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{_PARAM_CLOSE}
...
{_INVOKE_CLOSE}
{_INVOKE_OPEN} name="$TOOL_NAME2">
...
{_INVOKE_CLOSE}
{BLOCK_END}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


class ToolFormatError(ValueError):
    """A tool definition or a tool call that cannot be written in DSML."""


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments as a JSON object text."""

    name: str
    arguments: str


def _json(value: Any) -> str:
    # The official encoder's to_json: non-ASCII kept, default separators, key order kept.
    return json.dumps(value, ensure_ascii=False)


def tools_section(tools: Sequence[Any]) -> str:
    """The Tools section appended (after "\\n\\n") to the system prompt, for OpenAI-style
    definitions ({"type": "function", "function": {name, description, parameters}}); each
    schema is the `function` object as one line of JSON."""
    schemas = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolFormatError('each tool must look like {"type": "function", "function": {"name": ..., "parameters": ...}}')
        schemas.append(_json(function))
    return _TOOLS_SECTION.replace("{schemas}", "\n".join(schemas))


def _arguments_object(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):  # some clients send the object itself rather than its text
        return arguments
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        # The official encoder's fallback: text that is not JSON becomes one string argument.
        return {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise ToolFormatError(f"tool call arguments must be a JSON object, not {arguments!r}")
    return parsed


def _parameter(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f'{_PARAM_OPEN} name="{key}" string="true">{value}{_PARAM_CLOSE}'
    return f'{_PARAM_OPEN} name="{key}" string="false">{_json(value)}{_PARAM_CLOSE}'


def calls_block(tool_calls: Iterable[Any]) -> str:
    """The DSML block for an assistant message's OpenAI-style `tool_calls`
    ([{"id", "type": "function", "function": {"name", "arguments": JSON text}}])."""
    invokes = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolFormatError('each tool call must look like {"type": "function", "function": {"name": ..., "arguments": "{...}"}}')
        parameters = "\n".join(_parameter(str(key), value) for key, value in _arguments_object(function.get("arguments")).items())
        invokes.append(f'{_INVOKE_OPEN} name="{function["name"]}">\n{parameters}\n{_INVOKE_CLOSE}')
    return f"{BLOCK_START}\n" + "\n".join(invokes) + f"\n{BLOCK_END}"


# ---------------------------------------------------------------------------- parsing


def parse_block(block: str) -> list[ToolCall] | None:
    """The calls of one whole block (BLOCK_START ... BLOCK_END), or None when it does not follow
    the format exactly. As the official parser: a string parameter's raw text becomes a JSON
    string, any other parameter's text is kept as the JSON it must be, and the arguments are
    `{"key": value, ...}`; a duplicate parameter name is an error. Unlike it, a non-string
    value that is not valid JSON is an error too, so `arguments` always parses."""
    if not (block.startswith(BLOCK_START + "\n") and block.endswith(BLOCK_END)):
        return None
    position, end = len(BLOCK_START) + 1, len(block) - len(BLOCK_END)
    calls = []
    while position < end:
        parsed = _parse_invoke(block, position, end)
        if parsed is None:
            return None
        call, position = parsed
        calls.append(call)
    return calls if position == end else None


def _named_tag(text: str, position: int, end: int, opening: str, after_name: str) -> tuple[str, int] | None:
    """At position, `{opening} name="NAME` and then after_name: NAME and the position past after_name."""
    head = f'{opening} name="'
    if not text.startswith(head, position):
        return None
    name_end = text.find(after_name, position + len(head), end)
    if name_end < 0:
        return None
    return text[position + len(head) : name_end], name_end + len(after_name)


def _parse_invoke(text: str, position: int, end: int) -> tuple[ToolCall, int] | None:
    opened = _named_tag(text, position, end, _INVOKE_OPEN, '">\n')
    if opened is None:
        return None
    name, position = opened
    if text.startswith("\n", position):  # no parameters: an empty line
        position += 1
    fields: list[str] = []
    seen: set[str] = set()
    while not text.startswith(_INVOKE_CLOSE, position):
        parsed = _parse_parameter(text, position, end)
        if parsed is None:
            return None
        key, value, position = parsed
        if key in seen:
            return None
        seen.add(key)
        fields.append(f"{_json(key)}: {value}")
    position += len(_INVOKE_CLOSE)
    if not text.startswith("\n", position) or position >= end:
        return None
    return ToolCall(name, "{" + ", ".join(fields) + "}"), position + 1


def _parse_parameter(text: str, position: int, end: int) -> tuple[str, str, int] | None:
    opened = _named_tag(text, position, end, _PARAM_OPEN, '" string="')
    if opened is None:
        return None
    key, position = opened
    if text.startswith('true">', position):
        is_string, position = True, position + len('true">')
    elif text.startswith('false">', position):
        is_string, position = False, position + len('false">')
    else:
        return None
    value_end = text.find(_PARAM_CLOSE, position, end)
    if value_end < 0 or not text.startswith("\n", value_end + len(_PARAM_CLOSE)):
        return None
    raw = text[position:value_end]
    if is_string:
        value = _json(raw)
    else:
        try:
            json.loads(raw)
        except ValueError:
            return None
        value = raw
    return key, value, value_end + len(_PARAM_CLOSE) + 1


def _held_back(text: str) -> int:
    """How many trailing characters might begin a call block (with the blank line before it)."""
    for size in range(min(len(text), len(BLOCK_START) - 1), 0, -1):
        if BLOCK_START.startswith(text[-size:]):
            break
    else:
        size = 0
    newlines = 0
    while newlines < len(BLOCK_SEPARATOR) and size + newlines < len(text) and text[-size - newlines - 1] == "\n":
        newlines += 1
    return size + newlines


class ToolCallParser:
    """Splits generated text into plain text and calls as it streams in. Text that might be the
    start of a call block is held back until it is known; a whole block that parses becomes
    ToolCall items (the blank line before it dropped), and anything else, an unterminated or
    malformed block included, comes out as text unchanged. Never raises on model output."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_block = False
        self._separator = ""   # the blank line taken off before the block, given back if it fails
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[str | ToolCall]:
        self._pending += text
        out: list[str | ToolCall] = []
        while self._pending:
            if self._in_block:
                close = self._pending.find(BLOCK_END)
                if close < 0:
                    break
                block, self._pending = self._pending[: close + len(BLOCK_END)], self._pending[close + len(BLOCK_END) :]
                self._in_block = False
                calls = parse_block(block)
                if calls is None:
                    out.append(self._separator + block)
                else:
                    self.calls.extend(calls)
                    out.extend(calls)
                continue
            start = self._pending.find(BLOCK_START)
            if start < 0:
                keep = _held_back(self._pending)
                out.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            before, self._pending = self._pending[:start], self._pending[start:]
            self._separator = BLOCK_SEPARATOR if before.endswith(BLOCK_SEPARATOR) else ""
            out.append(before[: len(before) - len(self._separator)])
            self._in_block = True
        return [item for item in out if item != ""]

    def finish(self) -> list[str | ToolCall]:
        """What is still held back, as text (a block the generation never closed included)."""
        rest = (self._separator if self._in_block else "") + self._pending
        self._pending, self._in_block, self._separator = "", False, ""
        return [rest] if rest else []


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole generated answer as (its text without the call block, the calls)."""
    parser = ToolCallParser()
    items = parser.feed(text) + parser.finish()
    return "".join(item for item in items if isinstance(item, str)), parser.calls
