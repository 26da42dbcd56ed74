"""Read a GGUF file: metadata, tensor views and the tokenizer description. No torch here.

`gguf.GGUFReader` builds a numpy slice per string while it opens a file, which takes over a
second for a 49k-token vocabulary. The tokenizer must load in a fraction of that for
`dsv4 pack`, so this module walks the header itself with `struct` over one memory map (the
format is small: magic, version, counts, typed key/values, tensor infos) and uses the `gguf`
package for the type tables and shape rules. Tensor data stay memory-mapped, laid out
exactly as GGUFReader lays them out, so `gguf.quants.dequantize` takes them as they are.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from engine.errors import ModelFormatError

_SCALAR_FORMATS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_NUMPY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
# Unquantised types get a typed view; every other type is raw bytes, as in GGUFReader.
_PLAIN_TENSOR_DTYPES: dict[GGMLQuantizationType, type[np.generic]] = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Metadata keys whose raw bytes identify a tokenizer (the digest that names its cache entry).
_TOKENIZER_IDENTITY_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


class GGUFTensor(NamedTuple):
    """One tensor: `shape` in torch order ([out, in] for a matrix), its GGML type, and the
    memory-mapped data (typed for F32/F16/..., uint8 blocks for quantised and BF16 types)."""

    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    data: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 values in `shape` (copies; quantised types go through gguf.quants)."""
        if self.ggml_type == GGMLQuantizationType.F32:
            return np.array(self.data, dtype=np.float32).reshape(self.shape)
        from gguf.quants import dequantize

        return np.asarray(dequantize(self.data, self.ggml_type), dtype=np.float32).reshape(self.shape)


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a GGUF says about its tokenizer, decoded to Python values."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    model_name: str
    digest: str  # sha256 hex over the raw bytes of model, pre, tokens, token types, merges


