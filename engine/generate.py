"""The one streaming primitive: prompt ids in, events out.

    PrefillProgress* -> TextDelta* -> Done

Chunked prefill (progress after each chunk), then one token per step until an end-of-turn
id, a stop string, max_tokens, a full context, or cancellation. Text goes through the
streaming detokenizer (never half a character) and is held back while it could still be
the start of a stop string. The KV state only ever holds complete tokens: the model raises
its length after a whole forward pass, so Ctrl-C (KeyboardInterrupt) anywhere leaves a
state that is valid for its length.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Protocol

import torch

from engine.detokenizer import StreamingDetokenizer
from engine.errors import ContextOverflow
from engine.events import Done, Event, PrefillProgress, SamplingParams, TextDelta, Timings, Usage
from engine.sampling import Sampler

REPETITION_WINDOW = 64  # the penalty looks at the last 64 tokens (llama.cpp's default), not the whole pack


class State(Protocol):
    """Per-sequence model state: engine.kv_state.KVState (mini) or DSV4State (DeepSeek-V4).
    `trim(n)` forgets the last n tokens; DeepSeek-V4 can only do n = 0."""

    @property
    def length(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    def trim(self, n: int) -> Any: ...


class Model(Protocol):
    """engine.llama.Llama and engine.deepseek_v4.model.Transformer: one calling convention."""

    args: Any  # .context_length

    def new_state(self, batch: int = 1, max_len: int | None = None) -> Any: ...

    def __call__(self, tokens: torch.Tensor, state: Any, output: str = "all") -> Any: ...


class _Tokenizer(Protocol):
    stop_ids: frozenset[int]

    def id_to_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


def stream(
    model: Model,
    tokenizer: _Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    state: State | None = None,
    cached_tokens: int = 0,
    prefill_chunk: int = 512,
    cancel: Callable[[], bool] | None = None,
    model_name: str = "the model",
    generated_ids: list[int] | None = None,
) -> Iterator[Event]:
    """`generated_ids`, when given, receives each generated token id (end-of-turn ids
    excluded): with the prompt it names what `state` holds afterwards, so a caller can
    keep the state and extend it (`dsv4 chat`'s next turn)."""
    started = time.perf_counter()
    n_prompt = len(prompt_ids)
    context = model.args.context_length
    if n_prompt == 0:
        raise ValueError("empty prompt")
    if n_prompt >= context:
        raise ContextOverflow(
            f"the prompt is {n_prompt:,} tokens; {model_name} holds {context:,} (prompt and answer together)",
            "ask about fewer or smaller files, or pack with a token budget",
        )
    if prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1")
    if state is None:
        state = model.new_state()
        cached_tokens = 0
    if cached_tokens > state.length:
        raise ValueError(f"cached_tokens={cached_tokens} but the state holds only {state.length} tokens")
    # The last prompt token is always recomputed: its logits choose the first answer token.
    cached = min(cached_tokens, n_prompt - 1)
    state.trim(state.length - cached)
    cancelled = (lambda: False) if cancel is None else cancel

    def done(reason: str, text: str, n_generated: int, first_token_at: float | None, prefill_s: float) -> Done:
        now = time.perf_counter()
        decode_s = now - first_token_at if first_token_at is not None else 0.0
        computed = n_prompt - cached
        return Done(
            finish_reason=reason,
            usage=Usage(prompt_tokens=n_prompt, cached_tokens=cached, completion_tokens=n_generated),
            timings=Timings(
                ttft_s=(first_token_at - started) if first_token_at is not None else now - started,
                prefill_s=prefill_s,
                prefill_tok_s=computed / prefill_s if prefill_s > 0 else 0.0,
                decode_s=decode_s,
                decode_tok_s=(n_generated - 1) / decode_s if n_generated > 1 and decode_s > 0 else 0.0,
            ),
            text=text,
        )

    # ---- prefill ---------------------------------------------------------------------------
    prefill_started = time.perf_counter()
    yield PrefillProgress(done=cached, total=n_prompt)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    logits = None
    for lo in range(cached, n_prompt, prefill_chunk):
        if cancelled():
            yield done("cancelled", "", 0, None, time.perf_counter() - prefill_started)
            return
        hi = min(n_prompt, lo + prefill_chunk)
        logits = model(ids[:, lo:hi], state, output="last" if hi == n_prompt else "none")
        yield PrefillProgress(done=hi, total=n_prompt)
    prefill_s = time.perf_counter() - prefill_started
    assert logits is not None

    # ---- decode ----------------------------------------------------------------------------
    sampler = Sampler(params)
    detok = StreamingDetokenizer(tokenizer, skip_special=True)
    stops = StopStrings(params.stop)
    stop_ids = tokenizer.stop_ids
    history = list(prompt_ids[-REPETITION_WINDOW:])
    step = torch.empty((1, 1), dtype=torch.long)
    n_generated = 0
    first_token_at: float | None = None
    reason = "length"
    while params.max_tokens > 0:
        # The sampler runs on the CPU: a CUDA model's last row comes over (one row per token).
        token = sampler(logits[0, -1].cpu(), torch.tensor(history[-REPETITION_WINDOW:]) if params.repetition_penalty != 1.0 else None)
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if token in stop_ids:
            reason = "stop"
            break
        n_generated += 1
        history.append(token)
        if generated_ids is not None:
            generated_ids.append(token)
        safe, hit = stops.feed(detok.add(token))
        if safe:
            yield TextDelta(safe, n_generated)
        if hit:
            reason = "stop"
            break
        if n_generated >= params.max_tokens or state.length >= state.max_len:
            break
        if cancelled():
            reason = "cancelled"
            break
        step[0, 0] = token
        logits = model(step, state, output="last")
    if reason != "stop" or not stops.matched:
        tail, _ = stops.feed(detok.flush(), final=True)
        if tail:
            yield TextDelta(tail, n_generated)
    yield done(reason, stops.emitted, n_generated, first_token_at, prefill_s)


class StopStrings:
    """Finds stop strings across token boundaries. `feed` returns the text that is safe to
    show (no stop string can start in it) and whether a stop string has been completed;
    the text before the stop string is released, the stop string itself never."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.emitted = ""
        self.matched = False

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if self.matched:
            return "", True
        held = self.held + text
        first = min(((i, s) for s in self.stops if (i := held.find(s)) >= 0), default=None)
        if first is not None:
            safe, self.held, self.matched = held[: first[0]], "", True
        elif final:
            safe, self.held = held, ""
        else:
            keep = self._prefix_overhang(held)
            safe, self.held = held[: len(held) - keep], held[len(held) - keep :]
        self.emitted += safe
        return safe, self.matched

    def _prefix_overhang(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
