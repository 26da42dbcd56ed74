"""A scripted stand-in for `engine.load(...)`'s model, for fast CLI tests.

It has the LoadedModel interface `dsv4 ask` uses (name, context_length, tokenizer, chat)
and a real tokenizer (the tiny GGUF's), so prompts are rendered and counted for real; only
the answer is scripted. Every call is recorded so tests can check what the model was asked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.events import Done, Event, PrefillProgress, SamplingParams, TextDelta, Timings, Usage
from engine.tokenizer import Tokenizer
from tests.tinymodels import write_tiny_llama_gguf


@dataclass
class ChatCall:
    messages: list[dict[str, str]]
    params: SamplingParams
    prompt_ids: list[int]

    @property
    def user_text(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def system_text(self) -> str | None:
        return next((m["content"] for m in self.messages if m["role"] == "system"), None)


@dataclass
class FakeModel:
    tokenizer: Tokenizer
    answer: Sequence[str] = ("The answer", " is 42.")
    name: str = "fake"
    context_length: int = 4096
    finish_reason: str = "stop"
    prefill_chunk: int = 64
    interrupt_after: int | None = None        # raise KeyboardInterrupt after this many deltas
    calls: list[ChatCall] = field(default_factory=list)
    closed: int = 0                           # generators closed early (Ctrl-C path)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams, **_kwargs: Any) -> Iterator[Event]:
        prompt_ids = self.tokenizer.render_chat(messages)
        self.calls.append(ChatCall([dict(m) for m in messages], params, prompt_ids))
        return self._events(len(prompt_ids), params)

    def _events(self, prompt_tokens: int, params: SamplingParams) -> Iterator[Event]:
        try:
            for done in range(self.prefill_chunk, prompt_tokens + self.prefill_chunk, self.prefill_chunk):
                yield PrefillProgress(min(done, prompt_tokens), prompt_tokens)
            pieces = list(self.answer)[: params.max_tokens]
            for index, piece in enumerate(pieces, start=1):
                if self.interrupt_after is not None and index > self.interrupt_after:
                    raise KeyboardInterrupt
                yield TextDelta(piece, index)
            finish = "length" if len(self.answer) > params.max_tokens else self.finish_reason
            yield Done(
                finish_reason=finish,
                usage=Usage(prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=len(pieces)),
                timings=Timings(ttft_s=0.25, prefill_s=0.2, prefill_tok_s=prompt_tokens / 0.2, decode_s=0.5, decode_tok_s=len(pieces) / 0.5),
                text="".join(pieces),
            )
        except GeneratorExit:
            self.closed += 1
            raise


def tiny_tokenizer(directory: Path) -> Tokenizer:
    """The real tokenizer of a tiny GGUF written into `directory`."""
    return Tokenizer.from_gguf(write_tiny_llama_gguf(directory / "tiny-tokenizer.gguf"))
