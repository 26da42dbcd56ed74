"""The strict safetensors loader on tiny official-format checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4_tiny import (
    checkpoint_tensors,
    dequantized_master,
    official_tensors,
    random_master,
    tiny_config,
    write_checkpoint,
    write_tiny,
)
from engine.deepseek_v4.weights import load_checkpoint
from engine.errors import ModelFormatError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ids(length: int = 30) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_every_format_loads_through_the_index(tmp_path, fmt):
    ck = load_checkpoint(write_tiny(tmp_path, fmt))
    assert ck.simulate == (fmt == "fp8")  # QAT simulation on only for quantised checkpoints
    with torch.no_grad():
        assert torch.isfinite(ck.model(ids())).all()


def test_quantised_weights_stay_quantised(tmp_path):
    ck = load_checkpoint(write_tiny(tmp_path / "q", "fp8"))
    sd = ck.model.state_dict()
    assert sd["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert sd["layers.1.ffn.experts.3.w2.weight"].dtype == torch.int8
    assert sd["layers.1.ffn.experts.3.w2.weight"].shape == (64, 16)  # [d, inter/2]
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert sd["embed.weight"].dtype == torch.bfloat16
    # memory tracks the checkpoint: the held bytes are the stored bytes
    stored = sum(t.numel() * t.element_size() for p in (tmp_path / "q").glob("*.safetensors") for t in load_file(p).values())
    assert ck.nbytes == stored
    full = load_checkpoint(write_tiny(tmp_path / "f", "fp32"))
    assert ck.nbytes < full.nbytes / 2


@torch.no_grad()
def test_fp8_dequant_path_equals_dense_checkpoint_of_the_same_values(tmp_path):
    cfg = tiny_config(quantized=True)
    master = random_master(cfg, seed=5)
    quant = write_checkpoint(tmp_path / "q", cfg, checkpoint_tensors(cfg, master, "fp8"))
    dense_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "expert_dtype")}
    dense = write_checkpoint(tmp_path / "d", dense_cfg, dequantized_master(cfg, master))
    a = load_checkpoint(quant, simulate=False).model(ids())
    b = load_checkpoint(dense).model(ids())
    assert torch.allclose(a, b, atol=1e-4)


def test_single_file_checkpoint_loads(tmp_path):
    cfg = tiny_config(mtp=False)
    save_file(checkpoint_tensors(cfg, random_master(cfg), "bf16"), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(tmp_path).args.num_nextn_predict_layers == 0


def _rewrite(tmp_path, change) -> None:
    cfg = tiny_config(quantized=True)
    tensors = checkpoint_tensors(cfg, random_master(cfg), "fp8")
    change(tensors)
    write_checkpoint(tmp_path, cfg, tensors)


def test_missing_tensor_is_named(tmp_path):
    _rewrite(tmp_path, lambda t: t.pop("layers.2.attn.compressor.ape"))
    with pytest.raises(ModelFormatError, match=r"lacks tensor layers\.2\.attn\.compressor\.ape"):
        load_checkpoint(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _rewrite(tmp_path, lambda t: t.update({"layers.2.attn.indexer.wq_b.weight": torch.zeros(128, 32)}))
    with pytest.raises(ModelFormatError, match=r"unexpected tensor layers\.2\.attn\.indexer\.wq_b\.weight"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    _rewrite(tmp_path, lambda t: t.update({"layers.1.attn.attn_sink": torch.zeros(5)}))
    with pytest.raises(ModelFormatError, match=r"layers\.1\.attn\.attn_sink has shape \[5\], expected \[4\]"):
        load_checkpoint(tmp_path)


def test_dtype_mismatch_is_named(tmp_path):
    # an FP8 projection stored as bf16 next to its scale
    _rewrite(tmp_path, lambda t: t.update({"layers.3.attn.wkv.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}))
    with pytest.raises(ModelFormatError, match=r"layers\.3\.attn\.wkv\.weight has dtype BF16"):
        load_checkpoint(tmp_path)


def test_index_pointing_at_a_missing_shard(tmp_path):
    write_tiny(tmp_path, "bf16")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["head.weight"] = "model-00009-of-00009.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="head.weight"):
        load_checkpoint(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_mtp_weights_are_part_of_the_strict_set():
    names = official_tensors(tiny_config())
    assert "mtp.0.e_proj.weight" in names and "mtp.0.hc_head_fn" in names
    assert "mtp.0.e_proj.weight" not in official_tensors(tiny_config(mtp=False))


def test_a_parallel_rank_reads_only_its_share(tmp_path):
    from engine.deepseek_v4.parallel import Parallel
    from engine.deepseek_v4.weights import split_dim

    path = write_tiny(tmp_path, "fp8")
    full = load_checkpoint(path)
    half = load_checkpoint(path, parallel=Parallel(rank=1, world_size=2))
    whole, mine = full.model.state_dict(), half.model.state_dict()
    assert "layers.1.ffn.experts.4.w1.weight" in mine and "layers.1.ffn.experts.3.w1.weight" not in mine
    # rank 1 holds the second half of the split rows / columns
    for name, dim in [
        ("layers.1.attn.wq_b.weight", 0),
        ("layers.1.attn.wq_b.scale", 0),
        ("layers.1.attn.attn_sink", 0),
        ("layers.1.attn.wo_a.weight", 0),
        ("layers.1.attn.wo_b.weight", 1),
        ("layers.1.attn.wo_b.scale", 1),
        ("layers.1.attn.indexer.wq_b.weight", 0),
        ("layers.1.attn.indexer.weights_proj.weight", 0),
    ]:
        assert split_dim(name) == dim
        n = whole[name].shape[dim] // 2
        expect = whole[name][n:] if dim == 0 else whole[name][:, n:]
        assert torch.equal(mine[name].view(torch.uint8), expect.contiguous().view(torch.uint8)), name
    assert torch.equal(mine["layers.1.attn.wkv.weight"].view(torch.uint8), whole["layers.1.attn.wkv.weight"].view(torch.uint8))

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    halved = sum(nbytes(t) for n, t in whole.items() if ".ffn.experts." in n or split_dim(n) is not None)
    assert full.nbytes - half.nbytes == halved // 2
    with pytest.raises(ValueError, match="do not split"):
        load_checkpoint(path, parallel=Parallel(rank=0, world_size=3))


def test_an_expert_beyond_the_config_is_still_unexpected(tmp_path):
    from engine.deepseek_v4.parallel import Parallel

    _rewrite(tmp_path, lambda t: t.update({"layers.1.ffn.experts.8.w1.weight": torch.zeros(32, 32, dtype=torch.int8)}))
    with pytest.raises(ModelFormatError, match=r"unexpected tensor layers\.1\.ffn\.experts\.8\.w1\.weight"):
        load_checkpoint(tmp_path, parallel=Parallel(rank=0, world_size=2))
