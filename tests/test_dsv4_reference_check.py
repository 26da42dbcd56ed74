"""Our DeepSeek-V4 code against DeepSeek's published files and reference code (read for
facts through the public code index; nothing here is copied from them).

Sources, as repository : path:
- Flash `config.json`, verbatim (1749 bytes, fetched from the Hugging Face repo), the
  index's tensor families and counts (69,187 tensors, total_size 159,609,485,896 bytes) and
  the shard-2 header (layer-0 shapes and dtypes): a mistral.rs port's audit log that quotes
  them (found by content through find_string; the index shows no repository name for it).
- The 82 distinct Flash tensor-name patterns of `model.safetensors.index.json` (digits
  written as 0): a sglang fork's test, `_V4_KEY_PATTERNS` (same: no repository name shown).
- Pro `config.json` (the first revision, which has no `expert_dtype`) and the Pro tensor
  table (145,116 tensors, 861,608,274,846 elements; shapes and dtypes per family): a
  checkpoint report dumped from `/nfs/.../DeepSeek-V4-Pro` (no repository name shown).
- Model math: Nicooo-Wang/DeepSeek-V4-Pro-code : inference/model.py (a copy of DeepSeek's
  `inference/model.py`: Compressor, Indexer, Attention, Gate, Expert, Block hc_pre/hc_post,
  ParallelHead.hc_head, precompute_freqs_cis). The official tilelang kernels: `act_quant`
  (a port "verbatim from deepseek-ai/DeepSeek-V4-Pro/inference/kernel.py") and
  `hc_split_sinkhorn_kernel` (softmax + eps, one column normalisation, then iters-1 times row
  then column). FP4 layout: `cast_e2m1fn_to_e4m3fn` of the official `inference/convert.py`
  (ModelScope-derived copy, and sgl-project/sglang's copy).
- Checked and agreeing, with no test added here because earlier tests pin them
  (tests/test_dsv4_model.py, tests/test_fp8.py): the attention sink in the denominator only,
  inverse RoPE on the output, the grouped wo_a einsum, hc_post contracting over the first
  index, sqrt-softplus scores with the bias used for selection only, hash routing by
  tid2eid[token], route scaling, SwiGLU clamps on the shared expert too, the window of W
  tokens including the current one, compressed entry w visible when w < (t+1)//m, top-k over
  the masked row, the Hadamard transform being Sylvester-ordered, and the e8m0 decoding.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from engine.deepseek_v4.attention import rope_inv_freq
from engine.deepseek_v4.config import CSA, HCA, WINDOW, ModelArgs, yarn_correction_range
from engine.deepseek_v4.model import Transformer, hc_split_sinkhorn
from engine.fp8 import dequant_fp4, dequant_fp8, fp4_round, fp8_round

DATA = Path(__file__).parent / "data"
FLASH_CONFIG = DATA / "deepseek-v4-flash-config.json"
PRO_CONFIG = DATA / "deepseek-v4-pro-config.json"

# The 82 distinct tensor-name patterns of the Flash index, with layer/expert numbers and the
# w1/w2/w3 digit written as 0 (as the source lists them; `tid2eid` keeps its 2).
FLASH_NAME_PATTERNS = {
    "embed.weight", "hc_head_base", "hc_head_fn", "hc_head_scale", "head.weight", "norm.weight",
    *(f"layers.0.{rest}" for rest in (
        "attn.attn_sink", "attn.compressor.ape", "attn.compressor.norm.weight",
        "attn.compressor.wgate.weight", "attn.compressor.wkv.weight",
        "attn.indexer.compressor.ape", "attn.indexer.compressor.norm.weight",
        "attn.indexer.compressor.wgate.weight", "attn.indexer.compressor.wkv.weight",
        "attn.indexer.weights_proj.weight", "attn.indexer.wq_b.scale", "attn.indexer.wq_b.weight",
        "ffn.gate.tid2eid",
    )),
    *(f"{p}.{rest}" for p in ("layers.0", "mtp.0") for rest in (
        "attn.kv_norm.weight", "attn.q_norm.weight", "attn.attn_sink",
        "attn.wkv.scale", "attn.wkv.weight", "attn.wo_a.scale", "attn.wo_a.weight",
        "attn.wo_b.scale", "attn.wo_b.weight", "attn.wq_a.scale", "attn.wq_a.weight",
        "attn.wq_b.scale", "attn.wq_b.weight", "attn_norm.weight",
        "ffn.experts.0.w0.scale", "ffn.experts.0.w0.weight", "ffn.gate.bias", "ffn.gate.weight",
        "ffn.shared_experts.w0.scale", "ffn.shared_experts.w0.weight", "ffn_norm.weight",
        "hc_attn_base", "hc_attn_fn", "hc_attn_scale", "hc_ffn_base", "hc_ffn_fn", "hc_ffn_scale",
    )),
    *(f"mtp.0.{rest}" for rest in (
        "e_proj.scale", "e_proj.weight", "enorm.weight", "h_proj.scale", "h_proj.weight",
        "hc_head_base", "hc_head_fn", "hc_head_scale", "hnorm.weight", "norm.weight",
    )),
}

F32, BF16, FP8, E8M0, I8, I64 = (
    torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8, torch.int64,
)

# Shapes and dtypes as shipped: Flash shard-2 header (layer 0) plus the compressor and
# indexer shapes of a CSA (2) and an HCA (3) layer.
FLASH_TENSORS = {
    "layers.0.attn.attn_sink": (F32, [64]),
    "layers.0.attn.q_norm.weight": (BF16, [1024]),
    "layers.0.attn.kv_norm.weight": (BF16, [512]),
    "layers.0.attn.wq_a.weight": (FP8, [1024, 4096]),
    "layers.0.attn.wq_a.scale": (E8M0, [8, 32]),
    "layers.0.attn.wq_b.weight": (FP8, [32768, 1024]),
    "layers.0.attn.wkv.weight": (FP8, [512, 4096]),
    "layers.0.attn.wo_a.weight": (FP8, [8192, 4096]),
    "layers.0.attn.wo_b.weight": (FP8, [4096, 8192]),
    "layers.0.ffn.gate.weight": (BF16, [256, 4096]),
    "layers.0.ffn.gate.tid2eid": (I64, [129280, 6]),
    "layers.0.hc_attn_scale": (F32, [3]),
    "layers.0.hc_attn_base": (F32, [24]),
    "layers.0.hc_attn_fn": (F32, [24, 16384]),
    "layers.0.ffn.experts.0.w1.weight": (I8, [2048, 2048]),
    "layers.0.ffn.experts.0.w1.scale": (E8M0, [2048, 128]),
    "layers.0.ffn.shared_experts.w1.weight": (FP8, [2048, 4096]),
    "layers.0.ffn.shared_experts.w1.scale": (E8M0, [16, 32]),
    "layers.2.attn.compressor.wkv.weight": (BF16, [1024, 4096]),
    "layers.2.attn.compressor.wgate.weight": (BF16, [1024, 4096]),
    "layers.2.attn.compressor.norm.weight": (BF16, [512]),
    "layers.2.attn.compressor.ape": (F32, [4, 1024]),
    "layers.2.attn.indexer.wq_b.weight": (FP8, [8192, 1024]),
    "layers.2.attn.indexer.weights_proj.weight": (BF16, [64, 4096]),
    "layers.2.attn.indexer.compressor.wkv.weight": (BF16, [256, 4096]),
    "layers.2.attn.indexer.compressor.ape": (F32, [4, 256]),
    "layers.2.attn.indexer.compressor.norm.weight": (BF16, [128]),
    "layers.3.attn.compressor.wkv.weight": (BF16, [512, 4096]),
    "layers.3.attn.compressor.ape": (F32, [128, 512]),
}

# A selection of the Pro tensor table (same shapes for every layer of a family).
PRO_TENSORS = {
    "embed.weight": (BF16, [129280, 7168]),
    "head.weight": (BF16, [129280, 7168]),
    "hc_head_fn": (F32, [4, 28672]),
    "layers.1.ffn.gate.tid2eid": (I64, [129280, 6]),
    "layers.7.attn.attn_sink": (F32, [128]),
    "layers.7.attn.q_norm.weight": (BF16, [1536]),
    "layers.7.attn.wkv.scale": (E8M0, [4, 56]),
    "layers.7.attn.wo_a.weight": (FP8, [16384, 4096]),
    "layers.7.attn.wo_a.scale": (E8M0, [128, 32]),
    "layers.7.attn.wo_b.weight": (FP8, [7168, 16384]),
    "layers.7.attn.wo_b.scale": (E8M0, [56, 128]),
    "layers.7.attn.wq_a.scale": (E8M0, [12, 56]),
    "layers.7.attn.wq_b.weight": (FP8, [65536, 1536]),
    "layers.7.attn.wq_b.scale": (E8M0, [512, 12]),
    "layers.7.ffn.experts.383.w1.weight": (I8, [3072, 3584]),
    "layers.7.ffn.experts.383.w1.scale": (E8M0, [3072, 224]),
    "layers.7.ffn.experts.383.w2.weight": (I8, [7168, 1536]),
    "layers.7.ffn.experts.383.w2.scale": (E8M0, [7168, 96]),
    "layers.7.ffn.gate.weight": (BF16, [384, 7168]),
    "layers.7.ffn.gate.bias": (F32, [384]),
    "layers.7.ffn.shared_experts.w1.scale": (E8M0, [24, 56]),
    "layers.7.ffn.shared_experts.w2.weight": (FP8, [7168, 3072]),
    "layers.7.ffn.shared_experts.w2.scale": (E8M0, [56, 24]),
    "layers.7.hc_ffn_fn": (F32, [24, 28672]),
    "layers.0.attn.compressor.ape": (F32, [128, 512]),
    "layers.0.attn.compressor.wkv.weight": (BF16, [512, 7168]),
    "layers.2.attn.compressor.ape": (F32, [4, 1024]),
    "layers.2.attn.compressor.wgate.weight": (BF16, [1024, 7168]),
    "layers.8.attn.indexer.wq_b.scale": (E8M0, [64, 12]),
    "layers.8.attn.indexer.wq_b.weight": (FP8, [8192, 1536]),
    "layers.8.attn.indexer.compressor.ape": (F32, [4, 256]),
}


def meta_state(config: Path) -> dict[str, torch.Tensor]:
    """The tensors our loader expects for a config, shapes and dtypes only (no memory)."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_file(config), simulate=True)
    return model.state_dict()


