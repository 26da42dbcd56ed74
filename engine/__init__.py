"""dsv4's inference engine: our own PyTorch model code for DeepSeek-V4 and the embedded `mini`.

Importing this package must not import torch: the CLI imports the tokenizer and paths
from here for `dsv4 pack`. Heavy modules are imported inside the functions that need them.
"""

from __future__ import annotations

from engine.errors import ContextOverflow, EngineError, FetchError, ModelFormatError, ModelNotFound

__all__ = ["ContextOverflow", "EngineError", "FetchError", "ModelFormatError", "ModelNotFound", "load"]


def load(path_or_alias, *, device=None, dtype=None, quant=None, simulate=None):  # type: ignore[no-untyped-def]
    """Load a model -> engine.runtime.LoadedModel: a .gguf file, a DeepSeek-V4 checkpoint
    directory, or an alias ("mini", "flash", "pro"); the format comes from the files' own
    metadata (GGUF magic, config.json), never their names.

    GGUF: dtype "fp32"/"bf16" or quant "int8"/"int4" choose the weight mode; by default the
    fastest mode that meets the correctness bar. DeepSeek-V4: dtype is the activation dtype
    (fp32 default, or bf16); `simulate` is DeepSeek's in-model FP8/FP4 rounding (None: on
    for FP8/FP4 checkpoints, off for bf16/fp32); `device` None means cuda when available.
    Imports torch, so only on call.
    """
    from engine.runtime import load as _load

    return _load(path_or_alias, device=device, dtype=dtype, quant=quant, simulate=simulate)
