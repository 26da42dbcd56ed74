"""A loaded model: weights, tokenizer and the generation entry points the CLI and tests use.

`load()` dispatches on the checkpoint's own metadata, never its file name: a file with the
GGUF magic is a Llama-family model (`mini`); a directory whose config.json names
DeepSeek-V4 (`model_type` or `architectures`) is loaded by engine.deepseek_v4.weights with
its tokenizer.json. Both serve the same `LoadedModel` interface.

For GGUF models `load()` picks the weight mode: `quant` ("int4", "int8") or `dtype` ("fp32"/"bf16" or the
torch dtype) when given, else DEFAULT_MODE, the fastest mode that meets the correctness
bar against llama.cpp (bench/RESULTS.md has the measurements behind the choice).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from engine.errors import EngineError, ModelFormatError
from engine.events import Event, SamplingParams
from engine.generate import Model, State
from engine.generate import stream as generate_stream
from engine.gguf_file import GGUFFile
from engine.gguf_weights import MODES, build_llama

DEFAULT_MODE = "int4"
GGUF_MAGIC = b"GGUF"
DEEPSEEK_V4_ARCH = "deepseek_v4"


class LoadedModel:
    def __init__(self, model: Model, tokenizer: Any, *, name: str, arch: str, mode: str, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.arch = arch
        self.mode = mode
        self.path = path
        self.context_length = model.args.context_length

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, arch={self.arch!r}, mode={self.mode!r}, context={self.context_length})"

    def new_state(self) -> State:
        return self.model.new_state()

    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, T, vocab] for token_ids [B, T], from an empty state. Outside fp32
        mode the 32 highest per position are exact and the rest come from the coarse int8
        head pass (within ~0.1). DeepSeek-V4 logits are always the full head in fp32."""
        if token_ids.dim() != 2:
            raise ValueError(f"token_ids must be [B, T], got shape {tuple(token_ids.shape)}")
        B, T = token_ids.shape
        state = self.model.new_state(batch=B, max_len=T)
        return self.model(token_ids.long(), state)

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        state: State | None = None,
        cached_tokens: int = 0,
        prefill_chunk: int = 512,
        cancel: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        return generate_stream(
            self.model,
            self.tokenizer,
            list(prompt_ids),
            params,
            state=state,
            cached_tokens=cached_tokens,
            prefill_chunk=prefill_chunk,
            cancel=cancel,
            model_name=self.name,
        )

    def chat(self, messages: Sequence[dict[str, Any]], params: SamplingParams, **kwargs: Any) -> Iterator[Event]:
        return self.stream(self.tokenizer.render_chat(list(messages)), params, **kwargs)


def int4_kernel_works() -> bool:
    """Whether this torch build runs the CPU int4 kernel (the default mode needs it)."""
    from engine.quant import Int4Linear

    try:
        layer = Int4Linear.from_float(torch.ones(32, 32))
        return bool(torch.isfinite(layer(torch.ones(1, 32))).all())
    except (RuntimeError, NotImplementedError):
        return False


def resolve_mode(dtype: Any = None, quant: str | None = None) -> str:
    if quant not in (None, "none"):
        if quant not in ("int4", "int8"):
            raise EngineError(f"unknown quantisation {quant!r}", "use int4 or int8")
        return quant
    if dtype is None:
        if quant is not None:
            return "fp32"
        # Without the int4 kernel, bf16 is the next mode that meets the bar (bench/RESULTS.md).
        return DEFAULT_MODE if DEFAULT_MODE != "int4" or int4_kernel_works() else "bf16"
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", "float32": "fp32", "bfloat16": "bf16", "fp32": "fp32", "bf16": "bf16"}
    if dtype not in names:
        raise EngineError(f"unsupported dtype {dtype!r}", f"use one of {', '.join(m for m in MODES if m.startswith(('fp', 'bf')))}")
    return names[dtype]


