"""Next-token choice from fp32 logits: repetition penalty, temperature, top-k, top-p.

Greedy when temperature is 0. Sampling draws from a per-request torch.Generator, so a seed
reproduces a completion exactly and concurrent requests do not share random state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.events import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams):
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0 or params.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling parameters: {params}")
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

    def __call__(self, logits: Tensor, history: Tensor | None = None) -> int:
        """logits [V] fp32 (not modified); history: ids seen so far (for the penalty)."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(filter_logits(logits / p.temperature, p.top_k, p.top_p), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL's rule: a seen token's positive logit is divided by the penalty, a negative one
    multiplied, so the penalty always lowers it."""
    seen = torch.unique(history)
    values = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set everything outside the top-k and the top-p nucleus to -inf. The nucleus keeps the
    smallest set of likeliest tokens whose probability reaches top_p (always at least one)."""
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[0] = False
        out[order[drop]] = float("-inf")
    return out
