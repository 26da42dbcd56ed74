"""Incremental inference state of DeepSeek-V4, and its KV-size accounting.

Per layer (spec §2, §3):
- `window`: a ring buffer [B, W, D] of the last W window entries, slot = pos % W.
- compressed layers: a `CompressorState` holding the compressed entries [B, N, D] plus the
  tokens of the window in progress (raw kv and gate rows, [B, pos % m, coff*D]) and, for the
  overlapping ratio-4 compressor, the previous completed window's rows (gate with `ape`
  added; zeros and -inf before the first window, so its weight is 0).
- CSA layers also hold the indexer's own `CompressorState` (entries = indexer keys).

The state exports to a flat dict of plain tensors plus JSON-able metadata and restores from
them (the prefix cache stores both). `nbytes` is what the state holds now; `kv_bytes` is the
same accounting computed from the config alone, for any length and storage format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.deepseek_v4.config import CSA, CSA_RATIO, HCA, WINDOW, ModelArgs
from engine.errors import EngineError, ModelFormatError

STATE_FORMAT = 1


def _grow(buf: torch.Tensor, count: int, new: torch.Tensor) -> torch.Tensor:
    """Append `new` along dim 1 after `count` used rows, doubling capacity when full."""
    need = count + new.shape[1]
    if need > buf.shape[1]:
        capacity = max(need, 2 * buf.shape[1], 16)
        grown = buf.new_zeros(buf.shape[0], capacity, buf.shape[2])
        grown[:, :count] = buf[:, :count]
        buf = grown
    buf[:, count:need] = new
    return buf


@dataclass
class CompressorState:
    ratio: int
    pending_kv: torch.Tensor  # [B, pos % m, coff*D] rows of the window in progress
    pending_score: torch.Tensor  # same, gate logits without `ape`
    prev_kv: torch.Tensor | None  # [B, m, 2D] last completed window (overlap only)
    prev_score: torch.Tensor | None  # same, with `ape` added
    _entries: torch.Tensor  # [B, capacity, D]
    n_entries: int = 0

    @classmethod
    def empty(cls, batch: int, ratio: int, dim: int, dtype: torch.dtype, device: torch.device | str) -> "CompressorState":
        overlap = ratio == CSA_RATIO
        coff = 2 if overlap else 1
        rows = torch.zeros(batch, 0, coff * dim, dtype=torch.float32, device=device)
        prev_kv = prev_score = None
        if overlap:
            prev_kv = torch.zeros(batch, ratio, coff * dim, dtype=torch.float32, device=device)
            prev_score = torch.full_like(prev_kv, float("-inf"))
        entries = torch.zeros(batch, 0, dim, dtype=dtype, device=device)
        return cls(ratio, rows, rows.clone(), prev_kv, prev_score, entries, 0)

    @property
    def entries(self) -> torch.Tensor:
        return self._entries[:, : self.n_entries]

    def append(self, new: torch.Tensor) -> None:
        self._entries = _grow(self._entries, self.n_entries, new.to(self._entries.dtype))
        self.n_entries += new.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"entries": self.entries, "pending_kv": self.pending_kv, "pending_score": self.pending_score}
        if self.prev_kv is not None:
            out["prev_kv"], out["prev_score"] = self.prev_kv, self.prev_score
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class LayerState:
    window: torch.Tensor  # [B, W, D] ring buffer, slot = pos % W
    compressor: CompressorState | None
    indexer: CompressorState | None

    @classmethod
    def empty(
        cls, args: ModelArgs, layer_id: int, batch: int, dtype: torch.dtype, device: torch.device | str
    ) -> "LayerState":
        kind = args.layer_kind(layer_id)
        window = torch.zeros(batch, args.sliding_window, args.head_dim, dtype=dtype, device=device)
        comp = idx = None
        if kind != WINDOW:
            ratio = args.compress_ratios[layer_id]
            comp = CompressorState.empty(batch, ratio, args.head_dim, dtype, device)
            if kind == CSA:
                idx = CompressorState.empty(batch, ratio, args.index_head_dim, dtype, device)
        return cls(window, comp, idx)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"window": self.window}
        for name, st in (("compressor", self.compressor), ("indexer", self.indexer)):
            if st is not None:
                out.update({f"{name}.{k}": v for k, v in st.tensors().items()})
        return out


@dataclass
class DSV4State:
    """Everything a continuation needs: `pos` tokens have been consumed."""

    pos: int
    layers: list[LayerState]
    max_len: int = 1 << 62  # tokens the owner allows (the model sets its context length)
    in_flight: bool = False  # a forward pass is between layers: the layers disagree on pos

    @classmethod
    def empty(
        cls,
        args: ModelArgs,
        batch: int = 1,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "DSV4State":
        layers = [LayerState.empty(args, i, batch, dtype, device) for i in range(args.num_hidden_layers)]
        return cls(0, layers)

    @property
    def length(self) -> int:
        """Tokens consumed (the name the shared generation loop uses)."""
        return self.pos

    def check_usable(self) -> None:
        if self.in_flight:
            raise EngineError(
                "the DeepSeek-V4 state was interrupted in the middle of a forward pass",
                "start from a new state or restore a saved prefix",
            )

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens. Only n = 0 is possible: compressed entries and the
        compressor's rows cannot be un-pooled, so rewinding means restoring an export."""
        if n > 0:
            raise EngineError(
                f"cannot rewind a DeepSeek-V4 state by {n} tokens (compressed KV cannot be undone)",
                "restore a state exported at the earlier length",
            )
        return 0

    def reset(self) -> None:
        """Back to an empty context, keeping the batch size, dtype and device."""
        for layer in self.layers:
            layer.window.zero_()
            for st in (layer.compressor, layer.indexer):
                if st is not None:
                    fresh = CompressorState.empty(
                        st.pending_kv.shape[0], st.ratio, st._entries.shape[2], st._entries.dtype, st._entries.device
                    )
                    st.__dict__.update(fresh.__dict__)
        self.pos = 0
        self.in_flight = False

    @property
    def batch_size(self) -> int:
        return self.layers[0].window.shape[0] if self.layers else 0

    # ---------- export / restore ----------

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata): flat `layers.{i}.{part}` tensors (contiguous copies) and JSON-able meta."""
        self.check_usable()
        tensors = {
            f"layers.{i}.{name}": t.contiguous().clone()
            for i, layer in enumerate(self.layers)
            for name, t in layer.tensors().items()
        }
        meta = {
            "format": STATE_FORMAT,
            "pos": self.pos,
            "n_layers": len(self.layers),
            "batch": self.batch_size,
            "dtype": str(self.layers[0].window.dtype).removeprefix("torch.") if self.layers else None,
        }
        return tensors, meta

    @classmethod
    def restore(cls, args: ModelArgs, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "DSV4State":
        if meta.get("format") != STATE_FORMAT or meta.get("n_layers") != args.num_hidden_layers:
            raise ModelFormatError(
                f"saved DeepSeek-V4 state has format {meta.get('format')} with {meta.get('n_layers')} layers; "
                f"expected format {STATE_FORMAT} with {args.num_hidden_layers}"
            )
        pos = int(meta["pos"])

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ModelFormatError(f"saved DeepSeek-V4 state lacks tensor {name}")
            return tensors[name]

        layers = []
        for i in range(args.num_hidden_layers):
            kind = args.layer_kind(i)
            parts: dict[str, CompressorState | None] = {"compressor": None, "indexer": None}
            for name in ("compressor", "indexer"):
                if name == "compressor" and kind == WINDOW or name == "indexer" and kind != CSA:
                    continue
                p = f"layers.{i}.{name}."
                entries = get(p + "entries").clone()
                ratio = args.compress_ratios[i]
                overlap = ratio == CSA_RATIO
                st = CompressorState(
                    ratio,
                    get(p + "pending_kv").clone(),
                    get(p + "pending_score").clone(),
                    get(p + "prev_kv").clone() if overlap else None,
                    get(p + "prev_score").clone() if overlap else None,
                    entries,
                    entries.shape[1],
                )
                if st.n_entries != pos // ratio or st.pending_kv.shape[1] != pos % ratio:
                    raise ModelFormatError(f"saved DeepSeek-V4 state for layer {i} does not match position {pos}")
                parts[name] = st
            layers.append(LayerState(get(f"layers.{i}.window").clone(), parts["compressor"], parts["indexer"]))
        return cls(pos, layers)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors in use (compressed entries counted up to their length)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors().values())


# ---------- accounting from the config alone ----------


@dataclass(frozen=True)
class KVStorage:
    """Bytes per stored entry: `main` per head_dim KV entry, `index` per indexer key."""

    name: str
    main: float
    index: float
    window: float  # bytes per window entry
    state_elem: int = 4  # compressor remainder/overlap rows (fp32 in the reference)


def storage_formats(args: ModelArgs) -> dict[str, KVStorage]:
    """The layouts of spec §3, sized from the config.

    bf16: 2 bytes a value. Production (SGLang/FlashMLA): non-RoPE dims FP8 + RoPE dims bf16
    + one ue8m0 scale per 64 non-RoPE values, padded to 8 bytes; indexer keys FP8 + a 4-byte
    scale, or FP4 (two a byte) + 4 bytes.
    """
    d, rope, idx = args.head_dim, args.qk_rope_head_dim, args.index_head_dim
    nope = d - rope
    scales = -(-nope // 64)
    main_fp8 = nope + 2 * rope + -(-scales // 8) * 8
    return {
        "bf16": KVStorage("bf16", 2 * d, 2 * idx, 2 * d),
        "fp32": KVStorage("fp32", 4 * d, 4 * idx, 4 * d),
        "fp8": KVStorage("fp8", main_fp8, idx + 4, main_fp8),
        "fp8_fp4idx": KVStorage("fp8_fp4idx", main_fp8, idx // 2 + 4, main_fp8),
    }


@dataclass(frozen=True)
class KVBytes:
    compressed: float  # entries that grow with the context
    window: float  # fixed ring buffers
    compressor_state: float  # remainder and overlap rows

    @property
    def total(self) -> float:
        return self.compressed + self.window + self.compressor_state


def kv_bytes(args: ModelArgs, n_tokens: int, storage: KVStorage) -> KVBytes:
    """Bytes the state holds after `n_tokens` tokens, counted layer by layer.

    Matches `DSV4State.nbytes` exactly when `storage` matches the state's dtype (fp32/bf16).
    """
    compressed = window = comp_state = 0.0
    for i in range(args.num_hidden_layers):
        kind = args.layer_kind(i)
        window += args.sliding_window * storage.window
        if kind == WINDOW:
            continue
        m = args.compress_ratios[i]
        coff = 2 if kind == CSA else 1
        dims = [(args.head_dim, storage.main)] + ([(args.index_head_dim, storage.index)] if kind == CSA else [])
        for dim, entry_bytes in dims:
            compressed += (n_tokens // m) * entry_bytes
            rows = (n_tokens % m) * 2  # pending kv and gate
            if kind == CSA:
                rows += 2 * m  # previous window's kv and gate
            comp_state += rows * coff * dim * storage.state_elem
    return KVBytes(compressed, window, comp_state)


def kv_growth_per_token(args: ModelArgs, storage: KVStorage) -> float:
    """Spec §3's formula: n_CSA*(B_main+B_idx)/4 + n_HCA*B_main/m per token."""
    total = 0.0
    for i in range(args.num_hidden_layers):
        kind, m = args.layer_kind(i), args.compress_ratios[i]
        if kind == CSA:
            total += (storage.main + storage.index) / m
        elif kind == HCA:
            total += storage.main / m
    return total
