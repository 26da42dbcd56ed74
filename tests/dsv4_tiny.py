"""A tiny DeepSeek-V4 checkpoint on disk: official config.json, tensor names and formats.

The tensor table below is written from the spec (§5), independently of the model code,
so loading these files through the real loader checks the model's names and shapes.
Formats: "fp32" (everything float32), "bf16" (as a bf16 checkpoint: projections bf16,
hc/ape/sink/bias f32) and "fp8" (official: FP8 e4m3 + e8m0 block scales, FP4 experts).

Window 8 and ratios 4 (CSA) / 16 (HCA) keep sequences short; `tiny_config(sliding_window=128,
hca_ratio=128)` gives the real window and HCA ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import engine
from engine.fp8 import dequant_fp4, dequant_fp8, quantize_fp4, quantize_fp8


def tiny_config(
    *,
    quantized: bool = False,
    sliding_window: int = 8,
    hca_ratio: int = 16,
    index_topk: int = 4,
    mtp: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    layers = [0, 4, hca_ratio, 4]
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": len(layers),
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 32,
        "o_groups": 2,
        "o_lora_rank": 32,  # g*r/2 = 32: whole FP8 blocks per rank under 2-way tensor parallel
        "sliding_window": sliding_window,
        "compress_ratios": layers + ([0] if mtp else []),
        "index_n_heads": 4,
        "index_head_dim": 32,
        "index_topk": index_topk,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "num_hash_layers": 1,
        "swiglu_limit": 2.0,
        "hidden_act": "silu",
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "compress_rope_theta": 160000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        "max_position_embeddings": 4096,
        "num_nextn_predict_layers": 1 if mtp else 0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "some_future_field": {"ignored": True},
    }
    if quantized:
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": [32, 32],
            "activation_scheme": "dynamic",
        }
        cfg["expert_dtype"] = "fp4"
    cfg.update(overrides)
    return cfg


# kinds: "proj" (FP8 in the official files), "expert" (FP4), "bf16", "f32", "i64"
def official_tensors(cfg: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the checkpoint: name -> (logical shape [out, in], kind). Spec §5."""
    d, V, H, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], cfg["head_dim"]
    qr, g, orank = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    E, inter, k = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    hc = cfg["hc_mult"]
    mix = (2 + hc) * hc
    ih, ihd = cfg["index_n_heads"], cfg["index_head_dim"]
    t: dict[str, tuple[tuple[int, ...], str]] = {
        "embed.weight": ((V, d), "bf16"),
        "head.weight": ((V, d), "bf16"),
        "norm.weight": ((d,), "norm"),
        "hc_head_fn": ((hc, hc * d), "f32"),
        "hc_head_base": ((hc,), "f32"),
        "hc_head_scale": ((1,), "f32"),
    }

    def block(p: str, layer: int, ratio: int) -> None:
        t[p + "attn_norm.weight"] = ((d,), "norm")
        t[p + "ffn_norm.weight"] = ((d,), "norm")
        for part in ("attn", "ffn"):
            t[f"{p}hc_{part}_fn"] = ((mix, hc * d), "f32")
            t[f"{p}hc_{part}_base"] = ((mix,), "f32")
            t[f"{p}hc_{part}_scale"] = ((3,), "f32")
        a = p + "attn."
        t[a + "wq_a.weight"] = ((qr, d), "proj")
        t[a + "q_norm.weight"] = ((qr,), "norm")
        t[a + "wq_b.weight"] = ((H * hd, qr), "proj")
        t[a + "wkv.weight"] = ((hd, d), "proj")
        t[a + "kv_norm.weight"] = ((hd,), "norm")
        t[a + "wo_a.weight"] = ((g * orank, H * hd // g), "proj")
        t[a + "wo_b.weight"] = ((d, g * orank), "proj")
        t[a + "attn_sink"] = ((H,), "f32")
        if ratio:
            coff = 2 if ratio == 4 else 1
            c = a + "compressor."
            t[c + "wkv.weight"] = ((coff * hd, d), "bf16")
            t[c + "wgate.weight"] = ((coff * hd, d), "bf16")
            t[c + "ape"] = ((ratio, coff * hd), "f32")
            t[c + "norm.weight"] = ((hd,), "norm")
        if ratio == 4:
            i = a + "indexer."
            t[i + "wq_b.weight"] = ((ih * ihd, qr), "proj")
            t[i + "weights_proj.weight"] = ((ih, d), "bf16")
            t[i + "compressor.wkv.weight"] = ((2 * ihd, d), "bf16")
            t[i + "compressor.wgate.weight"] = ((2 * ihd, d), "bf16")
            t[i + "compressor.ape"] = ((4, 2 * ihd), "f32")
            t[i + "compressor.norm.weight"] = ((ihd,), "norm")
        f = p + "ffn."
        t[f + "gate.weight"] = ((E, d), "bf16")
        if layer < cfg["num_hash_layers"]:
            t[f + "gate.tid2eid"] = ((V, k), "i64")
        else:
            t[f + "gate.bias"] = ((E,), "f32")
        for e in range(E):
            for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
                t[f"{f}experts.{e}.{w}.weight"] = (shape, "expert")
        for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            t[f"{f}shared_experts.{w}.weight"] = (shape, "proj")

    n = cfg["num_hidden_layers"]
    for i in range(n):
        block(f"layers.{i}.", i, cfg["compress_ratios"][i])
    for j in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{j}."
        block(p, n + j, cfg["compress_ratios"][n + j])
        t[p + "e_proj.weight"] = ((d, d), "proj")
        t[p + "h_proj.weight"] = ((d, d), "proj")
        for name in ("enorm", "hnorm", "norm"):
            t[f"{p}{name}.weight"] = ((d,), "norm")
        t[p + "hc_head_fn"] = ((hc, hc * d), "f32")
        t[p + "hc_head_base"] = ((hc,), "f32")
        t[p + "hc_head_scale"] = ((1,), "f32")
    return t


def random_master(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 values for every tensor, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    out = {}
    for name, (shape, kind) in official_tensors(cfg).items():
        if kind == "i64":  # tid2eid: k distinct experts per token id
            scores = torch.rand(shape[0], cfg["n_routed_experts"], generator=gen)
            out[name] = scores.argsort(dim=1)[:, : shape[1]].contiguous()
        elif kind == "norm":
            out[name] = 1 + 0.1 * randn(*shape)
        elif name.endswith("_scale") and name.split(".")[-1].startswith("hc_"):
            out[name] = 0.5 + 0.1 * randn(*shape)
        elif name.split(".")[-1].startswith("hc_") and name.endswith("_fn"):
            out[name] = 0.1 * randn(*shape)
        elif name.split(".")[-1].startswith("hc_"):
            out[name] = 0.5 * randn(*shape)
        elif name == "embed.weight" or name.endswith("attn_sink"):
            out[name] = randn(*shape)
        elif name.endswith(("ape", "gate.bias")):
            out[name] = 0.3 * randn(*shape)
        else:
            out[name] = randn(*shape) * shape[-1] ** -0.5
    return out


def checkpoint_tensors(cfg: dict[str, Any], master: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The stored tensors for `fmt` ("fp32", "bf16", "fp8"), plus `.scale` tensors for fp8."""
    block = tuple(cfg.get("quantization_config", {}).get("weight_block_size", [128, 128]))
    out: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in official_tensors(cfg).items():
        w = master[name]
        base = name[: -len(".weight")]
        if fmt == "fp8" and kind == "proj":
            out[name], out[base + ".scale"] = quantize_fp8(w, block)
        elif fmt == "fp8" and kind == "expert":
            out[name], out[base + ".scale"] = quantize_fp4(w)
        elif kind in ("i64", "f32") or fmt == "fp32":
            out[name] = w if kind == "i64" else w.float()
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def dequantized_master(cfg: dict[str, Any], master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 values an fp8 checkpoint of `master` decodes to (bf16 rounding included)."""
    stored = checkpoint_tensors(cfg, master, "fp8")
    block = tuple(cfg["quantization_config"]["weight_block_size"])
    out = {}
    for name, (_, kind) in official_tensors(cfg).items():
        base = name[: -len(".weight")]
        if kind == "proj":
            out[name] = dequant_fp8(stored[name], stored[base + ".scale"], block)
        elif kind == "expert":
            out[name] = dequant_fp4(stored[name], stored[base + ".scale"])
        else:
            out[name] = stored[name] if kind == "i64" else stored[name].float()
    return out


def write_checkpoint(
    directory: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], n_shards: int = 3
) -> Path:
    """Write config.json, `model-0000i-of-0000n.safetensors` shards and the index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::n_shards]}
        save_file(part, str(directory / shard))
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_tiny(directory: Path, fmt: str = "fp32", seed: int = 0, **config: Any) -> Path:
    cfg = tiny_config(quantized=fmt == "fp8", **config)
    master = random_master(cfg, seed)
    return write_checkpoint(directory, cfg, checkpoint_tensors(cfg, master, fmt))


# DeepSeek-V4's tool-call marker: an added token of its own, marked special in the official
# tokenizer.json as in DeepSeek-V3.2's (sgl-project/sglang#16122), after the trained vocabulary.
DSML_TOKEN = "｜DSML｜"


def write_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json in DeepSeek's style (specials bos=0, eos=1, pad=2,
    <｜User｜>, <｜Assistant｜>, <think>, </think>, and the added token ｜DSML｜ last) that fits
    the tiny vocabulary, with a tokenizer_config.json that, like the official checkpoints'
    (spec §6), has no chat template."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from tests.tinymodels import write_tiny_hf_tokenizer

    write_tiny_hf_tokenizer(directory, style="deepseek", vocab_size=tiny_config()["vocab_size"] - 1)
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(DSML_TOKEN, special=True, normalized=False)])
    hf.save(str(directory / "tokenizer.json"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    del config["chat_template"]
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return directory


def write_tiny_model(directory: Path, fmt: str = "fp32", seed: int = 0, **config: Any) -> Path:
    """A whole tiny model directory as Hugging Face ships one: weights, config, tokenizer."""
    write_tiny(directory, fmt, seed, **config)
    return write_tokenizer(directory)


def load_tiny_model(directory: Path, fmt: str = "fp32") -> Any:
    """write_tiny_model, then the real `engine.load` on the CPU: a LoadedModel."""
    return engine.load(str(write_tiny_model(directory, fmt)), device="cpu")


class ForcedReply:
    """A tiny model with the logits of each next token forced onto a scripted reply, so the real
    generation loop, detokenizer and server produce it. Each new state (a request, a turn) starts
    the script again; `prompt` is what the last one was fed, as the model saw it."""

    def __init__(self, model: Any, reply: list[int]):
        self._model, self._reply, self.args = model, reply, model.args
        self._left: list[int] = []
        self.prompt: list[int] = []

    def new_state(self, *args: Any, **kwargs: Any) -> Any:
        self._left, self.prompt = list(self._reply), []
        return self._model.new_state(*args, **kwargs)

    def __call__(self, tokens: torch.Tensor, state: Any, output: str = "all") -> Any:
        if len(self._left) == len(self._reply):  # still prefilling
            self.prompt += tokens[0].tolist()
        logits = self._model(tokens, state, output=output)
        if output != "last":
            return logits
        forced = torch.full_like(logits, -1e9)
        forced[..., -1, self._left.pop(0)] = 0.0
        return forced
