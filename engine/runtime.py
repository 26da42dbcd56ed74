"""A loaded model: weights, tokenizer and the generation entry points the CLI and tests use.

`load()` picks the weight mode: `quant` ("int4", "int8") or `dtype` ("fp32"/"bf16" or the
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
from engine.generate import stream as generate_stream
from engine.gguf_file import GGUFFile
from engine.gguf_weights import MODES, build_llama
from engine.kv_state import KVState
from engine.llama import Llama

DEFAULT_MODE = "int4"


class LoadedModel:
    def __init__(self, model: Llama, tokenizer: Any, *, name: str, arch: str, mode: str, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.arch = arch
        self.mode = mode
        self.path = path
        self.context_length = model.args.context_length

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, arch={self.arch!r}, mode={self.mode!r}, context={self.context_length})"

    def new_state(self) -> KVState:
        return self.model.new_state()

    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, T, vocab] for token_ids [B, T], from an empty state. Outside fp32
        mode the 32 highest per position are exact and the rest come from the coarse int8
        head pass (within ~0.1)."""
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
        state: KVState | None = None,
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


def load(path_or_alias: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None, quant: str | None = None) -> LoadedModel:
    if str(device) != "cpu":
        raise EngineError(f"device {device!r} is not supported by the embedded engine", "use device='cpu'")
    mode = resolve_mode(dtype, quant)
    path = Path(path_or_alias).expanduser()
    name = path.stem
    if not (path.suffix == ".gguf" and path.is_file()):
        from engine.store import resolve_model

        ref = resolve_model(path_or_alias)
        path, name = Path(ref.path), ref.name
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelFormatError(f"{path} is not a GGUF file", "the embedded engine loads .gguf models")
    # Denormals on real text make fp32 prefill erratic and up to 5x slower.
    torch.set_flush_denormal(True)
    gguf = GGUFFile(path)
    model = build_llama(gguf, mode)
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(path)
    return LoadedModel(model, tokenizer, name=name, arch=gguf.architecture, mode=mode, path=path)
