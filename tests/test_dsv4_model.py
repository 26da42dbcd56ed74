"""DeepSeek-V4 model math: each piece against a hand-written reference, fast vs reference paths."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4_tiny import tiny_config, write_tiny
from engine.deepseek_v4.attention import (
    Compressor,
    apply_rope,
    dense_attention,
    mask_to_indices,
    rope_inv_freq,
    rope_table,
    sparse_attention,
    topk_stable,
)
from engine.deepseek_v4.config import ModelArgs
from engine.deepseek_v4.model import Block, Expert, Gate, hc_split_sinkhorn
from engine.deepseek_v4.state import CompressorState
from engine.deepseek_v4.weights import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_args() -> ModelArgs:
    return ModelArgs.from_hf_config(tiny_config())


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------- RoPE ----------


def test_rope_rotates_interleaved_pairs_of_the_trailing_dims(tiny_args):
    inv_freq = rope_inv_freq(tiny_args, compressed=False)
    assert inv_freq[0] == 1.0 and inv_freq[1] == pytest.approx(10000 ** (-2 / 16))
    x = torch.zeros(1, 3, 20)
    x[..., 0] = 7.0  # a non-RoPE dim stays put
    x[..., 4] = 1.0  # the first rotary pair is dims (4, 5)
    rot = rope_table(inv_freq, torch.tensor([0, 1, 2]))
    y = apply_rope(x, rot)
    assert torch.equal(y[..., :4], x[..., :4])
    for p in range(3):
        assert y[0, p, 4].item() == pytest.approx(math.cos(p), abs=1e-6)
        assert y[0, p, 5].item() == pytest.approx(math.sin(p), abs=1e-6)
    assert torch.allclose(apply_rope(y, rot, inverse=True), x, atol=1e-6)


def test_compressed_layers_use_yarn_on_compress_theta():
    a = ModelArgs.from_hf_config(
        {**tiny_config(), "qk_rope_head_dim": 64, "head_dim": 128, "index_head_dim": 128, "rope_scaling": {
            "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}}
    )
    plain = 1.0 / 160000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    got = rope_inv_freq(a, compressed=True)
    assert torch.allclose(got[:16], plain[:16])  # below the ramp (low = 15): unchanged
    assert torch.allclose(got[25:], plain[25:] / 16)  # above it (high = 25): interpolated
    assert (got[16:25] < plain[16:25]).all() and (got[16:25] > plain[16:25] / 16).all()
    window = rope_inv_freq(a, compressed=False)
    assert torch.allclose(window, 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))


# ---------- attention cores ----------


def test_sink_sits_in_the_denominator_only():
    q = torch.tensor([[[[1.0, 0.0]]]])  # [B=1, T=1, H=1, D=2]
    k = torch.tensor([[[2.0, 1.0]]])
    sink = torch.tensor([0.5])
    o = dense_attention(q, k, torch.ones(1, 1, 1, dtype=torch.bool), sink, 1.0)
    w = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5))
    assert torch.allclose(o, torch.tensor([[[[2 * w, w]]]]))
    # no visible key: the sink alone, output 0
    o0 = dense_attention(q, k, torch.zeros(1, 1, 1, dtype=torch.bool), sink, 1.0)
    assert torch.equal(o0, torch.zeros_like(o0))


def test_sparse_gather_equals_dense_masked_attention():
    torch.manual_seed(3)
    B, T, H, D, N = 2, 5, 3, 8, 11
    q, keys, sink = torch.randn(B, T, H, D), torch.randn(B, N, D), torch.randn(H)
    mask = torch.rand(B, T, N) < 0.5
    mask[0, 0] = False  # a query with nothing to see
    idx = mask_to_indices(mask)
    assert idx.shape[-1] == mask.sum(-1).max()
    sparse = sparse_attention(q, keys, idx, sink, 0.3)
    dense = dense_attention(q, keys, mask, sink, 0.3)
    assert torch.allclose(sparse, dense, atol=1e-6)


def test_topk_breaks_ties_towards_lower_indices():
    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, float("-inf"), 5.0]])
    assert topk_stable(scores, 3).tolist() == [[1, 5, 0]]


# ---------- compressor against a loop-by-loop reference ----------


def _reference_entries(comp: Compressor, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Spec §2 written out per window and channel."""
    m, d = comp.ratio, comp.dim
    kv, z = comp.wkv(x)[0], comp.wgate(x)[0]  # [T, coff*D]
    out = []
    for w in range(x.shape[1] // m):
        rows = range(w * m, (w + 1) * m)
        slots_kv = [kv[t, d:] if comp.overlap else kv[t] for t in rows]
        slots_z = [(z[t] + comp.ape[t - w * m])[d:] if comp.overlap else z[t] + comp.ape[t - w * m] for t in rows]
        if comp.overlap and w > 0:
            prev = range((w - 1) * m, w * m)
            slots_kv = [kv[t, :d] for t in prev] + slots_kv
            slots_z = [(z[t] + comp.ape[t - (w - 1) * m])[:d] for t in prev] + slots_z
        weights = torch.stack(slots_z).softmax(dim=0)
        entry = (weights * torch.stack(slots_kv)).sum(0)
        entry = comp.norm(entry[None])[0]
        out.append(apply_rope(entry[None, None], rope_table(inv_freq, torch.tensor([w * m])))[0, 0])
    return torch.stack(out)[None]


@pytest.mark.parametrize("ratio", [4, 8])
def test_compressor_matches_per_window_reference(tiny_args, ratio):
    torch.manual_seed(ratio)
    comp = Compressor(tiny_args, ratio, dim=32, rotate=False, simulate=False)
    coff = 2 if ratio == 4 else 1
    comp.wkv.weight = torch.randn(coff * 32, 64) * 0.2
    comp.wgate.weight = torch.randn(coff * 32, 64) * 0.2
    comp.ape = torch.randn(ratio, coff * 32)
    inv_freq = rope_inv_freq(tiny_args, compressed=True)
    x = torch.randn(1, 3 * ratio + 2, 64)
    st = CompressorState.empty(1, ratio, 32, torch.float32, "cpu")
    comp(x, 0, st, inv_freq)
    assert st.n_entries == 3 and st.pending_kv.shape[1] == 2  # remainder waits
    assert torch.allclose(st.entries, _reference_entries(comp, x, inv_freq), atol=1e-5)


# ---------- mHC ----------


def test_sinkhorn_mixing_is_doubly_stochastic():
    torch.manual_seed(4)
    mixes = torch.randn(2, 3, 24) * 3
    pre, post, comb = hc_split_sinkhorn(mixes, torch.rand(3) + 0.5, torch.randn(24), 4, 20, 1e-6)
    assert torch.allclose(comb.sum(-2), torch.ones(2, 3, 4), atol=1e-5)  # ends on a column step
    # 20 iterations leave rows only approximately normalised ("approximately doubly stochastic")
    assert torch.allclose(comb.sum(-1), torch.ones(2, 3, 4), atol=0.05)
    assert ((pre > 0) & (pre < 1 + 2e-6)).all() and ((post > 0) & (post < 2)).all()


def test_hc_post_contracts_over_the_first_index():
    x = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 2).contiguous()  # stream i holds value i
    comb = torch.zeros(1, 1, 4, 4)
    comb[0, 0, 3, 0] = 1.0  # M[3, 0]: stream 3 feeds output stream 0
    y = Block._hc_post(torch.zeros(1, 1, 2), x, torch.zeros(1, 1, 4), comb)
    assert y[0, 0, 0].tolist() == [3.0, 3.0] and y[0, 0, 1:].abs().sum() == 0


