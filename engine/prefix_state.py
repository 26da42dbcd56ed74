"""Adapters between a model's live incremental state and the prefix cache's segments.

A segment holds the state for tokens [start, end). What that means depends on the state:

- `mini` (engine.kv_state.KVState): keys and values per token, [L, B, Hkv, T, D] each. A
  segment is a token slice, so it can be used up to any chunk boundary inside it
  (`partial_ok`).
- DeepSeek-V4 (engine.deepseek_v4.state.DSV4State): appendable per-token parts (the
  compressed entries and indexer keys made in [start, end), one per `ratio` tokens) plus a
  small snapshot at `end`: each layer's window ring buffer and its compressors' remainder
  rows (empty when `end` is a multiple of every ratio, as chunk boundaries are) and the
  ratio-4 compressor's overlap rows. The snapshot only exists at the segment's end, so a
  segment is all or nothing (`partial_ok = False`); chunks are multiples of every ratio.

A new state kind implements `StateAdapter`: `layout()` (everything about the state that
changes the numbers, for the fingerprint), `export_range` (called when the live state is at
`end`) and `import_range` (called when it is at `start`; it must leave the state untouched
when it raises).
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.prefix_cache import DEFAULT_CHUNK_TOKENS, LoadedSegment, SegmentError, TensorData

# Bump when a kernel change alters stored state values without touching the files hashed
# by `numerics_digest` (e.g. a torch upgrade known to change rounding).
NUMERICS_VERSION = 1


def numerics_digest(modules: list[Any]) -> str:
    """Hash of the source of the modules that compute the state: an edit there may change
    the KV values, so it changes the fingerprint (a comment edit costs one cold run).
    Read once per process, so it describes the code this process runs even if the files
    are edited while it runs."""
    digest = hashlib.sha256(f"numerics-{NUMERICS_VERSION}-torch-{torch.__version__.split('+')[0]}".encode())
    for module in modules:
        digest.update(_source_digest(module.__file__))
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def _source_digest(path: str) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def _tensor_data(name: str, tensor: torch.Tensor) -> TensorData:
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return TensorData(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), memoryview(raw.numpy()).cast("B"))


def _tensor(loaded: LoadedSegment, name: str) -> torch.Tensor:
    spec = next((s for s in loaded.header.tensors if s.name == name), None)
    if spec is None:
        raise SegmentError(f"lacks tensor {name}")
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SegmentError(f"tensor {name} has unknown dtype {spec.dtype}")
    count = math.prod(spec.shape)
    if count * dtype.itemsize != spec.nbytes:
        raise SegmentError(f"tensor {name}: shape {spec.shape} does not match {spec.nbytes} bytes")
    if count == 0:
        return torch.empty(spec.shape, dtype=dtype)
    with warnings.catch_warnings():
        # The mapping is read-only and torch warns about that; the tensor is only read.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(loaded.tensor_bytes(spec), dtype=torch.uint8)
    return raw.view(dtype).view(spec.shape)


class StateAdapter(Protocol):
    kind: str
    chunk_tokens: int
    partial_ok: bool

    def layout(self) -> dict[str, Any]: ...

    def bytes_per_token(self) -> float: ...

    def export_range(self, state: Any, start: int, end: int) -> tuple[list[TensorData], dict[str, Any]]: ...

    def import_range(self, state: Any, start: int, used: int, loaded: LoadedSegment) -> int: ...


class LlamaKVAdapter:
    """engine.llama.Llama with engine.kv_state.KVState."""

    kind = "llama-kv"
    partial_ok = True

    def __init__(self, model: Any, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        self.model = model
        self.chunk_tokens = chunk_tokens

    def layout(self) -> dict[str, Any]:
        import engine.gguf_weights
        import engine.kv_state
        import engine.llama
        import engine.quant

        a = self.model.args
        return {
            "state": self.kind,
            "n_layers": a.n_layers,
            "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim,
            "rope_theta": a.rope_theta,
            "rope_interleaved": a.rope_interleaved,
            "kv_dtype": str(self.model.cache_dtype).removeprefix("torch."),
            "numerics": numerics_digest([engine.llama, engine.quant, engine.gguf_weights, engine.kv_state]),
        }

    def bytes_per_token(self) -> float:
        a = self.model.args
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * self.model.cache_dtype.itemsize

    @staticmethod
    def token_axis(t: torch.Tensor, max_len: int) -> int:
        """The token axis of a cache tensor: keys may be stored transposed ([.., D, T])."""
        return t.dim() - 1 if t.shape[-1] == max_len else t.dim() - 2

    def export_range(self, state: Any, start: int, end: int) -> tuple[list[TensorData], dict[str, Any]]:
        if state.batch != 1 or end > state.length:
            raise ValueError(f"cannot export tokens {start}..{end} of a state holding {state.length} (batch {state.batch})")
        tensors = []
        axes = {}
        for name in ("k", "v"):
            full = getattr(state, name)
            axes[name] = self.token_axis(full, state.max_len)
            tensors.append(_tensor_data(name, full.narrow(axes[name], start, end - start)))
        return tensors, {"state": self.kind, "token_axes": axes}

    def import_range(self, state: Any, start: int, used: int, loaded: LoadedSegment) -> int:
        if state.length != start:
            raise ValueError(f"the state holds {state.length} tokens, the segment starts at {start}")
        if start + used > state.max_len:
            raise SegmentError(f"holds {start + used} tokens, more than the state's {state.max_len}")
        staged = []
        for name in ("k", "v"):
            full = getattr(state, name)
            axis = self.token_axis(full, state.max_len)
            t = _tensor(loaded, name)
            want = list(full.shape)
            want[axis] = loaded.header.n_tokens
            if list(t.shape) != want or t.dtype != full.dtype or loaded.header.meta.get("token_axes", {}).get(name) != axis:
                raise SegmentError(f"tensor {name} is {tuple(t.shape)} {t.dtype}, this model needs {tuple(want)} {full.dtype}")
            staged.append((full.narrow(axis, start, used), t.narrow(axis, 0, used)))
        nbytes = 0
        for target, source in staged:
            target.copy_(source)
            nbytes += source.numel() * source.element_size()
        state.length = start + used
        return nbytes


class DSV4Adapter:
    """engine.deepseek_v4.model.Transformer with engine.deepseek_v4.state.DSV4State."""

    kind = "deepseek-v4"
    partial_ok = False

    def __init__(self, model: Any, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        ratios = [r for r in model.args.compress_ratios if r]
        step = math.lcm(*ratios) if ratios else 1
        if chunk_tokens % step:
            raise ValueError(f"chunks of {chunk_tokens} tokens are not a multiple of the compression ratios {sorted(set(ratios))}")
        self.model = model
        self.chunk_tokens = chunk_tokens

    def layout(self) -> dict[str, Any]:
        import engine.deepseek_v4.attention
        import engine.deepseek_v4.model
        import engine.deepseek_v4.state
        import engine.fp8

        a = self.model.args
        return {
            "state": self.kind,
            "n_layers": a.num_hidden_layers,
            "compress_ratios": list(a.compress_ratios[: a.num_hidden_layers]),
            "sliding_window": a.sliding_window,
            "head_dim": a.head_dim,
            "index_head_dim": a.index_head_dim,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "simulate": bool(getattr(self.model, "simulate", False)),
            "numerics": numerics_digest(
                [engine.deepseek_v4.model, engine.deepseek_v4.attention, engine.deepseek_v4.state, engine.fp8]
            ),
        }

    def bytes_per_token(self) -> float:
        a = self.model.args
        total = 0.0
        for i in range(a.num_hidden_layers):
            m = a.compress_ratios[i]
            if m:
                total += a.head_dim / m + (a.index_head_dim / m if m == 4 else 0)
        return total * self.model.dtype.itemsize

    @staticmethod
    def _parts(layer: Any) -> list[tuple[str, Any]]:
        return [(name, st) for name, st in (("compressor", layer.compressor), ("indexer", layer.indexer)) if st is not None]

    def export_range(self, state: Any, start: int, end: int) -> tuple[list[TensorData], dict[str, Any]]:
        state.check_usable()
        if state.pos != end or state.batch_size != 1:
            raise ValueError(f"a DeepSeek-V4 segment is exported at its end: state at {state.pos}, segment ends at {end}")
        tensors: list[TensorData] = []
        for i, layer in enumerate(state.layers):
            tensors.append(_tensor_data(f"layers.{i}.window", layer.window))
            for name, st in self._parts(layer):
                p = f"layers.{i}.{name}."
                tensors.append(_tensor_data(p + "entries", st.entries[:, start // st.ratio : end // st.ratio]))
                tensors.append(_tensor_data(p + "pending_kv", st.pending_kv))
                tensors.append(_tensor_data(p + "pending_score", st.pending_score))
                if st.prev_kv is not None:
                    tensors.append(_tensor_data(p + "prev_kv", st.prev_kv))
                    tensors.append(_tensor_data(p + "prev_score", st.prev_score))
        return tensors, {"state": self.kind, "pos": end}

    def import_range(self, state: Any, start: int, used: int, loaded: LoadedSegment) -> int:
        state.check_usable()
        end = start + used
        if state.pos != start or end != loaded.header.end or int(loaded.header.meta.get("pos", -1)) != end:
            raise SegmentError("a DeepSeek-V4 segment can only be used whole, on a state at its start")
        # Read and check everything first: a failure must leave the state as it was.
        staged: list[tuple[Any, str, torch.Tensor]] = []
        nbytes = 0
        for i, layer in enumerate(state.layers):
            window = _tensor(loaded, f"layers.{i}.window")
            if window.shape != layer.window.shape or window.dtype != layer.window.dtype:
                raise SegmentError(f"layer {i} window is {tuple(window.shape)}, expected {tuple(layer.window.shape)}")
            staged.append((layer, "window", window))
            for name, st in self._parts(layer):
                p = f"layers.{i}.{name}."
                entries = _tensor(loaded, p + "entries")
                want = (st.pending_kv.shape[0], end // st.ratio - start // st.ratio, st._entries.shape[2])
                if tuple(entries.shape) != want or st.n_entries != start // st.ratio:
                    raise SegmentError(f"layer {i} {name} entries are {tuple(entries.shape)}, expected {want}")
                staged.append((st, "entries", entries))
                for part in ("pending_kv", "pending_score") + (("prev_kv", "prev_score") if st.prev_kv is not None else ()):
                    t = _tensor(loaded, p + part)
                    rows = end % st.ratio if part.startswith("pending") else getattr(st, part).shape[1]
                    if t.shape[1] != rows or t.shape[2] != getattr(st, part).shape[2]:
                        raise SegmentError(f"layer {i} {name} {part} is {tuple(t.shape)}")
                    staged.append((st, part, t))
        for owner, part, t in staged:
            nbytes += t.numel() * t.element_size()
            if part == "window":
                owner.window.copy_(t)
            elif part == "entries":
                owner.append(t.clone())
            else:
                setattr(owner, part, t.clone())
        state.pos = end
        return nbytes


def adapter_for(model: Any, chunk_tokens: int | None = None) -> StateAdapter:
    """The adapter for a loaded model's state, by the model's class."""
    cls = type(model)
    chunk = chunk_tokens or DEFAULT_CHUNK_TOKENS
    if cls.__module__ == "engine.llama" and cls.__name__ == "Llama":
        return LlamaKVAdapter(model, chunk)
    if cls.__module__ == "engine.deepseek_v4.model" and cls.__name__ == "Transformer":
        return DSV4Adapter(model, chunk)
    raise TypeError(f"no prefix-cache adapter for {cls.__module__}.{cls.__name__}")
