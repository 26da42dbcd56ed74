"""GGUF tensors -> our Llama modules, in one of the weight modes.

The architecture comes from `general.architecture`, never from a file name. Loading is
strict: every expected tensor must be present with its expected shape, and any tensor left
over is an error, each naming the tensor. Weights are converted one tensor at a time (big
ones in row chunks) so that no whole-model fp32 copy ever exists; in "int4" mode Q4_1
blocks are repacked into the int4 kernel's format without passing through floats.

Modes: "fp32", "bf16" (dense weights in that dtype), "int8" (per-channel int8 weights),
"int4" (group-wise int4 weights; embedding and LM head int8). Q/K rows keep llama.cpp's
permutation; the model rotates adjacent pairs to match (see engine/llama.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from torch import Tensor

from engine import weights_cache
from engine.errors import ModelFormatError
from engine.gguf_file import GGUFFile, GGUFTensor
from engine.llama import Attention, Block, FeedForward, Llama, LlamaArgs, RMSNorm
from engine.quant import DenseLinear, Int4Linear, Int8Linear, QuantLinear, int4_quantize, int8_quantize_levels, layer_from_exported, q4_1_unpack, q8_0_dequantize, q8_0_unpack

MODES = ("fp32", "bf16", "int8", "int4")
SUPPORTED_ARCHITECTURES = ("llama",)
_ROW_CHUNK = 4096  # rows dequantised at a time: bounds the fp32 temporaries of big tensors


def llama_args_from_gguf(gguf: GGUFFile) -> LlamaArgs:
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"{gguf.path.name}: architecture {arch!r} (general.architecture) is not supported by the embedded engine",
            f"use a GGUF of architecture {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    dim = int(gguf.arch_param("embedding_length"))
    n_heads = int(gguf.arch_param("attention.head_count"))
    n_kv_heads = int(gguf.arch_param("attention.head_count_kv", n_heads))
    head_dim = int(gguf.arch_param("attention.key_length", dim // n_heads))
    rope_dims = int(gguf.arch_param("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelFormatError(f"{gguf.path.name}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    if gguf.arch_param("rope.scaling.type", "none") not in ("none", None):
        raise ModelFormatError(f"{gguf.path.name}: RoPE scaling {gguf.arch_param('rope.scaling.type')!r} is not supported")
    embd = gguf.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFormatError(f"{gguf.path.name}: missing tensor 'token_embd.weight'")
    return LlamaArgs(
        vocab_size=int(embd.shape[0]),
        dim=dim,
        n_layers=int(gguf.arch_param("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=int(gguf.arch_param("feed_forward_length")),
        norm_eps=float(gguf.arch_param("attention.layer_norm_rms_epsilon")),
        rope_theta=float(gguf.arch_param("rope.freq_base", 10000.0)),
        context_length=int(gguf.arch_param("context_length")),
        rope_interleaved=True,
    )


def expected_shapes(args: LlamaArgs, tied: bool) -> dict[str, tuple[int, ...]]:
    E, F, D = args.dim, args.ffn_dim, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (args.vocab_size, E), "output_norm.weight": (E,)}
    if not tied:
        shapes["output.weight"] = (args.vocab_size, E)
    for i in range(args.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (E,),
            p + "attn_q.weight": (args.n_heads * D, E),
            p + "attn_k.weight": (args.n_kv_heads * D, E),
            p + "attn_v.weight": (args.n_kv_heads * D, E),
            p + "attn_output.weight": (E, args.n_heads * D),
            p + "ffn_norm.weight": (E,),
            p + "ffn_gate.weight": (F, E),
            p + "ffn_up.weight": (F, E),
            p + "ffn_down.weight": (E, F),
        })
    return shapes


def check_tensors(gguf: GGUFFile, args: LlamaArgs) -> bool:
    """Strict name and shape check; returns whether the LM head is tied to the embedding."""
    tied = "output.weight" not in gguf.tensors
    want = expected_shapes(args, tied)
    for name, shape in want.items():
        t = gguf.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{gguf.path.name}: missing tensor {name!r}", "the GGUF is incomplete or not a Llama checkpoint")
        if tuple(t.shape) != shape:
            raise ModelFormatError(f"{gguf.path.name}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    extra = sorted(set(gguf.tensors) - set(want))
    if extra:
        raise ModelFormatError(f"{gguf.path.name}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), "this Llama variant is not supported")
    return tied


def _raw(t: GGUFTensor) -> Tensor:
    return torch.from_numpy(np.array(t.data))  # copy: the memory map is read-only


def dequantize_rows(t: GGUFTensor, lo: int, hi: int) -> Tensor:
    """fp32 rows lo..hi of a tensor ([N, K] or [N])."""
    if t.ggml_type == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(t.data[lo:hi], dtype=np.float32))
    if t.ggml_type == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(t.data[lo:hi], dtype=np.float32))
    chunk = torch.from_numpy(np.array(t.data[lo:hi]))
    if t.ggml_type == GGMLQuantizationType.Q8_0:
        return q8_0_dequantize(*q8_0_unpack(chunk))
    if t.ggml_type == GGMLQuantizationType.Q4_1:
        q, scale, minimum = q4_1_unpack(chunk)
        n, k = q.shape
        return (q.float().view(n, -1, 32) * scale[..., None] + minimum[..., None]).view(n, k)
    from gguf.quants import dequantize

    return torch.from_numpy(np.asarray(dequantize(t.data[lo:hi], t.ggml_type), dtype=np.float32).reshape(hi - lo, -1))


def dequantize_to(t: GGUFTensor, dtype: torch.dtype) -> Tensor:
    rows = t.shape[0]
    if len(t.shape) == 1:
        return dequantize_rows(t, 0, rows).to(dtype)
    out = torch.empty(t.shape, dtype=dtype)
    for lo in range(0, rows, _ROW_CHUNK):
        hi = min(rows, lo + _ROW_CHUNK)
        out[lo:hi] = dequantize_rows(t, lo, hi)
    return out


def _int8_parts(t: GGUFTensor, levels: int = 1) -> tuple[Tensor, Tensor]:
    """Per-channel int8 of a tensor, chunk by chunk into preallocated outputs; with 2 levels
    the rows are ordered [all first-level rows; all second-level rows] as Int8Linear expects."""
    rows, cols = t.shape
    q = torch.empty(levels, rows, cols, dtype=torch.int8)
    scale = torch.empty(levels, rows, dtype=torch.float32)
    for lo in range(0, rows, _ROW_CHUNK):
        hi = min(rows, lo + _ROW_CHUNK)
        ql, sl = int8_quantize_levels(dequantize_rows(t, lo, hi), levels)
        q[:, lo:hi] = ql.view(levels, hi - lo, cols)
        scale[:, lo:hi] = sl.view(levels, hi - lo)
    return q.view(levels * rows, cols), scale.view(-1)


def _int4_parts(t: GGUFTensor) -> tuple[Tensor, Tensor, Tensor]:
    if t.ggml_type == GGMLQuantizationType.Q4_1:
        return q4_1_unpack(_raw(t))  # exact: Q4_1 is the kernel's format with another zero point
    return int4_quantize(dequantize_to(t, torch.float32))


def make_linear(mode: str, parts: list[GGUFTensor]) -> QuantLinear:
    """One layer from tensors whose rows are stacked (fused Q/K/V, gate/up)."""
    if mode in ("fp32", "bf16"):
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        return DenseLinear(torch.cat([dequantize_to(t, dtype) for t in parts]))
    if mode == "int8":
        qs, scales = zip(*(_int8_parts(t) for t in parts))
        return Int8Linear(torch.cat(qs), torch.cat(scales))
    if mode == "int4":
        if all(t.ggml_type == GGMLQuantizationType.Q4_1 for t in parts):
            # One copy of the raw blocks (the memory map is read-only), no unpacked temporaries.
            return Int4Linear.from_q4_1(torch.from_numpy(np.concatenate([np.asarray(t.data) for t in parts])))
        q, scale, minimum = (torch.cat(x) for x in zip(*(_int4_parts(t) for t in parts)))
        return Int4Linear(q, scale, minimum)
    raise ValueError(f"unknown weight mode {mode!r}; choose one of {MODES}")


def make_embedding(mode: str, t: GGUFTensor) -> QuantLinear:
    """Exact rows of the embedding (or of an untied head): two-level int8 in the quantised
    modes (int4 packs cannot be read by row; one level blurs Q8_0's per-32 scales)."""
    if mode in ("int8", "int4"):
        return Int8Linear(*_int8_parts(t, levels=2), levels=2)
    return make_linear(mode, [t])


def make_head(mode: str, rows: QuantLinear) -> QuantLinear:
    """The layer that computes all logits. Outside fp32 it is a coarse one-level int8 pass
    (a 49k x 576 bf16 GEMV reads 56 MB per token: 7 ms, against 0.7 ms for int8); the model
    recomputes the top candidates exactly from `rows`."""
    if mode == "fp32":
        return rows
    if isinstance(rows, Int8Linear):
        return rows.first_level()
    return Int8Linear.from_float(rows.dequantize())


def make_head_few_rows(mode: str, rows: QuantLinear) -> QuantLinear | None:
    """In "int4" mode, the logits pass for decode: group-wise int4 of the exact rows, half
    the one-level int8's 28 MB per token (1.7 -> 1.0 ms on one core). The model recomputes
    its top candidates exactly, as for the int8 pass, so a greedy token can change only if
    the best one falls outside the coarse top 32. Converted a row chunk at a time. None
    in other modes, and when the vocabulary is not a multiple of 16 (the kernel packs rows
    in sixteens)."""
    if mode != "int4" or rows.out_features % 16:
        return None
    n = rows.out_features
    return Int4Linear.stacked([Int4Linear.from_float(rows.rows(torch.arange(lo, min(n, lo + _ROW_CHUNK)))) for lo in range(0, n, _ROW_CHUNK)])


def build_llama(gguf: GGUFFile, mode: str, progress: Callable[[int, int], None] | None = None, *, use_cache: bool = True) -> Llama:
    """The model in `mode`. With `use_cache`, converted weights come from (or go to) the
    prepared-weights cache (engine/weights_cache.py): a hit skips conversion entirely."""
    if mode not in MODES:
        raise ValueError(f"unknown weight mode {mode!r}; choose one of {MODES}")
    args = llama_args_from_gguf(gguf)
    tied = check_tensors(gguf, args)
    entry = None
    if use_cache:
        try:
            entry = weights_cache.entry_path(gguf.path, mode)
        except OSError:
            entry = None
    if entry is not None:
        cached = weights_cache.read(entry)
        if cached is not None:
            try:
                model = _model_from_tensors(args, tied, mode, *cached)
            except (KeyError, ValueError, RuntimeError, TypeError):
                model = None
            if model is not None:
                if progress:
                    progress(args.n_layers, args.n_layers)
                return model
    model = _convert(gguf, args, tied, mode, progress)
    if entry is not None:
        weights_cache.write(entry, *_model_tensors(model, tied, mode))
    return model


def _convert(gguf: GGUFFile, args: LlamaArgs, tied: bool, mode: str, progress: Callable[[int, int], None] | None) -> Llama:
    T = gguf.tensors
    embedding = make_embedding(mode, T["token_embd.weight"])
    head_rows = embedding if tied else make_embedding(mode, T["output.weight"])
    head = make_head(mode, head_rows)
    head_few_rows = make_head_few_rows(mode, head_rows)
    blocks = []
    for i in range(args.n_layers):
        p = f"blk.{i}."
        attn = Attention(args, make_linear(mode, [T[p + "attn_q.weight"], T[p + "attn_k.weight"], T[p + "attn_v.weight"]]), make_linear(mode, [T[p + "attn_output.weight"]]))
        ffn = FeedForward(make_linear(mode, [T[p + "ffn_gate.weight"], T[p + "ffn_up.weight"]]), make_linear(mode, [T[p + "ffn_down.weight"]]))
        norm = lambda name: RMSNorm(dequantize_to(T[p + name], torch.float32), args.norm_eps)  # noqa: E731
        blocks.append(Block(args, norm("attn_norm.weight"), attn, norm("ffn_norm.weight"), ffn))
        if progress:
            progress(i + 1, args.n_layers)
    norm = RMSNorm(dequantize_to(T["output_norm.weight"], torch.float32), args.norm_eps)
    return Llama(args, embedding, blocks, norm, head, head_rows, head_few_rows).eval()


def _head_is_derived(mode: str, head_rows: QuantLinear) -> bool:
    """Whether make_head(mode, head_rows) is free (the rows themselves or a view of them),
    so the cache need not store the head."""
    return mode == "fp32" or isinstance(head_rows, Int8Linear)


def _model_tensors(model: Llama, tied: bool, mode: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every converted tensor of the model, flat, and the metadata that rebuilds it."""
    layers: dict[str, QuantLinear] = {"embedding": model.embedding}
    if not tied:
        layers["head_rows"] = model.head_rows
    if not _head_is_derived(mode, model.head_rows):
        layers["head"] = model.head
    if model.head_few_rows is not None:
        layers["head_few_rows"] = model.head_few_rows
    for i, block in enumerate(model.blocks):
        layers.update({f"blk.{i}.wqkv": block.attn.wqkv, f"blk.{i}.wo": block.attn.wo, f"blk.{i}.gate_up": block.ffn.w_gate_up, f"blk.{i}.down": block.ffn.w_down})
    tensors: dict[str, Tensor] = {}
    kinds: dict[str, str] = {}
    for name, layer in layers.items():
        kinds[name], parts = layer.exported()
        tensors.update({f"{name}.{field}": value for field, value in parts.items()})
    for i, block in enumerate(model.blocks):
        tensors[f"blk.{i}.attn_norm"] = block.attn_norm.weight.data
        tensors[f"blk.{i}.ffn_norm"] = block.ffn_norm.weight.data
    tensors["norm"] = model.norm.weight.data
    return tensors, {"mode": mode, "layers": weights_cache.encode_layers(kinds)}


def _model_from_tensors(args: LlamaArgs, tied: bool, mode: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Llama:
    """Inverse of _model_tensors, checking every shape against the GGUF's (ValueError/KeyError)."""
    if metadata.get("mode") != mode:
        raise ValueError("cache entry is for another mode")
    kinds = weights_cache.decode_layers(metadata.get("layers"))
    used: set[str] = set()

    def layer(name: str, out_features: int, in_features: int) -> QuantLinear:
        prefix = name + "."
        parts = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        used.update(prefix + key for key in parts)
        built = layer_from_exported(kinds[name], parts)
        if (built.out_features, built.in_features) != (out_features, in_features):
            raise ValueError(f"cached layer {name} has shape {(built.out_features, built.in_features)}")
        return built

    def norm(name: str) -> RMSNorm:
        used.add(name)
        if tensors[name].shape != (args.dim,) or tensors[name].dtype != torch.float32:
            raise ValueError(f"cached norm {name} has the wrong shape")
        return RMSNorm(tensors[name], args.norm_eps)

    E, D, V = args.dim, args.head_dim, args.vocab_size
    embedding = layer("embedding", V, E)
    head_rows = embedding if tied else layer("head_rows", V, E)
    head = make_head(mode, head_rows) if _head_is_derived(mode, head_rows) else layer("head", V, E)
    head_few_rows = layer("head_few_rows", V, E) if "head_few_rows" in kinds else None
    blocks = []
    for i in range(args.n_layers):
        p = f"blk.{i}."
        attn = Attention(args, layer(p + "wqkv", (args.n_heads + 2 * args.n_kv_heads) * D, E), layer(p + "wo", E, args.n_heads * D))
        ffn = FeedForward(layer(p + "gate_up", 2 * args.ffn_dim, E), layer(p + "down", E, args.ffn_dim))
        blocks.append(Block(args, norm(p + "attn_norm"), attn, norm(p + "ffn_norm"), ffn))
    final_norm = norm("norm")
    if used != set(tensors):
        raise ValueError("cache entry holds unexpected tensors")
    expected_kind = {"fp32": "dense", "bf16": "dense", "int8": "int8x1", "int4": "int4"}[mode]
    if blocks and blocks[0].attn.wqkv.exported()[0] != expected_kind:
        raise ValueError("cache entry holds another weight format")
    return Llama(args, embedding, blocks, final_norm, head, head_rows, head_few_rows).eval()
