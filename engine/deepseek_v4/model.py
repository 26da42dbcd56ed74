"""DeepSeek-V4 Transformer: MoE, mHC residual streams, blocks, head. Math only.

No I/O, environment or globals: everything comes from `ModelArgs` and constructor
arguments. Module and buffer names are the official checkpoint names (spec §5), so the
state dict of `Transformer` is the checkpoint's tensor list.

Dimension key: B batch, T tokens, S hc streams (hc_mult), d hidden, E experts, k active.

`simulate` switches on DeepSeek's in-model QAT rounding (FP8 activations before FP8/FP4
matmuls, FP8 KV entries, Hadamard + FP4 indexer q/k); off, the model is the plain
full-precision math that other ports (transformers) implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.deepseek_v4.attention import Attention, RMSNorm
from engine.deepseek_v4.parallel import Parallel
from engine.deepseek_v4.config import ModelArgs
from engine.deepseek_v4.state import DSV4State, LayerState
from engine.errors import ModelFormatError
from engine.fp8 import DenseLinear, make_linear

# ---------- MoE ----------


class Gate(nn.Module):
    """Router: sqrt(softplus) scores (fp32); the bias only picks, it never weighs.

    Hash layers take their experts from `tid2eid[token_id]` instead of the scores.
    """

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.topk, self.score_func = args.num_experts_per_tok, args.scoring_func
        self.route_scale = args.routed_scaling_factor
        self.hash = layer_id < args.num_hash_layers
        self.register_buffer("weight", torch.empty(args.n_routed_experts, args.hidden_size, dtype=torch.bfloat16))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.topk, dtype=torch.int64))
        else:
            self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,d], token_ids [N] -> (weights [N,k] fp32, expert ids [N,k])."""
        logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.hash:
            experts = self.tid2eid[token_ids].long()
        else:
            experts = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, experts


class Expert(nn.Module):
    """SwiGLU with clamping, in fp32: w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L) * weight)."""

    def __init__(self, args: ModelArgs, fmt: str, simulate: bool):
        super().__init__()
        d, inter, block = args.hidden_size, args.moe_intermediate_size, args.weight_block_size
        self.w1 = make_linear(d, inter, fmt, block=block, simulate=simulate)
        self.w2 = make_linear(inter, d, fmt, block=block, simulate=simulate)
        self.w3 = make_linear(d, inter, fmt, block=block, simulate=simulate)
        self.limit = args.swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.w1(x).float(), self.w3(x).float()
        if self.limit > 0:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
        h = F.silu(gate) * up
        if weights is not None:
            h = h * weights
        return self.w2(h.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, simulate: bool, parallel: Parallel):
        super().__init__()
        self.n_experts, self.parallel = args.n_routed_experts, parallel
        parallel.check_split(self.n_experts, "experts")
        self.gate = Gate(args, layer_id)
        # Other ranks' experts are None: their names stay out of this rank's state dict.
        self.experts = nn.ModuleList(
            Expert(args, args.expert_format, simulate) if parallel.owns_expert(e, self.n_experts) else None
            for e in range(self.n_experts)
        )
        self.shared_experts = Expert(args, args.weight_format, simulate)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.gate(x, token_ids.reshape(-1))
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(experts).tolist():
            if self.experts[e] is None:
                continue
            rows, slot = torch.where(experts == e)
            y.index_add_(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).float())
        self.parallel.all_reduce(y)
        y += self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)


# ---------- mHC ----------


def hc_split_sinkhorn(
    mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [..., (2+S)*S] -> pre [..., S], post [..., S], comb [..., S, S] (spec §4)."""
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = mixes[..., 2 * hc :] * scale[2] + base[2 * hc :]
    comb = comb.unflatten(-1, (hc, hc)).softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B,T,S,d] -> fn . v * rsqrt(mean(v^2)+eps), v = the S streams flattened, fp32."""
    v = x.flatten(2).float()
    return F.linear(v, fn.float()) * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)