def load(
    path_or_alias: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: Any = None,
    quant: str | None = None,
    simulate: bool | None = None,
) -> LoadedModel:
    """A .gguf file, a DeepSeek-V4 checkpoint directory, or an alias (mini, flash, pro).

    `simulate` (DeepSeek-V4 only): DeepSeek's in-model FP8/FP4 rounding; None = on for
    FP8/FP4 checkpoints, off for bf16/fp32 ones. `device`: None = cuda when available for
    DeepSeek-V4, cpu for GGUF models (whose engine is CPU-only).
    """
    from engine.store import resolve_model

    ref = resolve_model(path_or_alias)
    path, name = Path(ref.path), ref.name
    kind = checkpoint_kind(path)
    if kind == DEEPSEEK_V4_ARCH:
        return _load_deepseek_v4(path, name, device=device, dtype=dtype, quant=quant, simulate=simulate)
    if simulate is not None:
        raise EngineError("simulate applies to DeepSeek-V4 checkpoints only", f"{path.name} is a GGUF model; drop simulate")
    return _load_gguf(path, name, device=device, dtype=dtype, quant=quant)


def checkpoint_kind(path: Path) -> str:
    """"gguf" or "deepseek_v4", from the file's magic or the directory's config.json."""
    if path.is_file():
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic == GGUF_MAGIC:
            return "gguf"
        raise ModelFormatError(f"{path} is not a GGUF file (it starts with {magic!r})", "give a .gguf file or a checkpoint directory")
    from engine.deepseek_v4.chat import is_deepseek_v4_config, read_config

    config = read_config(path)
    if is_deepseek_v4_config(config):
        return DEEPSEEK_V4_ARCH
    found = f"model_type {config.get('model_type')!r}, architectures {config.get('architectures')!r}" if config else "no readable config.json"
    raise ModelFormatError(
        f"{path} is not a checkpoint this engine runs ({found})",
        "directories must hold a DeepSeek-V4 checkpoint; other models load from a .gguf file",
    )


def _load_gguf(path: Path, name: str, *, device: str | None, dtype: Any, quant: str | None) -> LoadedModel:
    if device is not None and str(device) != "cpu":
        raise EngineError(f"device {device!r} is not supported by the embedded engine", "use device='cpu'")
    mode = resolve_mode(dtype, quant)
    # Denormals on real text make fp32 prefill erratic and up to 5x slower.
    torch.set_flush_denormal(True)
    gguf = GGUFFile(path)
    model = build_llama(gguf, mode)
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(path)
    return LoadedModel(model, tokenizer, name=name, arch=gguf.architecture, mode=mode, path=path)


_DSV4_DTYPES = {None: torch.float32, "fp32": torch.float32, "float32": torch.float32, torch.float32: torch.float32,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16}


def _load_deepseek_v4(
    path: Path, name: str, *, device: str | None, dtype: Any, quant: str | None, simulate: bool | None
) -> LoadedModel:
    from engine.deepseek_v4.chat import tokenizer_for
    from engine.deepseek_v4.weights import load_checkpoint

    if quant not in (None, "none"):
        raise EngineError(
            f"quant={quant!r} does not apply to DeepSeek-V4", "its weights run in the checkpoint's own FP8/FP4/bf16 formats"
        )
    if dtype not in _DSV4_DTYPES:
        raise EngineError(f"unsupported dtype {dtype!r} for DeepSeek-V4", "use fp32 or bf16 (the activation dtype)")
    compute = _DSV4_DTYPES[dtype]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = load_checkpoint(path, simulate=simulate, dtype=compute, device=device)
    tokenizer = tokenizer_for(path)
    args = checkpoint.args
    if tokenizer.vocab_size > args.vocab_size:
        raise ModelFormatError(
            f"{path}: tokenizer.json has {tokenizer.vocab_size:,} ids but the model only {args.vocab_size:,}",
            "the tokenizer does not belong to these weights",
        )
    # The mode names everything that changes the numbers (the prefix cache keys on it).
    weights = args.weight_format if args.weight_format == "dense" else f"{args.weight_format}-{args.expert_format}"
    mode = f"{weights}/{str(compute).removeprefix('torch.')}" + ("/simulated" if checkpoint.simulate else "")
    return LoadedModel(checkpoint.model, tokenizer, name=name, arch=DEEPSEEK_V4_ARCH, mode=mode, path=path)