class _Field(NamedTuple):
    value_type: GGUFValueType
    item_type: GGUFValueType | None  # for arrays
    start: int  # offset of the value's bytes (after the type tag) in the file
    end: int


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    `.metadata` holds every key/value decoded (strings as str, arrays as lists);
    `.tensors` maps tensor names to GGUFTensor in file order.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"cannot open GGUF file {self.path}: {exc}", "check that the file exists and is readable") from exc
        self._buf = memoryview(self._map)
        self._fields: dict[str, _Field] = {}
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise ModelFormatError(
                f"{self.path.name} is not a readable GGUF file ({exc})",
                "the download may be truncated; fetch the model again",
            ) from exc

    # ---- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        if len(buf) < 24 or _U32.unpack_from(buf, 0)[0] != GGUF_MAGIC:
            raise ModelFormatError(f"{self.path.name} is not a GGUF file (bad magic)", "pass a .gguf model file")
        self.version = _U32.unpack_from(buf, 4)[0]
        if self.version not in (2, 3):
            raise ModelFormatError(
                f"{self.path.name}: GGUF version {self.version} is not supported (2 and 3 are; big-endian files are not)",
                "convert the model with a current llama.cpp",
            )
        tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        offset = 24
        for _ in range(kv_count):
            key, offset = self._read_str(offset)
            value_type = GGUFValueType(_U32.unpack_from(buf, offset)[0])
            offset += 4
            if key in self._fields:
                raise ModelFormatError(f"{self.path.name}: duplicate metadata key {key!r}")
            value, end, item_type = self._read_value(offset, value_type)
            self._fields[key] = _Field(value_type, item_type, offset, end)
            self.metadata[key] = value
            offset = end

        infos = []
        for _ in range(tensor_count):
            name, offset = self._read_str(offset)
            (n_dims,) = _U32.unpack_from(buf, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            offset += 4 + 8 * n_dims
            raw_type, data_offset = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            infos.append((name, dims, GGMLQuantizationType(raw_type), data_offset))

        alignment = int(self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path.name}: invalid general.alignment {alignment}")
        self.data_offset = -(-offset // alignment) * alignment
        for name, dims, ggml_type, data_offset in infos:
            if name in self.tensors:
                raise ModelFormatError(f"{self.path.name}: duplicate tensor {name!r}")
            self.tensors[name] = self._tensor_view(name, dims, ggml_type, self.data_offset + data_offset)

    def _read_str(self, offset: int) -> tuple[str, int]:
        (length,) = _U64.unpack_from(self._buf, offset)
        end = offset + 8 + length
        if end > len(self._buf):
            raise ValueError("string runs past the end of the file")
        return str(self._buf[offset + 8 : end], "utf-8"), end

    def _read_value(self, offset: int, value_type: GGUFValueType) -> tuple[Any, int, GGUFValueType | None]:
        buf = self._buf
        if value_type == GGUFValueType.STRING:
            text, end = self._read_str(offset)
            return text, end, None
        scalar = _SCALAR_FORMATS.get(value_type)
        if scalar is not None:
            return scalar.unpack_from(buf, offset)[0], offset + scalar.size, None
        if value_type != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type = GGUFValueType(_U32.unpack_from(buf, offset)[0])
        (count,) = _U64.unpack_from(buf, offset + 4)
        offset += 12
        if item_type == GGUFValueType.STRING:
            # A tight loop over (u64 length, bytes) pairs: ~25 ms for 49k tokens.
            items: list[str] = []
            append = items.append
            unpack_u64 = _U64.unpack_from
            for _ in range(count):
                (length,) = unpack_u64(buf, offset)
                append(str(buf[offset + 8 : offset + 8 + length], "utf-8"))
                offset += 8 + length
            return items, offset, item_type
        dtype = _NUMPY_DTYPES.get(item_type)
        if dtype is not None:
            array = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
            return array.tolist(), offset + array.nbytes, item_type
        if item_type == GGUFValueType.ARRAY:  # nested arrays: rare, decode one by one
            nested = []
            for _ in range(count):
                value, offset, _ = self._read_value(offset, GGUFValueType.ARRAY)
                nested.append(value)
            return nested, offset, item_type
        raise ValueError(f"unknown array item type {item_type}")

    def _tensor_view(self, name: str, dims: tuple[int, ...], ggml_type: GGMLQuantizationType, start: int) -> GGUFTensor:
        shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the fastest dimension first
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        plain = _PLAIN_TENSOR_DTYPES.get(ggml_type)
        if plain is not None:
            dtype: Any = plain
            count = n_elements
            view_shape = shape
        else:
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            if shape and shape[-1] % block_size:
                raise ModelFormatError(f"{self.path.name}: tensor {name} row of {shape[-1]} is not a whole number of {ggml_type.name} blocks")
            dtype = np.uint8
            count = n_elements // block_size * type_size
            view_shape = tuple(quant_shape_to_byte_shape(shape, ggml_type))
        end = start + count * np.dtype(dtype).itemsize
        if end > len(self._map):
            raise ModelFormatError(f"{self.path.name}: tensor {name} runs past the end of the file", "the download may be truncated; fetch the model again")
        data = np.frombuffer(self._buf, dtype=dtype, count=count, offset=start).reshape(view_shape)
        return GGUFTensor(shape, ggml_type, data)

    # ---- accessors -----------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path.name} has no general.architecture", "this GGUF is incomplete")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """A metadata value that must be present; a clear error when it is not."""
        if key not in self.metadata:
            raise ModelFormatError(f"{self.path.name} lacks the metadata key {key!r}", "this GGUF is incomplete or for another architecture")
        return self.metadata[key]

    def arch_param(self, name: str, default: Any = ...) -> Any:
        """`<architecture>.<name>`, e.g. arch_param("block_count")."""
        key = f"{self.architecture}.{name}"
        if default is ...:
            return self.require(key)
        return self.metadata.get(key, default)

    def raw_value_bytes(self, key: str) -> bytes:
        """The value's bytes as stored (after its type tag); empty when the key is absent."""
        field = self._fields.get(key)
        if field is None:
            return b""
        return bytes(self._buf[field.start : field.end])

    def tokenizer_digest(self) -> str:
        digest = hashlib.sha256()
        for key in _TOKENIZER_IDENTITY_KEYS:
            raw = self.raw_value_bytes(key)
            digest.update(key.encode() + len(raw).to_bytes(8, "little"))
            digest.update(raw)
        return digest.hexdigest()

    def model_name(self) -> str:
        """A stable, readable name: basename-size-finetune when present, else general.name."""
        meta = self.metadata
        parts = [meta.get("general.basename"), meta.get("general.size_label"), meta.get("general.finetune")]
        name = "-".join(str(p) for p in parts if p) if meta.get("general.basename") else meta.get("general.name") or self.path.stem
        return _slug(str(name))

    def tokenizer_spec(self) -> TokenizerSpec:
        meta = self.metadata
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(model, str) or not isinstance(tokens, list):
            raise ModelFormatError(f"{self.path.name} carries no tokenizer (tokenizer.ggml.model/tokens missing)", "use a GGUF converted with its tokenizer")
        token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelFormatError(f"{self.path.name}: {len(tokens)} tokens but {len(token_types)} token types")

        def token_id(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if value is not None else None

        return TokenizerSpec(
            model=model,
            pre=meta.get("tokenizer.ggml.pre"),
            tokens=tokens,
            token_types=[int(t) for t in token_types],
            merges=list(meta.get("tokenizer.ggml.merges") or []),
            bos_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_id=token_id("tokenizer.ggml.eos_token_id"),
            pad_id=token_id("tokenizer.ggml.padding_token_id"),
            unk_id=token_id("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            model_name=self.model_name(),
            digest=self.tokenizer_digest(),
        )


def _slug(text: str) -> str:
    out = []
    for ch in text.strip().lower():
        out.append(ch if ch.isalnum() or ch in "._" else "-")
    slug = "-".join(filter(None, "".join(out).split("-")))
    return slug or "model"
