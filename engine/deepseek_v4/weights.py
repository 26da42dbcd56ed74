"""Load an official DeepSeek-V4 checkpoint directory into a `Transformer`, strictly.

A checkpoint is `config.json` plus safetensors shards listed in `model.safetensors.index.json`
(or one `model.safetensors`). Tensor names are the reference names with no prefix (spec §5),
which are the `Transformer`'s own state-dict names, so no rename table is needed.

Strict: every tensor the model needs must be present with the right shape and a dtype of
the right kind, and nothing else may be (other ranks' routed experts are known and
skipped); otherwise `ModelFormatError` names the tensor.
FP8 and FP4 tensors stay quantised in memory (dequantised per matmul), so memory tracks
the checkpoint's size. Shards are opened with safetensors' memory-mapped reader; nothing
is pickled and no code from the checkpoint runs.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.deepseek_v4.config import ModelArgs
from engine.deepseek_v4.model import Transformer
from engine.deepseek_v4.parallel import Parallel
from engine.errors import ModelFormatError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_EXPERT_NAME = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.(\d+)\.")
# Tensor-parallel tensors and the dim each rank takes a slice of (see parallel.py).
_SPLIT_ROWS = re.compile(
    r"\.attn\.(?:(?:indexer\.)?wq_b\.(?:weight|scale)|wo_a\.(?:weight|scale)|attn_sink|indexer\.weights_proj\.weight)$"
)
_SPLIT_COLS = re.compile(r"\.attn\.wo_b\.(?:weight|scale)$")


def split_dim(name: str) -> int | None:
    if _SPLIT_ROWS.search(name):
        return 0
    if _SPLIT_COLS.search(name):
        return 1
    return None
_INTS = (torch.int64, torch.int32)


@dataclass(frozen=True)
class LoadedCheckpoint:
    args: ModelArgs
    model: Transformer
    directory: Path
    simulate: bool
    parallel: Parallel

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as held (quantised tensors at their stored size)."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def shard_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or the single-file checkpoint)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"cannot read {index}: {exc}") from exc
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise ModelFormatError(
        f"no {INDEX_FILE} or {SINGLE_FILE} in {directory}", hint="point at a DeepSeek-V4 checkpoint directory"
    )


def _expected_dtype_ok(expected: torch.dtype, found: torch.dtype) -> bool:
    # Full-precision tensors may ship as fp32, bf16 or fp16; quantised ones must match exactly.
    if expected in _FLOATS:
        return found in _FLOATS
    if expected in _INTS:
        return found in _INTS
    return found == expected


def load_checkpoint(
    directory: str | Path,
    *,
    simulate: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parallel: Parallel = Parallel(),
) -> LoadedCheckpoint:
    """Build the model for `directory/config.json` and load every tensor strictly.

    `simulate` (DeepSeek's in-model FP8/FP4 rounding) defaults to on for FP8/FP4
    checkpoints and off for bf16/fp32 ones. `dtype` is the activation/compute dtype.
    With several ranks (`parallel`), other ranks' routed experts are expected in the files
    and left unread, and tensor-parallel tensors are read as this rank's slice.
    """
    directory = Path(directory)
    args = ModelArgs.from_file(directory / "config.json")
    simulate = args.is_quantized if simulate is None else simulate
    with torch.device("meta"):
        model = Transformer(args, simulate=simulate, dtype=dtype, parallel=parallel)
    expected = model.state_dict()
    names = shard_map(directory)

    def other_ranks(name: str) -> bool:
        match = _EXPERT_NAME.match(name)
        if match is None or int(match.group(1)) >= args.n_routed_experts:
            return False
        return not parallel.owns_expert(int(match.group(1)), args.n_routed_experts)

    foreign = {name for name in names if other_ranks(name)}

    missing = sorted(set(expected) - set(names))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"checkpoint lacks tensor {missing[0]}{more}", hint=f"in {directory}")
    unexpected = sorted(set(names) - set(expected) - foreign)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelFormatError(
            f"checkpoint has unexpected tensor {unexpected[0]}{more}",
            hint="the config.json does not describe these weights",
        )

    by_shard: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(names) - foreign):
        by_shard[names[name]].append(name)
    loaded: dict[str, torch.Tensor] = {}
    for shard, shard_names in by_shard.items():
        path = directory / shard
        if not path.is_file():
            raise ModelFormatError(f"shard {shard} listed for tensor {shard_names[0]} is missing", hint=str(directory))
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            present = set(f.keys())
            for name in shard_names:
                if name not in present:
                    raise ModelFormatError(f"tensor {name} is not in its shard {shard}")
                view = f.get_slice(name)
                shape = tuple(view.get_shape())
                want = expected[name]
                full = list(want.shape)
                dim = split_dim(name) if parallel.world_size > 1 else None
                if dim is not None:
                    full[dim] *= parallel.world_size
                if list(shape) != full:
                    raise ModelFormatError(
                        f"tensor {name} has shape {list(shape)}, expected {full}",
                        hint="the config.json does not match the weights",
                    )
                found = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if found is None or not _expected_dtype_ok(want.dtype, found):
                    raise ModelFormatError(
                        f"tensor {name} has dtype {view.get_dtype()}, expected {str(want.dtype).removeprefix('torch.')}"
                    )
                if dim is None:
                    loaded[name] = f.get_tensor(name)
                else:  # read only this rank's rows or columns
                    n = want.shape[dim]
                    part = slice(parallel.rank * n, (parallel.rank + 1) * n)
                    loaded[name] = (view[part] if dim == 0 else view[:, part]).contiguous()
    model.load_state_dict(loaded, strict=True, assign=True)
    model.eval()
    return LoadedCheckpoint(args, model, directory, simulate, parallel)