@pytest.fixture(scope="module")
def flash_state() -> dict[str, torch.Tensor]:
    return meta_state(FLASH_CONFIG)


# ---------------------------------------------------------------- config.json


def test_the_flash_config_is_the_published_file():
    # Its size is the one the fetch reported: the test data is the file, not a rewrite.
    assert FLASH_CONFIG.stat().st_size == 1749
    a = ModelArgs.from_file(FLASH_CONFIG)
    assert a.layer_kinds[:4] == (WINDOW, WINDOW, CSA, HCA) and a.compress_ratios[43] == 0
    assert (a.num_hash_layers, a.num_nextn_predict_layers, a.expert_format) == (3, 1, "fp4")
    assert a.yarn == (16.0, 65536, 32.0, 1.0) and a.compress_rope_theta == 160000
    # Keys we do not model are kept, not rejected.
    assert a.extra["transformers_version"] == "4.57.1" and a.extra["use_cache"] is True


def test_the_first_pro_config_has_no_expert_dtype_and_still_means_fp4():
    a = ModelArgs.from_file(PRO_CONFIG)
    assert a.expert_dtype is None and a.expert_format == "fp4"
    assert [a.n_layers_of(k) for k in (WINDOW, CSA, HCA)] == [0, 30, 31]
    assert (a.index_topk, a.o_groups, a.routed_scaling_factor) == (1024, 16, 2.5)


