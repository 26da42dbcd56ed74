"""config.json -> ModelArgs for the real Flash/Pro configs (spec §1) and the tiny one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4_tiny import tiny_config
from engine.deepseek_v4.config import CSA, HCA, WINDOW, ModelArgs, yarn_correction_range
from engine.errors import ModelFormatError

DATA = Path(__file__).parent / "data"


def real(name: str) -> ModelArgs:
    return ModelArgs.from_file(DATA / f"deepseek-v4-{name}-config.json")


def test_flash_layer_layout_and_size():
    a = real("flash")
    assert a.layer_kinds[:4] == (WINDOW, WINDOW, CSA, HCA)
    assert [a.n_layers_of(k) for k in (WINDOW, CSA, HCA)] == [2, 21, 20]
    assert a.compress_ratios[-1] == 0 and a.num_nextn_predict_layers == 1  # MTP is window-only
    assert a.weight_format == "fp8" and a.expert_format == "fp4" and a.weight_block_size == (128, 128)
    assert a.param_count() / 1e9 == pytest.approx(284.3, abs=0.05)


def test_pro_layer_layout_and_size():
    a = real("pro")
    assert a.layer_kinds[:3] == (HCA, HCA, CSA)
    assert [a.n_layers_of(k) for k in (WINDOW, CSA, HCA)] == [0, 30, 31]
    assert a.param_count() / 1e12 == pytest.approx(1.573, abs=0.001)


def test_yarn_range_is_derived_from_the_config():
    a = real("flash")
    assert yarn_correction_range(a) == (15, 25)
    tiny = ModelArgs.from_hf_config(tiny_config())
    assert yarn_correction_range(tiny) == (0, 2)
    no_yarn = ModelArgs.from_hf_config({**tiny_config(), "rope_scaling": None})
    assert yarn_correction_range(no_yarn) is None


def test_derived_constants_come_from_fields():
    a = real("pro")
    assert a.softmax_scale == 512**-0.5
    assert a.index_weight_scale == 128**-0.5 * 64**-0.5
    assert a.nope_head_dim == 448


def test_missing_required_fields_are_named():
    cfg = json.loads((DATA / "deepseek-v4-flash-config.json").read_text())
    del cfg["index_topk"], cfg["compress_rope_theta"]
    with pytest.raises(ModelFormatError, match="index_topk, compress_rope_theta|compress_rope_theta, index_topk"):
        ModelArgs.from_hf_config(cfg)


def test_unknown_keys_are_ignored_but_kept():
    args = ModelArgs.from_hf_config(tiny_config())
    assert args.extra["some_future_field"] == {"ignored": True}
    assert "architectures" in args.extra


def test_configs_with_and_without_mtp_load():
    with_mtp = ModelArgs.from_hf_config(tiny_config(mtp=True))
    without = ModelArgs.from_hf_config(tiny_config(mtp=False))
    assert with_mtp.num_nextn_predict_layers == 1 and len(with_mtp.compress_ratios) == 5
    assert without.num_nextn_predict_layers == 0 and len(without.compress_ratios) == 4
    assert with_mtp.layer_kinds == without.layer_kinds


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 8}, "shared-KV"),
        ({"compress_ratios": [0, 4]}, "compress_ratios"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"quantization_config": {"quant_method": "awq"}}, "awq"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "yarn"),
    ],
)
def test_unsupported_configs_are_rejected(change, message):
    with pytest.raises(ModelFormatError, match=message):
        ModelArgs.from_hf_config({**tiny_config(), **change})


def test_unreadable_config_is_a_format_error(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFormatError):
        ModelArgs.from_file(tmp_path / "config.json")
    with pytest.raises(ModelFormatError):
        ModelArgs.from_file(tmp_path / "absent.json")


def test_quantised_config_without_expert_dtype_defaults_to_fp4():
    cfg = tiny_config(quantized=True)
    del cfg["expert_dtype"]
    assert ModelArgs.from_hf_config(cfg).expert_format == "fp4"
    assert ModelArgs.from_hf_config(tiny_config()).expert_format == "dense"