# ---------- MoE ----------


def test_gate_bias_selects_but_does_not_weigh(tiny_args):
    gate = Gate(tiny_args, layer_id=2)  # a scored (non-hash) layer
    gate.weight = torch.eye(8, 64).to(torch.bfloat16)
    gate.bias = torch.zeros(8)
    gate.bias[7] = 100.0  # expert 7 always picked
    x = torch.zeros(1, 64)
    x[0, :8] = torch.tensor([5.0, 4.0, 3.0, 0, 0, 0, 0, -2.0])
    weights, experts = gate(x, torch.tensor([0]))
    assert sorted(experts[0].tolist()) == [0, 7]
    s = torch.nn.functional.softplus(x[0, :8]).sqrt()
    chosen = torch.stack([s[e] for e in experts[0].tolist()])
    assert torch.allclose(weights[0], chosen / chosen.sum() * 1.5)


def test_hash_layers_route_by_token_id(tiny_args):
    gate = Gate(tiny_args, layer_id=0)
    assert gate.hash and not hasattr(gate, "bias")
    gate.weight = torch.randn(8, 64).to(torch.bfloat16)
    gate.tid2eid = torch.zeros(512, 2, dtype=torch.int64)
    gate.tid2eid[17] = torch.tensor([3, 6])
    _, experts = gate(torch.randn(2, 64), torch.tensor([17, 5]))
    assert experts.tolist() == [[3, 6], [0, 0]]


