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
import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.errors import ModelFormatError

if TYPE_CHECKING:  # numpy and gguf load only when tensors are touched: the tokenizer needs neither
    import numpy as np
    from gguf.constants import GGMLQuantizationType

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
DEFAULT_ALIGNMENT = 32


class ValueType(IntEnum):
    """GGUF metadata value types (fixed by the file format)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_CODES: dict[ValueType, str] = {
    ValueType.UINT8: "B",
    ValueType.INT8: "b",
    ValueType.UINT16: "H",
    ValueType.INT16: "h",
    ValueType.UINT32: "I",
    ValueType.INT32: "i",
    ValueType.FLOAT32: "f",
    ValueType.BOOL: "?",
    ValueType.UINT64: "Q",
    ValueType.INT64: "q",
    ValueType.FLOAT64: "d",
}
_SCALAR_FORMATS = {t: struct.Struct("<" + code) for t, code in _SCALAR_CODES.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# String arrays this long are decoded on first use: the tokenizer's cached path only hashes them.
_LAZY_STRING_ARRAY = 1024

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
        import numpy as np
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        if self.ggml_type == GGMLQuantizationType.F32:
            return np.array(self.data, dtype=np.float32).reshape(self.shape)
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
    start: int  # offset of the value's bytes (after the type tag) in the file
    end: int


class _LazyStrings(NamedTuple):
    start: int  # first (length, bytes) item
    count: int


class _TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    type_code: int
    offset: int  # from the start of the data section


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    `.metadata` holds every key/value decoded (strings as str, arrays as lists);
    `.tensors` maps tensor names to GGUFTensor in file order (built on first use).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ModelFormatError(f"cannot open GGUF file {self.path}: {reason}", "check that the file exists and is a complete download") from exc
        self._buf = memoryview(self._map)
        self._fields: dict[str, _Field] = {}
        self._values: dict[str, Any] = {}
        self._tensor_infos: list[_TensorInfo] = []
        self._tensors: dict[str, GGUFTensor] | None = None
        self._metadata: dict[str, Any] | None = None
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
            value_type = ValueType(_U32.unpack_from(buf, offset)[0])
            offset += 4
            if key in self._fields:
                raise ModelFormatError(f"{self.path.name}: duplicate metadata key {key!r}")
            value, end = self._read_value(offset, value_type)
            self._fields[key] = _Field(offset, end)
            self._values[key] = value
            offset = end

        names = set()
        for _ in range(tensor_count):
            name, offset = self._read_str(offset)
            (n_dims,) = _U32.unpack_from(buf, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            offset += 4 + 8 * n_dims
            type_code, data_offset = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            if name in names:
                raise ModelFormatError(f"{self.path.name}: duplicate tensor {name!r}")
            names.add(name)
            self._tensor_infos.append(_TensorInfo(name, tuple(int(d) for d in dims), type_code, int(data_offset)))

        alignment = self._values.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path.name}: invalid general.alignment {alignment}")
        self.data_offset = -(-offset // alignment) * alignment
        last_start = max((self.data_offset + t.offset for t in self._tensor_infos), default=self.data_offset)
        if last_start > len(buf):
            raise ModelFormatError(f"{self.path.name}: tensor data runs past the end of the file", "the download may be truncated; fetch the model again")

    def _read_str(self, offset: int) -> tuple[str, int]:
        (length,) = _U64.unpack_from(self._buf, offset)
        end = offset + 8 + length
        if end > len(self._buf):
            raise ValueError("string runs past the end of the file")
        return str(self._buf[offset + 8 : end], "utf-8"), end

    def _read_value(self, offset: int, value_type: ValueType) -> tuple[Any, int]:
        buf = self._buf
        if value_type == ValueType.STRING:
            return self._read_str(offset)
        scalar = _SCALAR_FORMATS.get(value_type)
        if scalar is not None:
            return scalar.unpack_from(buf, offset)[0], offset + scalar.size
        if value_type != ValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type = ValueType(_U32.unpack_from(buf, offset)[0])
        (count,) = _U64.unpack_from(buf, offset + 4)
        offset += 12
        if item_type == ValueType.STRING:
            if count >= _LAZY_STRING_ARRAY:
                return _LazyStrings(offset, count), self._skip_strings(offset, count)
            return self._decode_strings(offset, count), self._skip_strings(offset, count)
        code = _SCALAR_CODES.get(item_type)
        if code is not None:
            items = struct.unpack_from(f"<{count}{code}", buf, offset)
            return list(items), offset + struct.calcsize(f"<{count}{code}")
        if item_type == ValueType.ARRAY:  # nested arrays: rare, decode one by one
            nested = []
            for _ in range(count):
                value, offset = self._read_value(offset, ValueType.ARRAY)
                nested.append(self._decoded(value))
            return nested, offset
        raise ValueError(f"unknown array item type {item_type}")

    def _skip_strings(self, offset: int, count: int) -> int:
        unpack_u64 = _U64.unpack_from
        buf = self._buf
        for _ in range(count):
            offset += 8 + unpack_u64(buf, offset)[0]
        if offset > len(buf):
            raise ValueError("string array runs past the end of the file")
        return offset

    def _decode_strings(self, offset: int, count: int) -> list[str]:
        # A tight loop over (u64 length, bytes) pairs: ~25 ms for 49k tokens.
        items: list[str] = []
        append = items.append
        unpack_u64 = _U64.unpack_from
        buf = self._buf
        for _ in range(count):
            (length,) = unpack_u64(buf, offset)
            append(str(buf[offset + 8 : offset + 8 + length], "utf-8"))
            offset += 8 + length
        return items

    def _decoded(self, value: Any) -> Any:
        if isinstance(value, _LazyStrings):
            return self._decode_strings(value.start, value.count)
        return value

    # ---- tensors -------------------------------------------------------------------------

    @property
    def tensors(self) -> dict[str, GGUFTensor]:
        if self._tensors is None:
            self._tensors = {info.name: self._tensor_view(info) for info in self._tensor_infos}
        return self._tensors

    @property
    def tensor_names(self) -> list[str]:
        return [info.name for info in self._tensor_infos]

    def _tensor_view(self, info: _TensorInfo) -> GGUFTensor:
        import numpy as np
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        plain_dtypes = {
            GGMLQuantizationType.F32: np.float32,
            GGMLQuantizationType.F16: np.float16,
            GGMLQuantizationType.F64: np.float64,
            GGMLQuantizationType.I8: np.int8,
            GGMLQuantizationType.I16: np.int16,
            GGMLQuantizationType.I32: np.int32,
            GGMLQuantizationType.I64: np.int64,
        }
        try:
            ggml_type = GGMLQuantizationType(info.type_code)
        except ValueError as exc:
            raise ModelFormatError(f"{self.path.name}: tensor {info.name} has unknown GGML type {info.type_code}", "update the gguf package") from exc
        shape = tuple(reversed(info.dims))  # torch order: [out, in]
        n_elements = 1
        for d in info.dims:
            n_elements *= d
        plain = plain_dtypes.get(ggml_type)
        if plain is not None:
            dtype: Any = plain
            count = n_elements
            view_shape = shape
        else:
            # Quantised (and BF16) data as raw bytes, shaped as GGUFReader shapes it.
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            if shape and shape[-1] % block_size:
                raise ModelFormatError(f"{self.path.name}: tensor {info.name} row of {shape[-1]} is not a whole number of {ggml_type.name} blocks")
            dtype = np.uint8
            count = n_elements // block_size * type_size
            view_shape = tuple(quant_shape_to_byte_shape(shape, ggml_type))
        start = self.data_offset + info.offset
        if start + count * np.dtype(dtype).itemsize > len(self._buf):
            raise ModelFormatError(f"{self.path.name}: tensor {info.name} runs past the end of the file", "the download may be truncated; fetch the model again")
        data = np.frombuffer(self._map, dtype=dtype, count=count, offset=start).reshape(view_shape)
        return GGUFTensor(shape, ggml_type, data)

    # ---- accessors -----------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path.name} has no general.architecture", "this GGUF is incomplete")
        return arch

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = {key: self._decoded(value) for key, value in self._values.items()}
        return self._metadata

    def get(self, key: str, default: Any = None) -> Any:
        """One value, decoding only that key (cheap even before `.metadata` is built)."""
        if self._metadata is not None:
            return self._metadata.get(key, default)
        if key not in self._values:
            return default
        return self._decoded(self._values[key])

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def require(self, key: str) -> Any:
        """A metadata value that must be present; a clear error when it is not."""
        if key not in self._values:
            raise ModelFormatError(f"{self.path.name} lacks the metadata key {key!r}", "this GGUF is incomplete or for another architecture")
        return self.get(key)

    def arch_param(self, name: str, default: Any = ...) -> Any:
        """`<architecture>.<name>`, e.g. arch_param("block_count")."""
        key = f"{self.architecture}.{name}"
        if default is ...:
            return self.require(key)
        return self.get(key, default)

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
        meta = self
        parts = [meta.get("general.basename"), meta.get("general.size_label"), meta.get("general.finetune")]
        name = "-".join(str(p) for p in parts if p) if meta.get("general.basename") else meta.get("general.name") or self.path.stem
        return _slug(str(name))

    def tokenizer_spec(self) -> TokenizerSpec:
        meta = self
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
