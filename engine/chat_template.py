"""Render a model's Jinja chat template, keeping track of which text came from messages.

The template's own text (role markers, turn ends) is structure and may contain control
tokens; message contents are user data and must stay plain text even when they contain
"<|im_end|>". `render_pieces` tells the two apart by rendering contents wrapped in private-use
markers and locating them in the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ModelFormatError

# Private-use code points: they never come out of a tokenizer's own text.
_OPEN, _MID, _CLOSE = "\uf8f0", "\uf8f1", "\uf8f2"


class ChatTemplateError(ModelFormatError):
    """The template itself failed (raise_exception, bad syntax, unexpected message shape)."""


def _raise_exception(message: str, hint: str = "check the roles and order of the messages") -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {message}", hint)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        # The settings transformers uses for chat templates, so templates render as their authors tested them.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}", "the GGUF's tokenizer.chat_template is damaged") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}", "check the messages' roles and contents") from exc

    def render_pieces(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> list[tuple[bool, str]]:
        """The rendered prompt as (is_content, text) pieces in order; their concatenation is
        the rendered text. Contents are found by rendering them wrapped in markers; when the
        template edits contents so the markers do not survive intact (split, slicing), each
        content is rendered as a bare sentinel and inserted verbatim instead."""
        plain = self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and c for c in contents):
            return [(False, plain)]

        def wrapped(i: int, text: str) -> str:
            return f"{_OPEN}{i}{_MID}{text}{_CLOSE}{i}{_MID}"

        pieces = self._split(self._render_with(messages, wrapped, add_generation_prompt, kwargs), contents, wrapped_mode=True)
        if pieces is not None and "".join(t for _, t in pieces) == plain:
            return pieces
        pieces = self._split(
            self._render_with(messages, lambda i, _text: f"{_OPEN}{i}{_CLOSE}", add_generation_prompt, kwargs),
            contents,
            wrapped_mode=False,
        )
        if pieces is None:
            raise ChatTemplateError(
                "cannot tell message contents from template text in this chat template",
                "report the model; its template rewrites message contents",
            )
        return pieces

    def _render_with(self, messages: Sequence[dict[str, Any]], marker: Any, add_generation_prompt: bool, kwargs: dict[str, Any]) -> str:
        marked = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str) and content:
                message = {**message, "content": marker(i, content)}
            marked.append(message)
        return self.render(marked, add_generation_prompt=add_generation_prompt, **kwargs)

    @staticmethod
    def _split(rendered: str, contents: list[Any], *, wrapped_mode: bool) -> list[tuple[bool, str]] | None:
        pieces: list[tuple[bool, str]] = []
        position = 0
        while True:
            start = rendered.find(_OPEN, position)
            if start < 0:
                break
            if wrapped_mode:
                index_end = rendered.find(_MID, start)
                if index_end < 0:
                    return None
                index_text = rendered[start + 1 : index_end]
                close = f"{_CLOSE}{index_text}{_MID}"
                end = rendered.find(close, index_end)
                if not index_text.isdigit() or end < 0:
                    return None
                body = rendered[index_end + 1 : end]
                after = end + len(close)
            else:
                end = rendered.find(_CLOSE, start)
                index_text = rendered[start + 1 : end]
                if end < 0 or not index_text.isdigit() or int(index_text) >= len(contents):
                    return None
                body = contents[int(index_text)]
                after = end + 1
            pieces.append((False, rendered[position:start]))
            pieces.append((True, body))
            position = after
        pieces.append((False, rendered[position:]))
        if any(_OPEN in t or _CLOSE in t or (not c and _MID in t) for c, t in pieces):
            return None
        return [(c, t) for c, t in pieces if t]