# ---------------------------------------------------------------- checkpoint tensors


def test_our_tensor_names_are_the_flash_index_patterns(flash_state):
    patterns = {re.sub(r"(?<=\.)\d+(?=\.)|(?<=\.w)\d", "0", name) for name in flash_state}
    assert len(FLASH_NAME_PATTERNS) == 82 and patterns == FLASH_NAME_PATTERNS


def test_flash_tensor_count_and_bytes_equal_the_index(flash_state):
    assert len(flash_state) == 69_187
    assert sum(t.numel() * t.element_size() for t in flash_state.values()) == 159_609_485_896
    # Families: hash layers 0-2 have tid2eid and no bias; the MTP layer has a bias.
    assert sorted(n for n in flash_state if n.endswith("tid2eid")) == [f"layers.{i}.ffn.gate.tid2eid" for i in range(3)]
    assert sum(n.endswith("ffn.gate.bias") for n in flash_state) == 40 + 1
    assert sum(n.endswith("attn.indexer.wq_b.weight") for n in flash_state) == 21


def test_flash_shapes_and_dtypes_equal_the_shard_header(flash_state):
    got = {name: (flash_state[name].dtype, list(flash_state[name].shape)) for name in FLASH_TENSORS}
    assert got == FLASH_TENSORS


@pytest.mark.slow
def test_pro_tensor_table_equals_ours():
    state = meta_state(PRO_CONFIG)
    assert len(state) == 145_116
    assert sum(t.numel() for t in state.values()) == 861_608_274_846
    got = {name: (state[name].dtype, list(state[name].shape)) for name in PRO_TENSORS}
    assert got == PRO_TENSORS


