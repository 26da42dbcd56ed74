"""What the benchmark scripts share: finding the real embedded model."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_gguf(explicit: str | None) -> Path:
    """--gguf when given, else the installed `mini` (tests/tinymodels.real_model_gguf)."""
    if explicit:
        return Path(explicit)
    sys.path.insert(0, str(ROOT))
    from tests.tinymodels import real_model_gguf

    path = real_model_gguf()
    if path is None:
        sys.exit("the real mini model is not installed: run `dsv4 pull mini` or pass --gguf PATH")
    return path
