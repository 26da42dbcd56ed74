"""What generation yields: one frozen dataclass per event, in this order:

    PrefillProgress* -> (TextDelta)* -> Done

The CLI, the server and tests consume the same stream; full-text output is a wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.0   # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings, besides the model's end-of-turn tokens


@dataclass(frozen=True)
class PrefillProgress:
    done: int                          # prompt tokens processed so far (cached ones included)
    total: int                         # prompt tokens in all


@dataclass(frozen=True)
class TextDelta:
    text: str                          # never splits a character
    completion_tokens: int             # tokens generated so far


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    ttft_s: float                      # request start -> first generated token
    prefill_s: float
    prefill_tok_s: float               # prompt tokens actually computed / prefill_s
    decode_s: float
    decode_tok_s: float


@dataclass(frozen=True)
class Done:
    finish_reason: str                 # "stop" (EOS or stop string) | "length" | "cancelled"
    usage: Usage
    timings: Timings
    text: str = ""                     # the whole completion
    extra: dict = field(default_factory=dict)   # e.g. cache report


Event = PrefillProgress | TextDelta | Done
