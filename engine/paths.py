"""Where dsv4 keeps its state: one home directory, nothing else.

`DSV4_HOME` overrides the platform's user data directory. Below it:
models/, cache/ (prefix KV cache, token counts, conversions), config/, logs/.
This module must stay import-light: the CLI calls it without loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    override = os.environ.get("DSV4_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("dsv4", appauthor=False))


def models_dir() -> Path:
    return home_dir() / "models"


def cache_dir() -> Path:
    return home_dir() / "cache"


def weights_cache_dir() -> Path:
    """Prepared (converted) weights, rebuilt from the model files whenever missing."""
    return cache_dir() / "weights"


def weights_cache_files() -> list[Path]:
    directory = weights_cache_dir()
    return sorted(directory.glob("*.safetensors")) if directory.is_dir() else []


def config_dir() -> Path:
    return home_dir() / "config"


def logs_dir() -> Path:
    return home_dir() / "logs"
