"""dsv4's inference engine: our own PyTorch model code for DeepSeek-V4 and the embedded `mini`.

Importing this package must not import torch: the CLI imports the tokenizer and paths
from here for `dsv4 pack`. Heavy modules are imported inside the functions that need them.
"""

from __future__ import annotations

from engine.errors import ContextOverflow, EngineError, FetchError, ModelFormatError, ModelNotFound

__all__ = ["ContextOverflow", "EngineError", "FetchError", "ModelFormatError", "ModelNotFound", "load"]


def load(path_or_alias, *, device="cpu", dtype=None, quant=None):  # type: ignore[no-untyped-def]
    """Load a model (a .gguf path or an alias such as "mini") -> engine.runtime.LoadedModel.

    dtype "fp32"/"bf16" or quant "int8"/"int4" choose the weight mode; by default the
    fastest mode that meets the correctness bar. Imports torch, so only on call.
    """
    from engine.runtime import load as _load

    return _load(path_or_alias, device=device, dtype=dtype, quant=quant)