# ---------------------------------------------------------------- formats


def test_fp4_to_fp8_cast_of_the_official_converter_is_lossless_on_our_layouts():
    """convert.py's cast_e2m1fn_to_e4m3fn: decode nibbles (low first) with the e2m1 table,
    fold each 32-block's e8m0 scale into the values as 2^(s - max_s + 6) and keep one
    128x128 tile scale max_s - 6. Done here independently; both decodings must agree."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 128, 256
    packed = torch.randint(-128, 128, (out_f, in_f // 2), dtype=torch.int8, generator=g)
    exps = torch.randint(120, 131, (out_f, in_f // 32), dtype=torch.int32, generator=g)
    scale = exps.to(torch.uint8).view(torch.float8_e8m0fnu)

    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    raw = packed.view(torch.uint8).to(torch.int64)
    values = torch.stack((torch.tensor(table)[raw & 15], torch.tensor(table)[raw >> 4]), dim=-1).flatten(1)
    tiles_e = exps.view(1, 128, 2, 4).amax(dim=(1, 3))  # [out/128, in/128] max exponent
    offset = torch.exp2((exps - tiles_e.repeat_interleave(4, dim=1)).float() + 6)
    w8 = (values * offset.repeat_interleave(32, dim=1)).to(torch.float8_e4m3fn)
    s8 = (tiles_e - 6).to(torch.uint8).view(torch.float8_e8m0fnu)

    assert torch.equal(w8.float(), values * offset.repeat_interleave(32, dim=1))  # exact in e4m3
    assert torch.equal(dequant_fp8(w8, s8), dequant_fp4(packed, scale))


def test_fp8_activation_rounding_follows_act_quant():
    """act_quant with a ue8m0 scale: amax clamped to >= 1e-4, s = 2^ceil(log2(amax/448)),
    values cast to e4m3 (round to nearest even) and multiplied back."""
    x = torch.tensor([[1.0, 0.3, -0.01, 0.0]])
    # amax 1 -> s = 2^-8; 0.3*256 = 76.8 -> 80 (e4m3 step 8 in [64, 128)); -2.56 -> -2.5.
    assert fp8_round(x, 4).tolist() == [[1.0, 80 / 256, -2.5 / 256, 0.0]]
    # An all-small block uses the clamped amax 1e-4: s = 2^ceil(log2(1e-4/448)) = 2^-22,
    # so 1e-9 (0.0042 in units of s) lands on the e4m3 subnormal grid of 2^-9.
    tiny = fp8_round(torch.tensor([[1e-9, 0.0]]), 2)
    assert tiny[0, 0].item() == pytest.approx(2 * 2.0**-9 * 2.0**-22, rel=0, abs=0)
    # The scale is per block of the given size along the last dim.
    two_blocks = fp8_round(torch.tensor([[448.0, 1.0, 0.3, 0.0]]), 2)
    assert two_blocks.tolist() == [[448.0, 1.0, 80 / 256, 0.0]]


def test_fp4_activation_rounding_follows_fp4_act_quant():
    """fp4_act_quant: s = 2^ceil(log2(amax/6)) per 32 values, e2m1 round to nearest even."""
    block = torch.zeros(1, 32)
    block[0, :4] = torch.tensor([6.0, 1.3, -0.26, 2.6])
    assert fp4_round(block)[0, :4].tolist() == [6.0, 1.5, -0.5, 3.0]
    block[0, 0] = 7.0  # amax 7 -> s = 2: 3.5 ties to the even code (4), 0.65 -> 0.5, 1.3 -> 1.5
    assert fp4_round(block)[0, :4].tolist() == [8.0, 1.0, -0.0, 3.0]


# ---------------------------------------------------------------- RoPE and mHC


def test_rope_frequencies_follow_precompute_freqs_cis():
    """Window-only layers: theta 10000, no YaRN. Compressed layers: compress_rope_theta with
    YaRN over the rotary dims (dim 64, original 65536, beta 32/1 -> ramp 15..25, factor 16)."""
    a = ModelArgs.from_file(FLASH_CONFIG)
    assert yarn_correction_range(a) == (15, 25)
    window, compressed = rope_inv_freq(a, compressed=False), rope_inv_freq(a, compressed=True)
    for i in (0, 10, 31):
        assert window[i].item() == pytest.approx(10000.0 ** (-2 * i / 64), rel=1e-6)
    base = [160000.0 ** (-2 * i / 64) for i in range(32)]
    assert compressed[0].item() == pytest.approx(1.0) and compressed[15].item() == pytest.approx(base[15], rel=1e-6)
    assert compressed[20].item() == pytest.approx(base[20] / 16 * 0.5 + base[20] * 0.5, rel=1e-6)
    assert compressed[25].item() == pytest.approx(base[25] / 16, rel=1e-6)
    assert compressed[31].item() == pytest.approx(base[31] / 16, rel=1e-6)


def test_sinkhorn_order_follows_the_kernel():
    """hc_split_sinkhorn_kernel: comb = softmax over the last dim + eps, then ONE column
    normalisation, then iters-1 rounds of (row, column). Hand-computed with eps = 0."""
    hc = 2
    mixes = torch.zeros(1, 1, (2 + hc) * hc)
    scale = torch.ones(3)
    base = torch.tensor([0.0, math.log(3.0), 0.0, 0.0, 0.0, math.log(3.0), 0.0, 0.0])
    pre, post, comb = hc_split_sinkhorn(mixes, scale, base, hc, 1, 0.0)
    assert pre[0, 0].tolist() == pytest.approx([0.5, 0.75])
    assert post[0, 0].tolist() == pytest.approx([1.0, 1.0])
    # softmax rows [1/4, 3/4], [1/2, 1/2]; columns sum to 3/4 and 5/4.
    assert comb[0, 0].tolist() == [pytest.approx([1 / 3, 0.6]), pytest.approx([2 / 3, 0.4])]
    _, _, comb2 = hc_split_sinkhorn(mixes, scale, base, hc, 2, 0.0)
    rows = [[1 / 3 / (14 / 15), 0.6 / (14 / 15)], [2 / 3 / (16 / 15), 0.4 / (16 / 15)]]
    cols = [rows[0][0] + rows[1][0], rows[0][1] + rows[1][1]]
    expected = [[rows[r][c] / cols[c] for c in range(2)] for r in range(2)]
    assert comb2[0, 0].tolist() == [pytest.approx(expected[0]), pytest.approx(expected[1])]
