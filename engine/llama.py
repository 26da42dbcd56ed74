"""Llama-architecture transformer (SmolLM2 and kin): math only, no I/O, no globals.

Shape key: B batch, T new tokens, L cached + new tokens, H query heads, Hkv key/value heads,
G = H / Hkv query heads per KV head, D head dim, E model dim.

Numerics: the residual stream, norms, RoPE and softmax run in fp32; the linear layers take
their inputs in the layers' compute dtype (bf16 for bf16/int8/int4 weights). All-bf16 turns
SmolLM2's answers into garbage; an fp32 residual fixes it.

Decode (one new token per sequence) runs through Llama._decode_step, the same math in half
the tensor ops (per-op dispatch, not arithmetic, is most of a CPU decode step outside the
weight matmuls); `fast_decode = False` routes it through the general path, its reference.

RoPE rotates adjacent pairs (2i, 2i+1): llama.cpp's converter permutes the rows of Q and K
for arch "llama" so that this "interleaved" form equals HF's rotate-half on the original
weights. `rope_interleaved=False` is HF's half-split form for unpermuted weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.kv_state import KVState
from engine.quant import DENSE_MIN_ROWS, QuantLinear


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    context_length: int
    rope_interleaved: bool = True


class RMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_table(head_dim: int, theta: float, length: int) -> Tensor:
    """cos/sin of every position: fp32 [length, D/2, 2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, wqkv: QuantLinear, wo: QuantLinear):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.interleaved = args.rope_interleaved
        self.wqkv = wqkv  # Q, K and V rows stacked: one matmul instead of three
        self.wo = wo

    def forward(self, h: Tensor, B: int, T: int, rope: Tensor, k_cache: Tensor, v_cache: Tensor, start: int) -> Tensor:
        """h [B*T, E] (normed); rope [T, H + Hkv, D/2] complex (query rows pre-scaled by
        1/sqrt(D)); caches: keys [B, Hkv, D, max_len], values [B, Hkv, max_len, D], written
        at start..start+T. Returns [B*T, E]."""
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # Submodules are called through .forward and caches sliced with narrow: per decoded
        # token this runs ~600 times, and nn.Module.__call__ and indexing cost microseconds each.
        qkv = self.wqkv.forward(h)
        qk = _apply_rope(qkv[:, : (H + Hkv) * D].float().view(B, T, H + Hkv, D), rope, self.interleaved)
        qk_cached = qk.to(k_cache.dtype)
        end = start + T
        k_cache.narrow(3, start, T).copy_(qk_cached[:, :, H:].permute(0, 2, 3, 1))
        v_cache.narrow(2, start, T).copy_(qkv[:, (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2))
        if T == 1:
            out = _decode_attention(qk_cached[:, :, :H].transpose(1, 2), k_cache.narrow(3, 0, end), v_cache.narrow(2, 0, end))
        else:
            # Inputs rounded as the cache holds them, so prefill and decode see the same q, k, v.
            q = qk_cached[:, :, :H].transpose(1, 2)  # [B, H, T, D]
            k = k_cache[..., :end].transpose(-1, -2).contiguous()  # the flash kernel wants unit-stride rows
            v = v_cache[:, :, :end]
            if not start:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
            else:
                # A chunk after cached tokens: query i sits at position start + i and sees keys
                # 0..start + i. SDPA's bf16 kernel is 2x slower with a mask than fp32 is.
                mask = torch.arange(end).unsqueeze(0) <= (torch.arange(T) + start).unsqueeze(1)
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=1.0, enable_gqa=True).to(q.dtype)
        return self.wo.forward(out.transpose(1, 2).reshape(B * T, H * D))


