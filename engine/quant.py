"""Linear layers whose weights stay in their storage format: dense, int8 and group-wise int4.

Every layer maps `x [..., K]` to `y [..., N]` for a weight `W [N, K]` (torch's `out, in`
order) and offers `rows(ids)`, the dequantised rows of W in fp32, so a tied embedding and
LM head share one quantised matrix.

Formats
- Dense: W in fp32 or bf16; `forward` casts x to W's dtype.
- Int8 (weight-only, per output channel): `q int8 [N, K]`, `scale [N]`, W = q * scale[n].
  Fast path `torch.ops.aten._weight_int8pack_mm(x bf16 [M, K], q, scale bf16) -> [M, N]`.
- Int4 (group-wise, asymmetric, group of G = 32 along K): values `q` in 0..15 and per group
  a `scale` and a `minimum`, W = q * scale + minimum. This is exactly GGUF's Q4_1 block:
  20 bytes per 32 weights = f16 d, f16 m, then 16 bytes whose low nibble is element j and
  high nibble element j + 16 (j < 16). The CPU kernel
  `torch.ops.aten._weight_int4pack_mm_for_cpu(x bf16 [M, K], packed, G, scale_zeros)`
  computes W = (q - 8) * scale + zero, so zero = minimum + 8 * scale; `scale_zeros` is
  [K / G, N, 2] (scale, zero) in x's dtype, and `packed` comes from
  `_convert_weight_to_int4pack_for_cpu(q int32 [N, K], inner_k_tiles)` (layout private to
  the kernel). The kernel requires bf16/fp16 activations: fp32 inputs take a path about
  25x slower, so int4 and int8 layers compute in bf16 (the residual stream stays fp32 in
  the model).

`few_rows()` gives the layer's decode kernel as a bare callable for x [M < DENSE_MIN_ROWS, K]
already in the compute dtype: `forward` minus its checks and casts, which cost as much as a
small GEMV when the model calls ~120 layers per token.

Each format has a pure reference beside its kernel (`*_dequantize`: rebuild W in fp32, then
an ordinary matmul); tests hold the kernels to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_GROUP = 32
# From this many rows (prefill) quantised layers expand their weights to a transient bf16
# matrix and use a dense GEMM: the weight-only kernels cost per row what a GEMV costs.
DENSE_MIN_ROWS = 64
_INT4_INNER_K_TILES = 2  # the CPU packer accepts 2/4/8 and packs identically


class QuantLinear(nn.Module):
    """Common interface: forward(x) -> y in `compute_dtype`; rows(ids) -> fp32 rows of W."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    mode: str

    def rows(self, ids: Tensor) -> Tensor:  # pragma: no cover - every format overrides it
        raise NotImplementedError

    def few_rows(self) -> Callable[[Tensor], Tensor]:
        """f(x [M, K] in compute_dtype, M < DENSE_MIN_ROWS) -> y [M, N], equal to forward(x)."""
        return self.forward


