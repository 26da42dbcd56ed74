"""The attention KV cache of one sequence batch: preallocated, exportable, restorable.

Layout: keys transposed, [L, B, Hkv, D, max_len], values [L, B, Hkv, max_len, D]. Decode
computes q K^T over the first `length` positions; with positions as the fast dimension of
keys that is a plain strided matrix for bmm (3x faster in bf16 at 4k than K^T as a view).
`torch.empty` reserves the whole context without touching it; memory grows only as tokens
are written. Exports carry the same layouts, cut to `length`.
`length` counts tokens whose keys and values are complete in every layer: the model raises
it only after a whole forward pass, so an interrupted pass leaves the state consistent.
`values_clean`: positions below it in `v` hold finite numbers (written, imported, or zeroed
by the model). Decode attends over a window rounded up past `length` and gives the extra
positions zero weight; zero times uninitialised memory could be NaN, so the model zeroes
values past max(length, values_clean) before reading them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.errors import EngineError

FORMAT_VERSION = 1


class KVState:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, batch: int = 1):
        self.k = torch.empty((n_layers, batch, n_kv_heads, head_dim, max_len), dtype=dtype)
        self.v = torch.empty((n_layers, batch, n_kv_heads, max_len, head_dim), dtype=dtype)
        self.length = 0
        self.values_clean = 0

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tokens (what an export carries)."""
        per_token = 2 * self.v[:, :, :, :1].numel() * self.v.element_size()
        return per_token * self.length

    def reset(self) -> None:
        self.length = 0

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (to rewind a prefix); returns how many were dropped."""
        dropped = max(0, min(n, self.length))
        self.length -= dropped
        return dropped

    def _meta_shape(self) -> dict:
        _, batch, heads, _, dim = self.v.shape
        return {"n_layers": self.n_layers, "batch": batch, "n_kv_heads": heads, "head_dim": dim, "dtype": str(self.dtype).removeprefix("torch.")}

    def export(self) -> tuple[dict[str, Tensor], dict]:
        """Copies of the stored keys/values and the metadata needed to check a restore."""
        n = self.length
        tensors = {"k": self.k[..., :n].clone(), "v": self.v[:, :, :, :n].clone()}
        meta = {"format_version": FORMAT_VERSION, "length": n, **self._meta_shape()}
        return tensors, meta

    def restore(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Load an export into this (preallocated) state; a mismatch raises EngineError."""
        expected = {"format_version": FORMAT_VERSION, **self._meta_shape()}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise EngineError(
                    f"saved KV state does not fit this model: {key} is {meta.get(key)!r}, expected {value!r}",
                    "the cache entry was written for another model or engine version; it will be recomputed",
                )
        n = int(meta.get("length", -1))
        if not 0 <= n <= self.max_len:
            raise EngineError(f"saved KV state holds {n} tokens; this state has room for {self.max_len}", "use a larger context")
        targets = {"k": self.k[..., :n], "v": self.v[:, :, :, :n]}
        for name, target in targets.items():
            t = tensors.get(name)
            if t is None or t.shape != target.shape:
                raise EngineError(f"saved KV state tensor {name!r} has shape {None if t is None else tuple(t.shape)}, expected {tuple(target.shape)}")
            target.copy_(t)
        self.length = n
