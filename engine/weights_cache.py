"""Prepared weights on disk: the converted tensors of a GGUF, so later loads skip conversion.

Converting SmolLM2's Q4_1 file (int4 repacking, two-level int8 embedding) takes seconds;
reading the converted tensors back from a safetensors file takes a tenth of that.

    <home>/cache/weights/<source>-<key>.safetensors

`source` names the GGUF path (so a replaced file's old entry is pruned); `key` digests the
GGUF's identity (size, mtime and the first and last MiB: cheap, unlike a full sha256), the
weight mode, this format's version, the torch version (the int4 pack's layout is private to
torch's kernel) and the source of the modules that compute the tensors (an edit there may
change them). Writes are atomic (temp file, fsync, rename). Any unreadable or mismatched
entry reads as a miss, and a failed write is ignored: the cache only ever costs a rebuild.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from engine import paths

FORMAT_VERSION = 1
_EDGE_BYTES = 1 << 20
_SUFFIX = ".safetensors"


def cache_root() -> Path:
    return paths.cache_dir() / "weights"


def gguf_identity(path: Path) -> str:
    """Size, mtime and the first and last MiB: changes whenever the file is replaced or edited
    in place by any ordinary means, at the cost of reading 2 MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(max(0, stat.st_size - _EDGE_BYTES))
        digest.update(handle.read(_EDGE_BYTES))
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _code_digest() -> str:
    from engine import gguf_weights, llama, quant

    digest = hashlib.sha256(f"weights-{FORMAT_VERSION}-torch-{torch.__version__}".encode())
    for module in (quant, gguf_weights, llama):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _source_tag(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def entry_path(gguf_path: Path, mode: str) -> Path:
    key = hashlib.sha256(f"{gguf_identity(gguf_path)}:{mode}:{_code_digest()}".encode()).hexdigest()[:32]
    return cache_root() / f"{_source_tag(gguf_path)}-{mode}-{key}{_SUFFIX}"


def read(entry: Path) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """The entry's tensors and metadata, or None when it is absent or unreadable."""
    if not entry.is_file():
        return None
    try:
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(entry), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            for name in handle.keys():
                # A copy: the file's tensors sit at 8-byte offsets, and torch's int8/int4
                # kernels fault on such misaligned weights (seen as random segfaults).
                tensors[name] = handle.get_tensor(name).clone()
    except Exception:  # a torn or foreign file: a miss, never an error
        return None
    if metadata.get("format_version") != str(FORMAT_VERSION):
        return None
    return tensors, metadata


def write(entry: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bool:
    """Atomically publish an entry and prune this GGUF path's older entries for the mode;
    returns False (and leaves no partial file) when the cache cannot be written."""
    from safetensors.torch import save_file

    temp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".partial-", suffix=_SUFFIX, dir=entry.parent)
        os.close(fd)
        temp = Path(name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata={**metadata, "format_version": str(FORMAT_VERSION)})
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, entry)
        temp = None
        _fsync_dir(entry.parent)
        prefix = entry.name.rsplit("-", 1)[0] + "-"
        for old in entry.parent.glob(prefix + "*" + _SUFFIX):
            if old != entry:
                with contextlib.suppress(OSError):
                    old.unlink()
        return True
    except (OSError, RuntimeError, ValueError):
        return False
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                temp.unlink()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def encode_layers(layers: dict[str, str]) -> str:
    return json.dumps(layers, sort_keys=True)


def decode_layers(text: str | None) -> dict[str, str]:
    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise ValueError("layers metadata is not a mapping")
    return {str(k): str(v) for k, v in value.items()}