class DenseLinear(QuantLinear):
    mode = "dense"

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight)

    def few_rows(self) -> Callable[[Tensor], Tensor]:
        weight = self.weight
        return lambda x: F.linear(x, weight)

    def rows(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float()

    def dequantize(self) -> Tensor:
        return self.weight.float()

    def exported(self) -> tuple[str, dict[str, Tensor]]:
        return "dense", {"weight": self.weight.data}


# ---- int8 -------------------------------------------------------------------------------


def int8_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K], scale fp32 [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


class Int8Linear(QuantLinear):
    """Per-channel int8. With `levels=2` the weight is W = q1 * s1 + q2 * s2, the second level
    quantising the first one's residual (error ~1/64,000 of the row's range instead of
    ~1/254): both levels run as one kernel call over stacked rows. Used for the tied
    embedding/LM head, whose Q8_0 per-32 scales a single per-row scale would blur."""

    mode = "int8"

    def __init__(self, q: Tensor, scale: Tensor, compute_dtype: torch.dtype = torch.bfloat16, levels: int = 1):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],) or q.shape[0] % levels:
            raise ValueError(f"int8 weight must be int8 [levels * N, K] with scale [levels * N], got {tuple(q.shape)} {q.dtype}, {tuple(scale.shape)}")
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("scale_fp32", scale.float())
        self.levels = levels
        self.out_features, self.in_features = q.shape[0] // levels, q.shape[1]
        self.compute_dtype = compute_dtype

    @classmethod
    def from_float(cls, weight: Tensor, compute_dtype: torch.dtype = torch.bfloat16, levels: int = 1) -> "Int8Linear":
        return cls(*int8_quantize_levels(weight, levels), compute_dtype=compute_dtype, levels=levels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        x = x.to(self.compute_dtype)
        if x.shape[0] >= DENSE_MIN_ROWS:
            return F.linear(x, self.expand())
        y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        if self.levels == 2:
            n = self.out_features
            y = y[:, :n] + y[:, n:]
        return y

    def few_rows(self) -> Callable[[Tensor], Tensor]:
        if self.levels != 1:
            return super().few_rows()
        q, scale, kernel = self.q, self.scale, torch.ops.aten._weight_int8pack_mm
        return lambda x: kernel(x, q, scale)

    def expand(self) -> Tensor:
        """W [N, K] in the compute dtype (a transient for many-row calls); int8 values are
        exact in bf16, so the product is the only rounding."""
        w = self.q.to(self.compute_dtype).mul_(self.scale.unsqueeze(-1))
        if self.levels == 2:
            n = self.out_features
            w = w[:n].add_(w[n:])
        return w

    def first_level(self) -> "Int8Linear":
        """The one-level layer over the same storage (no copy): half the bytes per call."""
        n = self.out_features
        return Int8Linear(self.q[:n], self.scale_fp32[:n], self.compute_dtype)

    def rows(self, ids: Tensor) -> Tensor:
        out = self.q[ids].float() * self.scale_fp32[ids].unsqueeze(-1)
        if self.levels == 2:
            second = ids + self.out_features
            out += self.q[second].float() * self.scale_fp32[second].unsqueeze(-1)
        return out

    def dequantize(self) -> Tensor:
        w = int8_dequantize(self.q, self.scale_fp32)
        return w.view(self.levels, self.out_features, self.in_features).sum(0)

    def exported(self) -> tuple[str, dict[str, Tensor]]:
        if self.compute_dtype != torch.bfloat16:
            raise ValueError("only bf16-compute int8 layers are exported")
        return f"int8x{self.levels}", {"q": self.q, "scale": self.scale_fp32}


def int8_quantize_levels(weight: Tensor, levels: int = 1) -> tuple[Tensor, Tensor]:
    """`levels` stacked per-channel int8 quantisations, each of the previous residual."""
    residual = weight.float()
    qs, scales = [], []
    for _ in range(levels):
        q, scale = int8_quantize(residual)
        qs.append(q)
        scales.append(scale)
        residual = residual - int8_dequantize(q, scale)
    return torch.cat(qs), torch.cat(scales)


# ---- int4 -------------------------------------------------------------------------------


def int4_dequantize(q: Tensor, scale: Tensor, minimum: Tensor, group: int = INT4_GROUP) -> Tensor:
    """Reference: q [N, K] in 0..15, scale/minimum [N, K / group] -> W fp32 [N, K]."""
    n, k = q.shape
    w = q.float().view(n, k // group, group) * scale.float()[..., None] + minimum.float()[..., None]
    return w.view(n, k)


def int4_quantize(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max group quantisation (Q4_1's rule): (q uint8 [N, K], scale, minimum)."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    scale = (hi - lo) / 15.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round((w - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.view(n, k), scale, lo


def q4_1_unpack(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """GGUF Q4_1 bytes [N, K / 32 * 20] -> (q uint8 [N, K], scale fp32, minimum fp32 [N, K / 32])."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, 20)
    scale, minimum = _q4_1_scale_min(b)
    q = torch.empty(n, b.shape[1], 32, dtype=torch.uint8)
    _q4_1_split_nibbles(b[..., 4:20], q)
    return q.view(n, -1), scale, minimum


def _q4_1_scale_min(b: Tensor) -> tuple[Tensor, Tensor]:
    """(d, m) of Q4_1 blocks b [N, groups, 20] as fp32 [N, groups] each."""
    dm = b[..., 0:4].contiguous().view(torch.float16).float()  # [N, groups, 2]
    return dm[..., 0].contiguous(), dm[..., 1].contiguous()


def _q4_1_split_nibbles(packed: Tensor, out: Tensor) -> None:
    """packed [N, groups, 16] nibble pairs -> out [N, groups, 32] (low nibbles first), in place."""
    torch.bitwise_and(packed, 0x0F, out=out[..., :16])
    torch.bitwise_right_shift(packed, 4, out=out[..., 16:])


def q8_0_unpack(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """GGUF Q8_0 bytes [N, K / 32 * 34] -> (q int8 [N, K], scale fp32 [N, K / 32])."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, 34)
    scale = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    q = b[..., 2:34].contiguous().view(torch.int8)
    return q.reshape(n, -1), scale


def q8_0_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    n, k = q.shape
    return (q.float().view(n, k // 32, 32) * scale[..., None]).view(n, k)


class Int4Linear(QuantLinear):
    """Group-wise int4. Two copies of the 4-bit values, both 4 bits a weight: the kernel's
    pack for few rows (decode), and Q4_1-style nibbles (`nibbles[n, g, j]`: element j low,
    j + 16 high) that are expanded to a transient bf16 matrix for many rows (prefill): the
    int4 kernel costs ~44 us per row at K = 576, N = 3072, while expanding (2.3 ms) plus a
    oneDNN bf16 GEMM (4 ms for 512 rows) is 3.5x faster from ~64 rows on."""

    mode = "int4"

    def __init__(self, q: Tensor, scale: Tensor, minimum: Tensor, group: int = INT4_GROUP, compute_dtype: torch.dtype = torch.bfloat16, nibbles: Tensor | None = None):
        """q [N, K] in 0..15 (any integer dtype); `nibbles`, when the caller has them already
        (Q4_1's bytes), must be q's values packed as `expand` reads them."""
        super().__init__()
        n, k = q.shape
        if group != INT4_GROUP or k % group or scale.shape != (n, k // group) or minimum.shape != (n, k // group):
            raise ValueError(f"int4 weight [N, K] = {(n, k)} needs groups of {INT4_GROUP} and scale/minimum [N, K/{group}], got {tuple(scale.shape)}, {tuple(minimum.shape)}")
        self.out_features, self.in_features = n, k
        self.group = group
        self.compute_dtype = compute_dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), _INT4_INNER_K_TILES)
        zero = minimum.float() + 8.0 * scale.float()
        scale_zeros = torch.stack([scale.float().t(), zero.t()], dim=-1).to(compute_dtype).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)  # [K / group, N, 2]
        if nibbles is None:
            blocks = q.to(torch.uint8).view(n, k // group, group)
            nibbles = blocks[..., : group // 2] | (blocks[..., group // 2 :] << 4)
        self.register_buffer("nibbles", nibbles.reshape(n, k // group, group // 2))
        self.register_buffer("scale_min", torch.stack([scale.float(), minimum.float()]).unsqueeze(-1))  # [2, N, K/G, 1]

    @classmethod
    def from_float(cls, weight: Tensor, group: int = INT4_GROUP, compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        return cls(*int4_quantize(weight, group), group=group, compute_dtype=compute_dtype)

    @classmethod
    def from_q4_1(cls, blocks: Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Straight from GGUF Q4_1 bytes [N, K / 32 * 20] (exact: Q4_1 is the kernel's format
        with another zero point); its nibble bytes are already our `nibbles`."""
        n = blocks.shape[0]
        b = blocks.reshape(n, -1, 20)
        scale, minimum = _q4_1_scale_min(b)
        nibbles = b[..., 4:20].contiguous()
        q = torch.empty(n, b.shape[1], INT4_GROUP, dtype=torch.int32)
        _q4_1_split_nibbles(nibbles, q)
        return cls(q.view(n, -1), scale, minimum, compute_dtype=compute_dtype, nibbles=nibbles)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if x.shape[0] >= DENSE_MIN_ROWS:
            return F.linear(x.to(self.compute_dtype), self.expand())
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.compute_dtype), self.packed, self.group, self.scale_zeros)

    def few_rows(self) -> Callable[[Tensor], Tensor]:
        packed, group, scale_zeros, kernel = self.packed, self.group, self.scale_zeros, torch.ops.aten._weight_int4pack_mm_for_cpu
        return lambda x: kernel(x, packed, group, scale_zeros)

    def expand(self) -> Tensor:
        """W [N, K] in the compute dtype, from the nibbles (a transient for many-row calls)."""
        n, groups, half = self.nibbles.shape
        w = torch.empty(n, groups, 2 * half, dtype=torch.float32)
        torch.bitwise_and(self.nibbles, 0x0F, out=w[..., :half])
        torch.bitwise_right_shift(self.nibbles, 4, out=w[..., half:])
        w.mul_(self.scale_min[0]).add_(self.scale_min[1])  # in fp32: one rounding, at the cast
        return w.view(n, groups * 2 * half).to(self.compute_dtype)

    def rows(self, ids: Tensor) -> Tensor:
        raise NotImplementedError("the int4 pack has no row access; keep an embedding int8 or dense")

    def exported(self) -> tuple[str, dict[str, Tensor]]:
        if self.compute_dtype != torch.bfloat16:
            raise ValueError("only bf16-compute int4 layers are exported")
        return "int4", {"packed": self.packed, "scale_zeros": self.scale_zeros, "nibbles": self.nibbles, "scale_min": self.scale_min}

    @classmethod
    def stacked(cls, parts: list["Int4Linear"]) -> "Int4Linear":
        """One layer whose output rows are the parts' rows in order (the kernel's pack keeps
        output rows apart, so packs concatenate): converts a big matrix a row chunk at a time."""
        return cls.from_exported(
            torch.cat([p.packed for p in parts]),
            torch.cat([p.scale_zeros for p in parts], dim=1),
            torch.cat([p.nibbles for p in parts]),
            torch.cat([p.scale_min for p in parts], dim=1),
        )

    @classmethod
    def from_exported(cls, packed: Tensor, scale_zeros: Tensor, nibbles: Tensor, scale_min: Tensor) -> "Int4Linear":
        """A layer from the buffers `exported` returned (no repacking): the weights cache."""
        n, groups, half = nibbles.shape
        k = groups * 2 * half
        if (
            2 * half != INT4_GROUP
            or nibbles.dtype != torch.uint8
            or scale_zeros.shape != (groups, n, 2)
            or scale_zeros.dtype != torch.bfloat16
            or scale_min.shape != (2, n, groups, 1)
            or scale_min.dtype != torch.float32
            or packed.dtype != torch.uint8
            or packed.numel() * 2 != n * k
        ):
            raise ValueError("int4 buffers do not describe one layer")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = n, k
        layer.group = INT4_GROUP
        layer.compute_dtype = torch.bfloat16
        for name, value in (("packed", packed), ("scale_zeros", scale_zeros), ("nibbles", nibbles), ("scale_min", scale_min)):
            layer.register_buffer(name, value)
        return layer


def layer_from_exported(kind: str, tensors: dict[str, Tensor]) -> QuantLinear:
    """Inverse of `layer.exported()`; raises ValueError when the tensors do not fit `kind`."""
    if kind == "dense":
        if tensors["weight"].dim() != 2 or tensors["weight"].dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("dense weight must be 2-D fp32 or bf16")
        return DenseLinear(tensors["weight"])
    if kind in ("int8x1", "int8x2"):
        return Int8Linear(tensors["q"], tensors["scale"].float(), levels=int(kind[-1]))
    if kind == "int4":
        return Int4Linear.from_exported(tensors["packed"], tensors["scale_zeros"], tensors["nibbles"], tensors["scale_min"])
    raise ValueError(f"unknown layer kind {kind!r}")
