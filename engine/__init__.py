"""dsv4's inference engine: our own PyTorch model code for DeepSeek-V4 and the embedded `mini`.

Importing this package must not import torch: the CLI imports the tokenizer and paths
from here for `dsv4 pack`. Heavy modules are imported inside the functions that need them.
"""

from __future__ import annotations

from engine.errors import ContextOverflow, EngineError, FetchError, ModelFormatError, ModelNotFound

__all__ = ["ContextOverflow", "EngineError", "FetchError", "ModelFormatError", "ModelNotFound"]