class Block(nn.Module):
    """hc_pre(attn) -> attn_norm -> attention -> hc_post -> hc_pre(ffn) -> ffn_norm -> MoE -> hc_post."""

    def __init__(self, args: ModelArgs, layer_id: int, simulate: bool, parallel: Parallel):
        super().__init__()
        self.args = args
        self.attn = Attention(args, layer_id, simulate, parallel)
        self.ffn = MoE(args, layer_id, simulate, parallel)
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        hc = args.hc_mult
        mix = (2 + hc) * hc
        for part in ("attn", "ffn"):
            self.register_buffer(f"hc_{part}_fn", torch.zeros(mix, hc * args.hidden_size, dtype=torch.float32))
            self.register_buffer(f"hc_{part}_base", torch.zeros(mix, dtype=torch.float32))
            self.register_buffer(f"hc_{part}_scale", torch.zeros(3, dtype=torch.float32))

    def _hc_pre(self, x: torch.Tensor, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.args
        mixes = hc_mixes(x, getattr(self, f"hc_{part}_fn"), a.rms_norm_eps)
        pre, post, comb = hc_split_sinkhorn(
            mixes, getattr(self, f"hc_{part}_scale"), getattr(self, f"hc_{part}_base"),
            a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps,
        )
        u = (pre[..., None] * x.float()).sum(dim=2)
        return u.to(x.dtype), post, comb

    @staticmethod
    def _hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        # x'_j = post_j f + sum_i comb[i, j] x_i: the contraction runs over the FIRST index.
        y = post[..., None] * f.float()[:, :, None, :] + torch.einsum("btij,btid->btjd", comb, x.float())
        return y.to(x.dtype)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor, start_pos: int, layer_state: LayerState, attn_impl: str = "sparse"
    ) -> torch.Tensor:
        u, post, comb = self._hc_pre(x, "attn")
        x = self._hc_post(self.attn(self.attn_norm(u), start_pos, layer_state, attn_impl), x, post, comb)
        u, post, comb = self._hc_pre(x, "ffn")
        return self._hc_post(self.ffn(self.ffn_norm(u), token_ids), x, post, comb)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float, hc_eps: float
) -> torch.Tensor:
    """Collapse the streams [B,T,S,d] -> [B,T,d] with sigmoid weights (no Sinkhorn)."""
    pre = torch.sigmoid(hc_mixes(x, fn, norm_eps) * scale + base) + hc_eps
    return (pre[..., None] * x.float()).sum(dim=2).to(x.dtype)


class MTPBlock(Block):
    """A multi-token-prediction layer (`mtp.{i}.*`, spec §4): from the main model's last
    streams at position t and the embedding of token t+1 it predicts token t+2.
    Plain generation does not run it; it is here for drafting (speculative decoding)."""

    def __init__(self, args: ModelArgs, layer_id: int, simulate: bool, parallel: Parallel):
        super().__init__(args, layer_id, simulate, parallel)
        d, hc = args.hidden_size, args.hc_mult
        fmt, block = args.weight_format, args.weight_block_size
        self.e_proj = make_linear(d, d, fmt, block=block, simulate=simulate)
        self.h_proj = make_linear(d, d, fmt, block=block, simulate=simulate)
        self.enorm = RMSNorm(d, args.rms_norm_eps)
        self.hnorm = RMSNorm(d, args.rms_norm_eps)
        self.norm = RMSNorm(d, args.rms_norm_eps)
        self.register_buffer("hc_head_fn", torch.zeros(hc, hc * d, dtype=torch.float32))
        self.register_buffer("hc_head_base", torch.zeros(hc, dtype=torch.float32))
        self.register_buffer("hc_head_scale", torch.zeros(1, dtype=torch.float32))

    def predict(
        self,
        h: torch.Tensor,
        next_tokens: torch.Tensor,
        start_pos: int,
        state: LayerState,
        embed: torch.Tensor,
        head: torch.Tensor,
    ) -> torch.Tensor:
        """h [B,T,S,d] (main streams), next_tokens [B,T] (the token after each position)
        -> fp32 logits [B,T,V]. `embed` and `head` are the main model's (shared)."""
        a = self.args
        e = self.enorm(F.embedding(next_tokens, embed).to(h.dtype))
        x = self.e_proj(e)[:, :, None, :] + self.h_proj(self.hnorm(h))
        x = super().forward(x, next_tokens, start_pos, state)
        y = hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.rms_norm_eps, a.hc_eps)
        return F.linear(self.norm(y).float(), head.float())