def _apply_rope(x: Tensor, rope: Tensor, interleaved: bool) -> Tensor:
    """x fp32 [B, T, heads, D]; rope complex [T, heads, D/2]."""
    B, T, heads, D = x.shape
    if interleaved:
        xc = torch.view_as_complex(x.view(B, T, heads, D // 2, 2))
        return torch.view_as_real(xc * rope).view(B, T, heads, D)
    half = torch.view_as_complex(torch.stack([x[..., : D // 2], x[..., D // 2 :]], dim=-1).contiguous())
    r = torch.view_as_real(half * rope)
    return torch.cat([r[..., 0], r[..., 1]], dim=-1)


def _decode_attention(q: Tensor, k_t: Tensor, v: Tensor) -> Tensor:
    """One query per sequence, by hand: SDPA's bf16 path costs ~10x more at T = 1.
    q [B, H, 1, D] (pre-scaled), k_t [B, Hkv, D, L], v [B, Hkv, L, D] (cache slices)
    -> [B, H, 1, D]. bmm over [B * Hkv] views: the cache's heads are evenly strided, so
    nothing is copied (a 4-D matmul copies K and V on every step)."""
    B, H, _, D = q.shape
    Hkv, L = v.shape[1], v.shape[2]
    keys_t = k_t.reshape(B * Hkv, D, L)
    values = v.reshape(B * Hkv, L, D)
    scores = torch.bmm(q.reshape(B * Hkv, H // Hkv, D), keys_t)  # [B*Hkv, G, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(probs, values).view(B, H, 1, D)


class FeedForward(nn.Module):
    def __init__(self, w_gate_up: QuantLinear, w_down: QuantLinear):
        super().__init__()
        self.w_gate_up = w_gate_up  # gate rows then up rows: one matmul
        self.w_down = w_down
        self.hidden = w_down.in_features

    def forward(self, h: Tensor) -> Tensor:
        # The gate product in fp32: one bf16 rounding (into w_down) instead of three.
        gu = self.w_gate_up.forward(h).float()
        gate, up = gu[:, : self.hidden], gu[:, self.hidden :]
        return self.w_down.forward(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: FeedForward):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, x: Tensor, B: int, T: int, rope: Tensor, k_cache: Tensor, v_cache: Tensor, start: int) -> Tensor:
        """x [B*T, E] fp32 residual stream, updated in place."""
        x += self.attn.forward(self.attn_norm.forward(x), B, T, rope, k_cache, v_cache, start)
        x += self.ffn.forward(self.ffn_norm.forward(x))
        return x


DECODE_WINDOW_STEP = 64


@dataclass(frozen=True)
class _DecodeLayer:
    """One block's weights as the decode step uses them: bare kernels, norm weights
    pre-scaled by sqrt(E) (see _StepNorm)."""

    attn_norm: Tensor
    wqkv: Callable[[Tensor], Tensor]
    wo: Callable[[Tensor], Tensor]
    ffn_norm: Tensor
    w_gate_up: Callable[[Tensor], Tensor]
    w_down: Callable[[Tensor], Tensor]


class _StepNorm:
    """RMSNorm for _decode_step: x [B, E] fp32 -> a reused [B, E] buffer in the layers'
    dtype, in four ops where F.rms_norm takes seven plus a cast. Computes
    x * rsqrt(sum(x^2) + E eps) * (w sqrt(E)), which is x * rsqrt(mean(x^2) + eps) * w,
    with weights pre-scaled by sqrt(E) (_DecodeLayer)."""

    def __init__(self, batch: int, dim: int, eps: float, dtype: torch.dtype):
        self.eps_e = torch.tensor(eps * dim)  # a Python float would cost a conversion per call
        self.sum_sq = torch.empty(batch)
        self.sum_sq_column = self.sum_sq.view(batch, 1)
        self.scaled = torch.empty(batch, dim)
        self.out = torch.empty(batch, dim, dtype=dtype)

    def __call__(self, x: Tensor, weight_sqrt_e: Tensor) -> Tensor:
        torch.linalg.vecdot(x, x, out=self.sum_sq).add_(self.eps_e).rsqrt_()
        torch.mul(x, self.sum_sq_column, out=self.scaled)
        return torch.mul(self.scaled, weight_sqrt_e, out=self.out)


class Llama(nn.Module):
    def __init__(
        self,
        args: LlamaArgs,
        embedding: QuantLinear,
        blocks: list[Block],
        norm: RMSNorm,
        head: QuantLinear,
        head_rows: QuantLinear | None = None,
        head_few_rows: QuantLinear | None = None,
    ):
        """`head` computes all logits; when it is not fp32, `head_rows` (default: head)
        supplies exact fp32 rows to recompute the top candidates (see _refine_top). The
        tied SmolLM2 head is a coarse one-level int8 pass sharing storage with the exact
        two-level int8 embedding. `head_few_rows`, when given, replaces `head` for fewer
        than DENSE_MIN_ROWS positions (decode): a coarser, smaller pass whose top candidates
        are recomputed the same way."""
        super().__init__()
        self.args = args
        self.head_few_rows = head_few_rows
        # The one-token step (_decode_step); False runs decode through the general path,
        # which tests use as its reference.
        self.fast_decode = args.rope_interleaved
        self._decode_layers: list[_DecodeLayer] | None = None
        self.embedding = embedding  # rows(ids) gives the input vectors
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.head_rows = head_rows if head_rows is not None else head
        table = rope_table(args.head_dim, args.rope_theta, args.context_length)
        self.register_buffer("rope", torch.view_as_complex(table), persistent=False)  # [ctx, D/2]
        head_scale = torch.ones(args.n_heads + args.n_kv_heads)
        head_scale[: args.n_heads] = 1.0 / math.sqrt(args.head_dim)  # softmax scale folded into Q's rotation
        self.register_buffer("head_scale", head_scale.view(1, -1, 1), persistent=False)

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.blocks[0].attn.wqkv.compute_dtype

    def new_state(self, batch: int = 1, max_len: int | None = None) -> KVState:
        a = self.args
        return KVState(a.n_layers, a.n_kv_heads, a.head_dim, max_len or a.context_length, self.cache_dtype, batch)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, state: KVState, output: str = "all") -> Tensor | None:
        """tokens [B, T] appended after state.length cached tokens -> fp32 logits [B, T, V];
        output="last": [B, 1, V] for the last position only; "none": no head at all (a
        prefill chunk whose logits nobody reads). Advances state.length."""
        B, T = tokens.shape
        start = state.length
        if start + T > state.max_len:
            raise ValueError(f"{start + T} tokens exceed the state's {state.max_len}")
        if T == 1 and self.fast_decode:
            x = self._decode_step(tokens, state)
        else:
            rope = self.rope[start : start + T].unsqueeze(1) * self.head_scale  # [T, H + Hkv, D/2]
            # Activations stay 2-D [B*T, E]: the quantised kernels take them without reshapes.
            x = self.embedding.rows(tokens.reshape(-1))
            k_caches, v_caches = state.k.unbind(0), state.v.unbind(0)  # one call, not 2 per layer
            for block, k_cache, v_cache in zip(self.blocks, k_caches, v_caches):
                x = block.forward(x, B, T, rope, k_cache, v_cache, start)
        if output == "none":
            state.length = start + T
            return None
        x = x.view(B, T, -1)
        if output == "last":
            x = x[:, -1:]
        h = self.norm.forward(x)
        head = self.head_few_rows if self.head_few_rows is not None and x.shape[0] * x.shape[1] < DENSE_MIN_ROWS else self.head
        logits = head.forward(h).float()
        if head.compute_dtype != torch.float32:
            logits = self._refine_top(logits, h)
        state.length = start + T
        return logits

    def _decode_step(self, tokens: Tensor, state: KVState) -> Tensor:
        """The blocks for one new token per sequence (tokens [B, 1]) -> residual [B, E].

        The general path's math with ~25 tensor ops per layer instead of ~50: on a CPU the
        per-op dispatch cost, not the arithmetic, is most of a decode step outside the
        weight matmuls. Scratch buffers and cache views are made once per step and reused
        by every layer; q, k and v pass through one fp32 copy that RoPE rotates in place
        and that the cache writes read from. Rounding matches the general path except in
        the norms (fp32 summation order)."""
        a = self.args
        H, Hkv, D, E, Fh = a.n_heads, a.n_kv_heads, a.head_dim, a.dim, a.ffn_dim
        G = H // Hkv
        B = tokens.shape[0]
        start, end = state.length, state.length + 1
        # Attend over a window of positions rounded up to DECODE_WINDOW_STEP: oneDNN builds a
        # new matmul kernel for every new shape (~0.7 ms each, two per token when the length
        # grows by one); padded scores are set to -inf, so padded values get zero weight.
        window = min(state.max_len, -(-end // DECODE_WINDOW_STEP) * DECODE_WINDOW_STEP)
        clean_from = max(end, state.values_clean)
        if window > clean_from:
            state.v.narrow(3, clean_from, window - clean_from).zero_()
        state.values_clean = max(state.values_clean, window)
        layers = self._decode_plan()
        dtype = self.cache_dtype

        x = self.embedding.rows(tokens.reshape(-1))  # [B, E] fp32
        rope = self.rope[start] * self.head_scale.view(-1, 1)  # [H + Hkv, D/2]
        norm = _StepNorm(B, E, a.norm_eps, dtype)
        qkv32 = torch.empty(B, H + 2 * Hkv, D // 2, 2)
        qkv32_flat = qkv32.view(B, -1)
        qk_complex = torch.view_as_complex(qkv32)[:, : H + Hkv]
        q_rotated, k_rotated, v_new = qkv32[:, :H].view(B, H, D), qkv32[:, H : H + Hkv].view(B, Hkv, D), qkv32[:, H + Hkv :].view(B, Hkv, D)
        q = torch.empty(B * Hkv, G, D, dtype=dtype)  # query heads grouped by the KV head they read
        q_heads = q.view(B, H, D)
        scores = torch.empty(B * Hkv, G, window, dtype=dtype)
        padding = scores.narrow(2, end, window - end)
        attended = torch.empty(B * Hkv, G, D, dtype=dtype)
        attended_rows = attended.view(B, H * D)
        gate_up = torch.empty(B, 2 * Fh)
        gate, up = gate_up[:, :Fh], gate_up[:, Fh:]
        hidden = torch.empty(B, Fh, dtype=dtype)
        # Per layer: the slot this token's key/value goes to, and the cached positions 0..end.
        k_slots, v_slots = state.k.select(4, start).unbind(0), state.v.select(3, start).unbind(0)
        n_layers = a.n_layers
        k_seen = state.k.narrow(4, 0, window).view(n_layers, B * Hkv, D, window).unbind(0)
        v_seen = state.v.narrow(3, 0, window).view(n_layers, B * Hkv, window, D).unbind(0)
        padded = window > end

        for layer, k_slot, v_slot, keys_t, values in zip(layers, k_slots, v_slots, k_seen, v_seen):
            qkv32_flat.copy_(layer.wqkv(norm(x, layer.attn_norm)))
            torch.mul(qk_complex, rope, out=qk_complex)
            q_heads.copy_(q_rotated)
            k_slot.copy_(k_rotated)
            v_slot.copy_(v_new)
            torch.bmm(q, keys_t, out=scores)
            if padded:
                padding.fill_(-math.inf)
            # bf16 in and out, fp32 inside: equal to the general path's fp32 softmax and cast.
            torch.bmm(torch.softmax(scores, dim=-1), values, out=attended)
            x.add_(layer.wo(attended_rows))
            gate_up.copy_(layer.w_gate_up(norm(x, layer.ffn_norm)))
            F.silu(gate, inplace=True)  # in fp32, as FeedForward does
            x.add_(layer.w_down(torch.mul(gate, up, out=hidden)))
        return x

    def _decode_plan(self) -> list[_DecodeLayer]:
        """The blocks' weights as _decode_step reads them (built once: weights never change
        after loading)."""
        if self._decode_layers is None:
            root_e = math.sqrt(self.args.dim)
            self._decode_layers = [
                _DecodeLayer(
                    attn_norm=b.attn_norm.weight * root_e,
                    wqkv=b.attn.wqkv.few_rows(),
                    wo=b.attn.wo.few_rows(),
                    ffn_norm=b.ffn_norm.weight * root_e,
                    w_gate_up=b.ffn.w_gate_up.few_rows(),
                    w_down=b.ffn.w_down.few_rows(),
                )
                for b in self.blocks
            ]
        return self._decode_layers

    def _refine_top(self, logits: Tensor, h: Tensor, k: int = 32) -> Tensor:
        """Recompute the `k` highest logits of each position in fp32. A bf16 head rounds
        logits of ~20 to within ~0.05, enough to flip near-ties of the argmax (1.4 points of
        agreement with llama.cpp); the candidates that sampling can pick get exact values."""
        k = min(k, logits.shape[-1])
        idx = logits.topk(k, dim=-1).indices  # [B, T, k]
        rows = self.head_rows.rows(idx)  # [B, T, k, E] fp32
        exact = torch.matmul(rows, h.unsqueeze(-1)).squeeze(-1)
        return logits.scatter_(-1, idx, exact)
