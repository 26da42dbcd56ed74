"""DeepSeek-V4 hyperparameters: the official Hugging Face `config.json` as one dataclass.

Field names are the shipped ones (`compress_ratios`, `index_topk`, `hc_mult`, ...), so a
config file maps onto `ModelArgs` one key at a time. Unknown keys are ignored (later
releases add fields); a missing required key is a `ModelFormatError` naming every missing
key. Everything the model needs is a named field or derived from one here; the model code
never infers behaviour from a dimension.

Torch-free on purpose: the CLI may read a config without loading the engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelFormatError

# Layer kinds, by compress ratio (spec §2): 0 = sliding window only, 4 = CSA (overlapping
# compressor + lightning indexer), any other ratio = HCA (plain compressor, dense).
WINDOW, CSA, HCA = "window", "csa", "hca"
CSA_RATIO = 4


@dataclass(frozen=True)
class ModelArgs:
    # --- required: these define the architecture; no safe default exists ---
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    hc_mult: int
    # The reference ModelArgs defaults this to 40000 while both shipped configs say
    # 160000 (spec §8.5), so a config without it is ambiguous: required.
    compress_rope_theta: float
    # --- optional, with the reference code's defaults ---
    num_key_value_heads: int = 1
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_hash_layers: int = 0
    swiglu_limit: float = 0.0  # 0 = no clamp
    hidden_act: str = "silu"
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict[str, Any] | None = None
    expert_dtype: str | None = None
    model_type: str = "deepseek_v4"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---------- construction ----------

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in config]
        if missing:
            raise ModelFormatError(
                f"config.json lacks required DeepSeek-V4 fields: {', '.join(missing)}",
                hint="use the config.json shipped with the checkpoint",
            )
        known = {k: v for k, v in config.items() if k in fields}
        known["compress_ratios"] = tuple(int(r) for r in known["compress_ratios"])
        extra = {k: v for k, v in config.items() if k not in fields}
        args = cls(**known, extra=extra)
        args.validate()
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"cannot read {path}: {exc}", hint="is this a checkpoint directory?") from exc
        if not isinstance(config, dict):
            raise ModelFormatError(f"{path} is not a JSON object")
        return cls.from_hf_config(config)

    def validate(self) -> None:
        def bad(msg: str) -> ModelFormatError:
            return ModelFormatError(f"unsupported DeepSeek-V4 config: {msg}")

        if self.num_key_value_heads != 1:
            raise bad(f"num_key_value_heads={self.num_key_value_heads} (V4 attention is shared-KV MQA)")
        if len(self.compress_ratios) < self.num_hidden_layers + self.num_nextn_predict_layers:
            raise bad(
                f"compress_ratios has {len(self.compress_ratios)} entries for "
                f"{self.num_hidden_layers} layers + {self.num_nextn_predict_layers} MTP layers"
            )
        if any(r < 0 for r in self.compress_ratios):
            raise bad("negative compress ratio")
        if self.head_dim <= self.qk_rope_head_dim or self.qk_rope_head_dim % 2:
            raise bad("head_dim must exceed an even qk_rope_head_dim")
        if self.index_head_dim <= self.qk_rope_head_dim:
            raise bad("index_head_dim must exceed qk_rope_head_dim (RoPE covers its last dims)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise bad("o_groups must divide the attention output")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise bad(f"scoring_func={self.scoring_func!r}")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act={self.hidden_act!r}")
        if self.n_shared_experts != 1:
            raise bad(f"n_shared_experts={self.n_shared_experts} (the reference supports exactly 1)")
        if self.tie_word_embeddings:
            raise bad("tied embeddings (V4 ships an untied head)")
        if self.weight_format not in ("fp8", "dense"):
            raise bad(f"quantization method {self.weight_format!r}")
        if self.expert_format not in ("fp4", "fp8", "dense"):
            raise bad(f"expert_dtype={self.expert_dtype!r}")
        if self.rope_scaling is not None and self.rope_scaling.get("type", self.rope_scaling.get("rope_type")) != "yarn":
            raise bad(f"rope_scaling {self.rope_scaling!r} (only yarn is known for V4)")

    # ---------- derived ----------

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Kind of each main layer (MTP layers excluded)."""
        return tuple(self.layer_kind(i) for i in range(self.num_hidden_layers))

    def layer_kind(self, layer_id: int) -> str:
        ratio = self.compress_ratios[layer_id]
        if ratio == 0:
            return WINDOW
        return CSA if ratio == CSA_RATIO else HCA

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def weight_format(self) -> str:
        """'fp8' when the non-expert projections ship as FP8 block-scaled, else 'dense'."""
        if not self.quantization_config:
            return "dense"
        return str(self.quantization_config.get("quant_method", "fp8"))

    @property
    def expert_format(self) -> str:
        if self.weight_format == "dense":
            return "dense"
        # vLLM defaults a quantised config without expert_dtype to fp4 (spec §8.3).
        return self.expert_dtype or "fp4"

    @property
    def weight_block_size(self) -> tuple[int, int]:
        block = (self.quantization_config or {}).get("weight_block_size", [128, 128])
        return int(block[0]), int(block[1])

    @property
    def is_quantized(self) -> bool:
        return self.weight_format != "dense"

    @property
    def yarn(self) -> tuple[float, int, float, float] | None:
        """(factor, original_max_position_embeddings, beta_fast, beta_slow) or None."""
        if not self.rope_scaling:
            return None
        s = self.rope_scaling
        return (
            float(s.get("factor", 1.0)),
            int(s.get("original_max_position_embeddings", 0)),
            float(s.get("beta_fast", 32)),
            float(s.get("beta_slow", 1)),
        )

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def index_weight_scale(self) -> float:
        return self.index_head_dim**-0.5 * self.index_n_heads**-0.5

    def n_layers_of(self, kind: str) -> int:
        return sum(1 for k in self.layer_kinds if k == kind)

    def param_count(self) -> int:
        """Parameters of the main model (no MTP), counted from the shapes in spec §5."""
        d, v, h, hd = self.hidden_size, self.vocab_size, self.num_attention_heads, self.head_dim
        hc = self.hc_mult
        mix = (2 + hc) * hc
        total = 2 * v * d + d + hc * hc * d + hc + 1
        inter = self.moe_intermediate_size
        for i in range(self.num_hidden_layers):
            kind = self.layer_kind(i)
            n = 2 * d + 2 * (mix * hc * d + mix + 3)
            n += self.q_lora_rank * d + h * hd * self.q_lora_rank + hd * d
            n += self.o_groups * self.o_lora_rank * (h * hd // self.o_groups) + d * self.o_groups * self.o_lora_rank
            n += self.q_lora_rank + hd + h
            if kind != WINDOW:
                ratio = self.compress_ratios[i]
                coff = 2 if kind == CSA else 1
                n += 2 * coff * hd * d + ratio * coff * hd + hd
            if kind == CSA:
                ihd = self.index_head_dim
                n += self.index_n_heads * ihd * self.q_lora_rank + self.index_n_heads * d
                n += 2 * 2 * ihd * d + CSA_RATIO * 2 * ihd + ihd
            n += self.n_routed_experts * d + (self.n_routed_experts if i >= self.num_hash_layers else 0)
            n += (self.n_routed_experts + 1) * 3 * d * inter
            total += n
        return total


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def yarn_correction_range(args: ModelArgs) -> tuple[int, int] | None:
    """YaRN's ramp over the rotary frequencies of compressed layers (DeepSeek-V3 formula)."""
    if args.yarn is None:
        return None
    _, original, beta_fast, beta_slow = args.yarn
    if original <= 0:
        return None
    dim, base = args.qk_rope_head_dim, args.compress_rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)
