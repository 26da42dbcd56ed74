"""DeepSeek-V4 hybrid attention: sliding window + compressed KV (CSA / HCA), math only.

Dimension key: B batch, T query tokens of this call, H heads, D head_dim (512 real),
R rope dims (trailing), N compressed entries, K keys a query attends to, C index heads,
I index_head_dim, m compress ratio, W window.

One code path for every layer kind (spec §2): queries attend with a single softmax, plus
a per-head sink in the denominator, to [window entries ++ chosen compressed entries]:
- window-only (ratio 0): the last W tokens, the current one included;
- HCA (ratio != 4): the window plus every visible compressed entry;
- CSA (ratio 4): the window plus the indexer's top-k visible entries.

Every call processes tokens [start_pos, start_pos+T) against a `LayerState`, so a one-shot
prefill, any chunking, and token-by-token decode run the same code. `attn_impl="dense"` is
the reference path: dense masked attention over the window and every visible compressed
entry (no indexer); it equals the sparse path whenever top-k covers all visible entries.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.deepseek_v4.config import CSA, CSA_RATIO, WINDOW, ModelArgs, yarn_correction_range
from engine.deepseek_v4.parallel import Parallel
from engine.deepseek_v4.state import CompressorState, LayerState
from engine.fp8 import DenseLinear, fp4_round, fp8_round, hadamard, make_linear

# The reference rounds the non-RoPE dims of KV entries to FP8 in blocks of 64.
KV_FP8_BLOCK = 64
# Largest temporary (in values) the gathered attention and the indexer build at once;
# longer query chunks are split into blocks of queries.
SCRATCH_ELEMENTS = 1 << 26


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, in fp32; w stays in its checkpoint dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def rms_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (the per-head q norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


# ---------- RoPE ----------


def rope_inv_freq(args: ModelArgs, compressed: bool) -> torch.Tensor:
    """Rotary frequencies [R/2]: theta 10000 on window-only layers, compress_rope_theta
    with YaRN on compressed ones (spec §2)."""
    dim = args.qk_rope_head_dim
    base = args.compress_rope_theta if compressed else args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ramp = yarn_correction_range(args) if compressed else None
    if ramp is not None:
        low, high = ramp
        factor = args.yarn[0]
        if low == high:
            high += 0.001
        smooth = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_table(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Complex rotations [len(positions), R/2] (fp32 angles, as the reference)."""
    angles = torch.outer(positions.to(torch.float32), inv_freq.to(positions.device))
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*rot.shape[-1] dims of x [..., T, (heads,) dims] pairwise
    (interleaved pairs 2i, 2i+1). rot is [T, R/2]; `inverse` rotates back."""
    r = 2 * rot.shape[-1]
    head, tail = x[..., :-r], x[..., -r:]
    if x.dim() == 4:  # [B, T, H, *]
        rot = rot[:, None, :]
    if inverse:
        rot = rot.conj()
    z = torch.view_as_complex(tail.float().unflatten(-1, (-1, 2)).contiguous())
    rotated = torch.view_as_real(z * rot).flatten(-2).to(x.dtype)
    return torch.cat((head, rotated), dim=-1)


# ---------- attention cores ----------


def dense_attention(
    q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference core. q [B,T,H,D], keys [B,N,D] (also the values), mask [B|1,T,N] bool.

    o = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sink_h}); a row with no key returns 0.
    """
    scores = torch.einsum("bthd,bnd->bthn", q.float(), keys.float()) * scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    sink_col = sink.float().view(1, 1, -1, 1).expand(*scores.shape[:3], 1)
    probs = torch.cat((scores, sink_col), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bthn,bnd->bthd", probs, keys.float()).to(q.dtype)


def sparse_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    max_elements: int = SCRATCH_ELEMENTS,
) -> torch.Tensor:
    """Gathered core, the reference kernel's layout. idx [B,T,K] indexes keys [B,N,D]; -1 = none.

    Queries run in blocks so the gathered keys stay under `max_elements` values.
    """
    B, T, H, D = q.shape
    step = max(1, max_elements // max(1, B * idx.shape[-1] * max(D, H)))
    if T > step:
        return torch.cat(
            [sparse_attention(q[:, t : t + step], keys, idx[:, t : t + step], sink, scale, max_elements)
             for t in range(0, T, step)],
            dim=1,
        )
    valid = idx >= 0
    b = torch.arange(B, device=keys.device)[:, None, None]
    picked = keys[b, idx.clamp_min(0)].float()  # [B, T, K, D]
    scores = torch.einsum("bthd,btkd->bthk", q.float(), picked) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink_col = sink.float().view(1, 1, -1, 1).expand(*scores.shape[:3], 1)
    probs = torch.cat((scores, sink_col), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bthk,btkd->bthd", probs, picked).to(q.dtype)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B,T,N] -> indices [B,T,K] of the true entries in ascending order, -1 padded."""
    n = mask.shape[-1]
    k = int(mask.sum(-1).max().item()) if mask.numel() else 0
    order = torch.where(mask, torch.arange(n, device=mask.device), n + torch.arange(n, device=mask.device))
    idx = order.sort(dim=-1).values[..., :k]
    return torch.where(idx < n, idx, torch.full_like(idx, -1))


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index.

    The reference uses torch.topk, whose order among exactly equal scores (ReLU zeros) is
    unspecified; a stable order makes the picks independent of how the context was chunked.
    """
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


# ---------- compressor and indexer ----------


class Compressor(nn.Module):
    """Gated softmax pooling of every m tokens into one entry [D] (spec §2).

    ratio 4 overlaps: entry w pools the first D channels of window w-1 with the last D
    channels of window w (2m slots). Entry w is RoPE'd at position w*m and becomes visible
    to query t when (w+1)*m - 1 <= t.
    """

    def __init__(self, args: ModelArgs, ratio: int, dim: int, rotate: bool, simulate: bool):
        super().__init__()
        self.ratio, self.dim, self.rotate, self.simulate = ratio, dim, rotate, simulate
        self.overlap = ratio == CSA_RATIO
        coff = 2 if self.overlap else 1
        self.rope_dim = args.qk_rope_head_dim
        self.wkv = DenseLinear(args.hidden_size, coff * dim)
        self.wgate = DenseLinear(args.hidden_size, coff * dim)
        self.register_buffer("ape", torch.zeros(ratio, coff * dim, dtype=torch.float32))
        self.norm = RMSNorm(dim, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, st: CompressorState, inv_freq: torch.Tensor) -> None:
        """Feed x [B,T,d] at positions start_pos...; append each completed window's entry to st."""
        m, d = self.ratio, self.dim
        xf = x.float()
        kv = torch.cat((st.pending_kv, self.wkv(xf)), dim=1)
        score = torch.cat((st.pending_score, self.wgate(xf)), dim=1)
        first_window = (start_pos - st.pending_kv.shape[1]) // m
        n_full = kv.shape[1] // m
        cut = n_full * m
        # copies, so the state never pins this call's whole projection
        st.pending_kv, st.pending_score = kv[:, cut:].clone(), score[:, cut:].clone()
        if n_full == 0:
            return
        kv = kv[:, :cut].unflatten(1, (n_full, m))  # [B, n, m, coff*D]
        score = score[:, :cut].unflatten(1, (n_full, m)) + self.ape
        if self.overlap:
            prev_kv = torch.cat((st.prev_kv[:, None], kv[:, :-1]), dim=1)
            prev_score = torch.cat((st.prev_score[:, None], score[:, :-1]), dim=1)
            st.prev_kv, st.prev_score = kv[:, -1].clone(), score[:, -1].clone()
            kv = torch.cat((prev_kv[..., :d], kv[..., d:]), dim=2)  # [B, n, 2m, D]
            score = torch.cat((prev_score[..., :d], score[..., d:]), dim=2)
        entries = (kv * score.softmax(dim=2)).sum(dim=2)
        entries = self.norm(entries)
        positions = (first_window + torch.arange(n_full, device=x.device)) * m
        entries = apply_rope(entries, rope_table(inv_freq, positions))
        if self.simulate:
            if self.rotate:
                entries = fp4_round(hadamard(entries))
            else:
                entries = round_kv_nope(entries, self.rope_dim)
        st.append(entries)


def round_kv_nope(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 simulation of a KV entry: non-RoPE dims rounded, RoPE dims kept (spec §2)."""
    return torch.cat((fp8_round(kv[..., :-rope_dim], KV_FP8_BLOCK), kv[..., -rope_dim:]), dim=-1)


class Indexer(nn.Module):
    """Lightning indexer: scores compressed entries per query and keeps the top-k (CSA)."""

    def __init__(self, args: ModelArgs, simulate: bool, parallel: Parallel):
        super().__init__()
        parallel.check_split(args.index_n_heads, "index heads")
        self.parallel = parallel
        self.n_heads, self.head_dim = parallel.local(args.index_n_heads), args.index_head_dim
        self.topk, self.simulate = args.index_topk, simulate
        self.weight_scale = args.index_weight_scale
        self.wq_b = make_linear(
            args.q_lora_rank, self.n_heads * self.head_dim, args.weight_format,
            block=args.weight_block_size, simulate=simulate,
        )
        self.weights_proj = DenseLinear(args.hidden_size, self.n_heads)
        self.compressor = Compressor(args, CSA_RATIO, self.head_dim, rotate=True, simulate=simulate)

    def forward(
        self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, st: CompressorState, inv_freq: torch.Tensor
    ) -> torch.Tensor:
        """Top-k entry indices [B,T,k] per query, -1 where fewer entries are visible."""
        T = x.shape[1]
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, rope_table(inv_freq, positions))
        if self.simulate:
            q = fp4_round(hadamard(q))
        self.compressor(x, start_pos, st, inv_freq)
        keys = st.entries.float()
        weights = self.weights_proj(x).float() * self.weight_scale  # [B, T, C]
        step = max(1, SCRATCH_ELEMENTS // max(1, x.shape[0] * self.n_heads * keys.shape[1]))
        scores = torch.cat(
            [
                (torch.einsum("btcd,bnd->btcn", q[:, t : t + step].float(), keys).relu()
                 * weights[:, t : t + step, :, None]).sum(dim=2)
                for t in range(0, T, step)
            ],
            dim=1,
        )  # [B, T, N]: sum_c w[t,c] * relu(q[t,c] . k[n])
        self.parallel.all_reduce(scores)  # over all index heads, before anyone picks
        visible = compressed_visibility(positions, keys.shape[1], CSA_RATIO)
        scores = scores.masked_fill(~visible, float("-inf"))
        k = min(self.topk, keys.shape[1])
        idx = topk_stable(scores, k)
        return torch.where(visible.expand_as(scores).gather(-1, idx), idx, torch.full_like(idx, -1))


def compressed_visibility(positions: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """[1, T, N]: query at position t sees entry w iff w < (t+1)//m."""
    w = torch.arange(n_entries, device=positions.device)
    return (w[None, :] < ((positions + 1) // ratio)[:, None])[None]


def window_visibility(positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """[1, T, Nw]: query t sees window key s iff t-W < s <= t."""
    diff = positions[:, None] - key_positions[None, :]
    return ((diff >= 0) & (diff < window))[None]


# ---------- the attention layer ----------


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, simulate: bool, parallel: Parallel = Parallel()):
        super().__init__()
        parallel.check_split(args.num_attention_heads, "attention heads")
        parallel.check_split(args.o_groups, "output groups")
        self.args, self.simulate, self.parallel = args, simulate, parallel
        self.kind = args.layer_kind(layer_id)
        self.ratio = args.compress_ratios[layer_id]
        # This rank's heads and output groups (all of them for one rank).
        self.n_heads = parallel.local(args.num_attention_heads)
        self.head_dim, self.rope_dim = args.head_dim, args.qk_rope_head_dim
        self.window, self.eps, self.scale = args.sliding_window, args.rms_norm_eps, args.softmax_scale
        self.groups, self.o_rank = parallel.local(args.o_groups), args.o_lora_rank
        fmt, block = args.weight_format, args.weight_block_size

        def linear(i: int, o: int) -> nn.Module:
            return make_linear(i, o, fmt, block=block, simulate=simulate)

        self.wq_a = linear(args.hidden_size, args.q_lora_rank)
        self.q_norm = RMSNorm(args.q_lora_rank, self.eps)
        self.wq_b = linear(args.q_lora_rank, self.n_heads * self.head_dim)
        self.wkv = linear(args.hidden_size, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, self.eps)
        # wo_a is used through its dequantised weight in an einsum, never with FP8 inputs
        # (the reference converts it to bf16 at load time).
        self.wo_a = make_linear(self.n_heads * self.head_dim // self.groups, self.groups * self.o_rank, fmt, block=block)
        self.wo_b = linear(self.groups * self.o_rank, args.hidden_size)
        self.register_buffer("attn_sink", torch.zeros(self.n_heads, dtype=torch.float32))
        if self.kind != WINDOW:
            self.compressor = Compressor(args, self.ratio, self.head_dim, rotate=False, simulate=simulate)
        if self.kind == CSA:
            self.indexer = Indexer(args, simulate, parallel)

    def forward(
        self, x: torch.Tensor, start_pos: int, st: LayerState, attn_impl: str = "sparse"
    ) -> torch.Tensor:
        """x [B,T,d] (normed) for positions start_pos..start_pos+T-1 -> [B,T,d]; updates st."""
        B, T, _ = x.shape
        W, R = self.window, self.rope_dim
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        inv_freq = rope_inv_freq(self.args, compressed=self.kind != WINDOW).to(x.device)
        rot = rope_table(inv_freq, positions)

        qr = self.q_norm(self.wq_a(x))
        q = rms_unit(self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = apply_rope(q, rot)
        kv = apply_rope(self.kv_norm(self.wkv(x)), rot)
        if self.simulate:
            kv = round_kv_nope(kv, R)

        # Window keys: up to W-1 earlier tokens from the ring buffer, then this call's tokens.
        n_prev = min(start_pos, W - 1)
        first = start_pos - n_prev  # position of keys[:, 0]
        prev_pos = torch.arange(first, start_pos, device=x.device)
        keys = torch.cat((st.window[:, prev_pos % W].to(kv.dtype), kv), dim=1)
        tail = positions[-W:]
        st.window[:, tail % W] = kv[:, -tail.shape[0] :].to(st.window.dtype)

        entries = None
        if self.kind != WINDOW:
            self.compressor(x, start_pos, st.compressor, inv_freq)
            entries = st.compressor.entries.to(kv.dtype)
            if self.kind == CSA and attn_impl == "dense":
                # The reference path attends to every visible entry; the indexer's keys
                # still have to follow the context.
                self.indexer.compressor(x, start_pos, st.indexer, inv_freq)

        if attn_impl == "dense":
            mask = window_visibility(positions, torch.arange(first, start_pos + T, device=x.device), W)
            if entries is not None:
                mask = torch.cat((mask, compressed_visibility(positions, entries.shape[1], self.ratio)), dim=-1)
                keys = torch.cat((keys, entries), dim=1)
            o = dense_attention(q, keys, mask.expand(B, -1, -1), self.attn_sink, self.scale)
        elif attn_impl == "sparse":
            # Built directly, O(T*(W+k)): query p sees window keys p-W+1..p (those >= 0).
            key_pos = positions[:, None] - W + 1 + torch.arange(W, device=x.device)
            idx = torch.where(key_pos >= 0, key_pos - first, -1)[None].expand(B, -1, -1)
            if entries is not None:
                n_win = keys.shape[1]
                if self.kind == CSA:
                    comp = self.indexer(x, qr, start_pos, st.indexer, inv_freq)
                else:  # HCA: every visible entry, which is a prefix of the entries
                    w = torch.arange(entries.shape[1], device=x.device)
                    comp = torch.where(compressed_visibility(positions, entries.shape[1], self.ratio), w, -1)
                    comp = comp.expand(B, -1, -1)
                idx = torch.cat((idx, torch.where(comp >= 0, comp + n_win, -1)), dim=-1)
                keys = torch.cat((keys, entries), dim=1)
            o = sparse_attention(q, keys, idx, self.attn_sink, self.scale)
        else:
            raise ValueError(f"unknown attn_impl {attn_impl!r}")

        o = apply_rope(o, rot, inverse=True)
        # Grouped low-rank output: per group of contiguous heads, [H*D/g] -> [o_rank].
        o = o.reshape(B, T, self.groups, -1)
        wo_a = self.wo_a.dequantized().to(o.dtype).view(self.groups, self.o_rank, -1)
        o = torch.einsum("btgi,gri->btgr", o, wo_a)
        return self.parallel.all_reduce(self.wo_b(o.flatten(2)))