def test_swiglu_clamps_gate_above_and_up_both_ways(tiny_args):
    e = Expert(tiny_args, "dense", simulate=False)  # swiglu_limit 2.0
    e.w1.weight = torch.full((32, 64), 1.0).to(torch.bfloat16)
    e.w3.weight = torch.full((32, 64), -1.0).to(torch.bfloat16)
    e.w2.weight = torch.eye(64, 32).to(torch.bfloat16)
    y = e(torch.full((1, 64), 0.5))  # w1 x = 32 -> 2, w3 x = -32 -> -2
    assert torch.allclose(y[0, :32], torch.full((32,), torch.nn.functional.silu(torch.tensor(2.0)).item() * -2))


# ---------- the whole model ----------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4-model")
    return {
        "small_topk": load_checkpoint(write_tiny(root / "a", "fp32", index_topk=2)).model,
        "covering": load_checkpoint(write_tiny(root / "b", "fp32", index_topk=64)).model,
        "fp8": load_checkpoint(write_tiny(root / "c", "fp8")).model,
    }


@torch.no_grad()
def test_logits_shape_and_batch_independence(checkpoints):
    model = checkpoints["small_topk"]
    ids = tokens(2, 40)
    logits = model(ids)
    assert logits.shape == (2, 40, 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.allclose(model(ids[1:]), logits[1:], atol=1e-5)


@torch.no_grad()
def test_sparse_path_equals_dense_reference_when_topk_covers_all(checkpoints):
    model, ids = checkpoints["covering"], tokens(1, 40)
    assert torch.allclose(model(ids), model(ids, attn_impl="dense"), atol=1e-5)


@torch.no_grad()
def test_indexer_selection_changes_the_result_when_topk_is_small(checkpoints):
    model, ids = checkpoints["small_topk"], tokens(1, 40)
    sparse, dense = model(ids), model(ids, attn_impl="dense")
    # Up to 2*4+3 = 11 tokens every CSA query sees at most 2 entries: identical there.
    assert torch.allclose(sparse[:, :11], dense[:, :11], atol=1e-5)
    assert not torch.allclose(sparse[:, 12:], dense[:, 12:], atol=1e-3)


@torch.no_grad()
def test_qat_simulation_is_a_small_perturbation(tmp_path):
    path = write_tiny(tmp_path / "q", "fp8")
    on = load_checkpoint(path).model
    off = load_checkpoint(path, simulate=False).model
    assert on.simulate and not off.simulate
    ids = tokens(1, 40)
    a, b = on(ids), off(ids)
    assert not torch.allclose(a, b, atol=1e-4)
    assert (a - b).norm() / b.norm() < 0.2


def test_sparse_attention_query_blocks_do_not_change_the_result():
    torch.manual_seed(6)
    q, keys, sink = torch.randn(2, 9, 3, 8), torch.randn(2, 12, 8), torch.randn(3)
    idx = mask_to_indices(torch.rand(2, 9, 12) < 0.6)
    whole = sparse_attention(q, keys, idx, sink, 0.5)
    assert torch.allclose(sparse_attention(q, keys, idx, sink, 0.5, max_elements=100), whole, atol=1e-6)


@torch.no_grad()
def test_indexer_query_blocks_do_not_change_the_result(checkpoints, monkeypatch):
    from engine.deepseek_v4 import attention

    model, ids = checkpoints["small_topk"], tokens(1, 40)
    whole = model(ids)
    monkeypatch.setattr(attention, "SCRATCH_ELEMENTS", 64)  # a few queries per block
    assert torch.allclose(model(ids), whole, atol=1e-5)


@torch.no_grad()
def test_simulation_puts_cache_entries_on_their_grids(checkpoints):
    from engine.fp8 import fp4_round, fp8_round

    model = checkpoints["fp8"]
    assert model.simulate
    state = model.new_state(1)
    model(tokens(1, 40), state)
    R = model.args.qk_rope_head_dim
    csa = state.layers[1]
    for kv in (csa.window, csa.compressor.entries, state.layers[2].compressor.entries):
        nope = kv[..., :-R]
        assert torch.equal(fp8_round(nope, 64), nope)  # non-RoPE dims already FP8 values
        assert not torch.equal(fp8_round(kv[..., -R:], 64), kv[..., -R:])  # RoPE dims kept exact
    keys = csa.indexer.entries  # Hadamard-rotated, then FP4
    assert keys.shape[1] == 10 and torch.equal(fp4_round(keys), keys)


@torch.no_grad()
def test_bf16_compute_runs_with_a_bf16_state(tmp_path):
    model = load_checkpoint(write_tiny(tmp_path, "bf16"), dtype=torch.bfloat16).model
    state = model.new_state(1)
    logits = model(tokens(1, 20), state)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert state.layers[1].window.dtype == torch.bfloat16


# ---------- a whole attention layer against a per-query reference written from the spec ----------


def _rope_ref(v: torch.Tensor, pos: int, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the trailing dims by pos * inv_freq[i], written out."""
    r = 2 * inv_freq.shape[0]
    out = v.clone()
    for i in range(inv_freq.shape[0]):
        theta = pos * inv_freq[i].item() * (-1 if inverse else 1)
        a, b = v[..., -r + 2 * i], v[..., -r + 2 * i + 1]
        out[..., -r + 2 * i] = a * math.cos(theta) - b * math.sin(theta)
        out[..., -r + 2 * i + 1] = a * math.sin(theta) + b * math.cos(theta)
    return out


def _reference_attention(attn, x: torch.Tensor) -> torch.Tensor:
    a = attn.args
    T, H, D, W, m = x.shape[1], a.num_attention_heads, a.head_dim, a.sliding_window, attn.ratio
    inv = rope_inv_freq(a, compressed=attn.kind != "window")
    qr = attn.q_norm(attn.wq_a(x))[0]
    q = attn.wq_b(qr).view(T, H, D)
    q = q / (q.square().mean(-1, keepdim=True) + a.rms_norm_eps).sqrt()
    kv = attn.kv_norm(attn.wkv(x))[0]
    q = torch.stack([_rope_ref(q[t], t, inv) for t in range(T)])
    kv = torch.stack([_rope_ref(kv[t], t, inv) for t in range(T)])
    entries = _reference_entries(attn.compressor, x, inv)[0] if m else None
    if attn.kind == "csa":
        ix = attn.indexer
        ikeys = _reference_entries(ix.compressor, x, inv)[0]
        iq = ix.wq_b(qr).view(T, a.index_n_heads, a.index_head_dim)
        iw = ix.weights_proj(x)[0] * a.index_head_dim**-0.5 * a.index_n_heads**-0.5
    out = torch.zeros(T, H, D)
    for t in range(T):
        keys = [kv[s] for s in range(max(0, t - W + 1), t + 1)]
        if m:
            visible = list(range((t + 1) // m))
            if attn.kind == "csa":
                qt = torch.stack([_rope_ref(iq[t, c], t, inv) for c in range(a.index_n_heads)])
                score = {w: sum(iw[t, c] * torch.relu(qt[c] @ ikeys[w]) for c in range(a.index_n_heads)) for w in visible}
                visible = sorted(visible, key=lambda w: (-score[w].item(), w))[: a.index_topk]
            keys += [entries[w] for w in visible]
        k = torch.stack(keys)
        for h in range(H):
            e = torch.exp(k @ q[t, h] * D**-0.5)
            o = (e[:, None] * k).sum(0) / (e.sum() + torch.exp(attn.attn_sink[h]))
            out[t, h] = _rope_ref(o, t, inv, inverse=True)
    g = a.o_groups
    wo_a = attn.wo_a.dequantized().float().view(g, a.o_lora_rank, -1)
    per_group = out.reshape(T, g, -1)
    low = torch.stack([per_group[:, j] @ wo_a[j].T for j in range(g)], dim=1)  # [T, g, r]
    return attn.wo_b(low.reshape(T, -1))[None]


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1, 2])  # window-only, CSA (top-2), HCA
def test_attention_layer_matches_the_per_query_reference(checkpoints, layer):
    from engine.deepseek_v4.state import DSV4State

    model = checkpoints["small_topk"]
    attn = model.layers[layer].attn
    assert attn.kind == ("window", "csa", "hca")[layer]
    x = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(layer))
    state = DSV4State.empty(model.args, 1).layers[layer]
    got = attn(x, 0, state)
    assert torch.allclose(got, _reference_attention(attn, x), atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1])  # hash-routed, scored
def test_moe_dispatch_matches_every_expert_weighted(checkpoints, layer):
    moe = checkpoints["fp8"].layers[layer].ffn  # FP4 experts, FP8 shared expert
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(7))
    ids = tokens(2, 9)
    weights, experts = moe.gate(x.reshape(-1, 64), ids.reshape(-1))
    dense = torch.zeros(18, 8)
    dense.scatter_(1, experts, weights)  # routing weight of every expert, 0 when not chosen
    expect = sum(moe.experts[e](x.reshape(-1, 64), dense[:, e : e + 1]) for e in range(8))
    expect = expect + moe.shared_experts(x.reshape(-1, 64))
    assert torch.allclose(moe(x, ids), expect.view(2, 9, 64), atol=1e-5)
    if layer == 0:
        assert torch.equal(experts, moe.gate.tid2eid[ids.reshape(-1)])


# ---------- expert + tensor parallelism over CPU processes ----------


def _parallel_rank(rank: int, world: int, init_file: str, checkpoint: str, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from engine.deepseek_v4.parallel import Parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ck = load_checkpoint(checkpoint, parallel=Parallel(rank, world))
        ids, state = tokens(1, 30), ck.model.new_state(1)
        logits = torch.cat([ck.model(ids[:, :17], state), ck.model(ids[:, 17:], state)], dim=1)
        local = [e for e, m in enumerate(ck.model.layers[1].ffn.experts) if m is not None]
        heads = ck.model.layers[1].attn.attn_sink.shape[0]
        save_file(
            {"logits": logits, "local": torch.tensor(local), "heads": torch.tensor(heads)},
            f"{out_dir}/rank{rank}.safetensors",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_parallel_ranks_give_the_single_process_logits(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    checkpoint = write_tiny(tmp_path / "ckpt", "fp8")
    mp.spawn(_parallel_rank, args=(2, str(tmp_path / "init"), str(checkpoint), str(tmp_path)), nprocs=2)
    single = load_checkpoint(checkpoint).model(tokens(1, 30))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0]["local"].tolist() == [0, 1, 2, 3] and ranks[1]["local"].tolist() == [4, 5, 6, 7]
    assert all(r["heads"].item() == 2 for r in ranks)  # 4 heads split 2 + 2
    for r in ranks:
        assert torch.allclose(r["logits"], single, atol=1e-4)
