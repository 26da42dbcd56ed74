"""Prepared weights on disk: the converted tensors of a GGUF, so later loads skip conversion.

Converting SmolLM2's Q4_1 file (int4 repacking, two-level int8 embedding) takes seconds;
reading the converted tensors back (one sequential read) takes about a tenth of a second.

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
from engine.atomic_files import fsync_dir

FORMAT_VERSION = 1
_EDGE_BYTES = 1 << 20
_SUFFIX = ".safetensors"


def cache_root() -> Path:
    return paths.weights_cache_dir()


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
    from engine import gguf_weights, quant

    digest = hashlib.sha256(f"weights-{FORMAT_VERSION}-torch-{torch.__version__}".encode())
    for module in (quant, gguf_weights):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _source_tag(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def entry_path(gguf_path: Path, mode: str) -> Path:
    key = hashlib.sha256(f"{gguf_identity(gguf_path)}:{mode}:{_code_digest()}".encode()).hexdigest()[:32]
    return cache_root() / f"{_source_tag(gguf_path)}-{mode}-{key}{_SUFFIX}"


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}
_ALIGN = 64  # torch's int8/int4 CPU kernels fault on weights at unaligned addresses
_PAD_PREFIX = "__pad."


def read(entry: Path) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """The entry's tensors and metadata, or None when it is absent, unreadable or not what
    `write` makes. One sequential read into one aligned buffer; the tensors are views of it
    (a memory map faults page by page and, at safetensors' 8-byte offsets, misaligns)."""
    try:
        with entry.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            size = os.fstat(handle.fileno()).st_size
            if not 0 < header_len <= min(size - 8, 1 << 24) or (8 + header_len) % _ALIGN:
                return None
            header = json.loads(handle.read(header_len))
            data = torch.empty(size - 8 - header_len, dtype=torch.uint8)
            if data.numel() and handle.readinto(memoryview(data.numpy())) != data.numel():
                return None
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, spec in header.items():
            if name.startswith(_PAD_PREFIX):
                continue
            dtype = _DTYPES[spec["dtype"]]
            begin, end = (int(x) for x in spec["data_offsets"])
            shape = [int(x) for x in spec["shape"]]
            count = 1
            for dim in shape:
                count *= dim
            if begin % _ALIGN or not 0 <= begin <= end <= data.numel() or end - begin != count * dtype.itemsize:
                return None
            tensors[name] = data[begin:end].view(dtype).view(shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):  # torn or foreign: a miss
        return None
    if not isinstance(metadata, dict) or metadata.get("format_version") != str(FORMAT_VERSION):
        return None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def write(entry: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bool:
    """Atomically publish an entry and prune this GGUF path's older entries for the mode;
    returns False (and leaves no partial file) when the cache cannot be written. The file
    is plain safetensors whose tensors start at 64-byte offsets (padding tensors fill the
    gaps, spaces pad the header)."""
    temp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".partial-", suffix=_SUFFIX, dir=entry.parent)
        temp = Path(name)
        with os.fdopen(fd, "wb") as handle:
            _serialize(handle, tensors, {**metadata, "format_version": str(FORMAT_VERSION)})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, entry)
        temp = None
        fsync_dir(entry.parent)
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


def _serialize(handle, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    names = {dtype: name for name, dtype in _DTYPES.items()}
    header: dict = {"__metadata__": metadata}
    layout: list[tuple[int, Tensor | None]] = []  # (padding bytes, tensor)
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.dtype not in names:
            raise ValueError(f"cannot store {t.dtype}")
        pad = -offset % _ALIGN
        if pad:
            header[f"{_PAD_PREFIX}{len(layout)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        layout.append((pad, t))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)
    for pad, t in layout:
        handle.write(b"\0" * pad)
        if t.numel():
            handle.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def encode_layers(layers: dict[str, str]) -> str:
    return json.dumps(layers, sort_keys=True)


def decode_layers(text: str | None) -> dict[str, str]:
    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise ValueError("layers metadata is not a mapping")
    return {str(k): str(v) for k, v in value.items()}