class Transformer(nn.Module):
    """embed -> S identical streams -> blocks -> hc head -> norm -> head (fp32 logits)."""

    def __init__(
        self,
        args: ModelArgs,
        *,
        simulate: bool = False,
        dtype: torch.dtype = torch.float32,
        parallel: Parallel = Parallel(),
    ):
        super().__init__()
        self.args, self.simulate, self.dtype, self.parallel = args, simulate, dtype, parallel
        d, hc = args.hidden_size, args.hc_mult
        self.embed = _Embedding(args.vocab_size, d)
        self.layers = nn.ModuleList(Block(args, i, simulate, parallel) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(d, args.rms_norm_eps)
        self.head = DenseLinear(d, args.vocab_size)
        self.register_buffer("hc_head_fn", torch.zeros(hc, hc * d, dtype=torch.float32))
        self.register_buffer("hc_head_base", torch.zeros(hc, dtype=torch.float32))
        self.register_buffer("hc_head_scale", torch.zeros(1, dtype=torch.float32))
        n_main = args.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPBlock(args, n_main + i, simulate, parallel) for i in range(args.num_nextn_predict_layers)
        )

    def new_state(self, batch: int = 1, max_len: int | None = None) -> DSV4State:
        """An empty state. It grows with the context (nothing is preallocated); `max_len`
        only caps how many tokens it accepts."""
        limit = self.args.context_length
        if max_len is not None and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's context of {limit}")
        state = DSV4State.empty(self.args, batch, dtype=self.dtype, device=self.head.weight.device)
        state.max_len = max_len or limit
        return state

    def new_mtp_state(self, batch: int = 1) -> list[LayerState]:
        """Per MTP layer, the state of its (window-only) attention."""
        n = self.args.num_hidden_layers
        device = self.head.weight.device
        return [LayerState.empty(self.args, n + i, batch, self.dtype, device) for i in range(len(self.mtp))]

    @torch.no_grad()
    def mtp_logits(
        self, h: torch.Tensor, next_tokens: torch.Tensor, start_pos: int, mtp_state: list[LayerState], depth: int = 0
    ) -> torch.Tensor:
        """Logits of MTP layer `depth` for positions start_pos.. (see `MTPBlock.predict`);
        `h` comes from `hidden_streams` over the same positions."""
        if depth >= len(self.mtp):
            raise ValueError(f"the checkpoint has {len(self.mtp)} MTP layers, not {depth + 1}")
        block = self.mtp[depth]
        return block.predict(h, next_tokens, start_pos, mtp_state[depth], self.embed.weight, self.head.weight)

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> DSV4State:
        """A state from `DSV4State.export()` output, moved to this model's device."""
        want = str(self.dtype).removeprefix("torch.")
        if meta.get("dtype") != want:
            raise ModelFormatError(
                f"saved DeepSeek-V4 state holds {meta.get('dtype')} entries; this model computes in {want}"
            )
        device = self.head.weight.device
        state = DSV4State.restore(self.args, {k: v.to(device) for k, v in tensors.items()}, meta)
        state.max_len = self.args.context_length
        return state

    @torch.no_grad()
    def hidden_streams(
        self, tokens: torch.Tensor, state: DSV4State, start_pos: int, attn_impl: str = "sparse"
    ) -> torch.Tensor:
        """tokens [B,T] -> the last block's streams [B,T,S,d]; advances `state` by T."""
        state.check_usable()
        if start_pos != state.pos:
            raise ValueError(f"start_pos {start_pos} does not continue the state at {state.pos}")
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"batch {tokens.shape[0]} does not match the state's {state.batch_size}")
        if start_pos + tokens.shape[1] > state.max_len:
            raise ValueError(f"{start_pos + tokens.shape[1]} tokens exceed the state's {state.max_len}")
        tokens = tokens.to(self.embed.weight.device)  # callers build ids on the CPU
        h = F.embedding(tokens, self.embed.weight).to(self.dtype)
        h = h[:, :, None, :].expand(-1, -1, self.args.hc_mult, -1).contiguous()
        # Layers update their state as they go; an exception between them (Ctrl-C) would
        # leave a half-advanced state, so it is marked unusable until the pass completes.
        state.in_flight = True
        for layer, layer_state in zip(self.layers, state.layers):
            h = layer(h, tokens, start_pos, layer_state, attn_impl)
        state.pos = start_pos + tokens.shape[1]
        state.in_flight = False
        return h

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        state: DSV4State | None = None,
        output: str = "all",
        *,
        start_pos: int | None = None,
        attn_impl: str = "sparse",
    ) -> torch.Tensor | None:
        """tokens [B,T] at positions start_pos.. -> fp32 logits [B,T,V].

        `output`: "all", "last" ([B,1,V]) or "none" (no head: a prefill chunk whose logits
        nobody reads) -- the `mini` Llama's signature, so one generation loop drives both.
        With no state the call is a one-shot prefill from position 0 on a fresh state;
        with one, `start_pos` (a check) defaults to `state.pos` and the state advances by T.
        """
        if output not in ("all", "last", "none"):
            raise ValueError(f"output must be all, last or none, not {output!r}")
        if state is None:
            state = self.new_state(tokens.shape[0])
        if start_pos is None:
            start_pos = state.pos
        h = self.hidden_streams(tokens, state, start_pos, attn_impl)
        if output == "none":
            return None
        if output == "last":
            h = h[:, -1:]
        a = self.args
        y = hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.rms_norm_eps, a.hc_eps)
        return F.linear(self.norm(y).float(), self.head.weight.float())


class _Embedding(nn.Module):
    """Holds `embed.weight` [V, d] in its checkpoint dtype."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab, dim, dtype=torch.bfloat16))
