"""DeepSeek-V4's low-precision formats, reference dequantisation, and the QAT simulation.

Formats (spec §5):
- FP8 weights: `float8_e4m3fn` (max 448) with one scale per [bo, bi] block (128x128 in the
  shipped checkpoints), stored as `<name>.scale` of shape [ceil(out/bo), ceil(in/bi)].
- Scales: `float8_e8m0fnu` (UE8M0): one unsigned exponent byte, value 2^(byte-127), 255 = NaN.
- FP4 expert weights: e2m1, two per int8 byte, element 2k in the LOW nibble and 2k+1 in the
  high one; nibble 0-7 -> {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 is the sign. One e8m0 scale per
  32 inputs: W[i, j] = LUT[nib(i, j)] * 2^(S[i, j // 32] - 127). Stored [out, in/2].

QAT simulation (DeepSeek's reference rounds inside the model to mirror training):
- `fp8_round`: per-block e4m3 round trip with a power-of-two scale 2^ceil(log2(amax/448)),
  amax clamped >= 1e-4 (activations before FP8/FP4 matmuls; KV entries' non-RoPE dims).
- `fp4_round`: per-32 e2m1 round trip with scale 2^ceil(log2(amax/6)) (indexer q and keys,
  after `hadamard`).

Everything here is plain torch on any device; the `*Linear` modules dequantise the whole
weight per call (the reference path). Faster kernels must keep these signatures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_BLOCK = 32
E8M0_BIAS = 127

# e2m1 magnitudes by nibble code 0-7; codes 8-15 are the negatives.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---------- e8m0 scales ----------


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 bytes (uint8 or float8_e8m0fnu) to float32 powers of two."""
    raw = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    value = torch.exp2(raw.to(torch.float32) - E8M0_BIAS)
    return torch.where(raw == 255, torch.full_like(value, float("nan")), value)


def float_to_e8m0(pow2: torch.Tensor) -> torch.Tensor:
    """Encode exact powers of two in [2^-127, 2^127] as float8_e8m0fnu."""
    exponent = torch.log2(pow2.to(torch.float32)).round().to(torch.int32)
    return (exponent + E8M0_BIAS).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (the UE8M0 scale rounding)."""
    return torch.exp2(torch.ceil(torch.log2(x)))


# ---------- FP8 weights ----------


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """FP8 e4m3 [out, in] with block scales [ceil(out/bo), ceil(in/bi)] -> float32 [out, in]."""
    out_features, in_features = weight.shape
    bo, bi = block
    s = scale_to_float(scale)
    s = s.repeat_interleave(bo, dim=0)[:out_features].repeat_interleave(bi, dim=1)[:, :in_features]
    return weight.to(torch.float32) * s


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: e8m0 bytes decode, float scales (Base checkpoints) pass through."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(scale)
    return scale.to(torch.float32)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (e4m3 [out, in], e8m0 scales) with power-of-two block scales.

    The inverse of `dequant_fp8`; used to write test checkpoints and to check round trips.
    """
    out_features, in_features = weight.shape
    bo, bi = block
    rows, cols = -(-out_features // bo), -(-in_features // bi)
    padded = F.pad(weight.to(torch.float32), (0, cols * bi - in_features, 0, rows * bo - out_features))
    blocks = padded.view(rows, bo, cols, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)
    scale = pow2_ceil(amax / FP8_MAX)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(rows * bo, cols * bi)[:out_features, :in_features].contiguous()
    return q, float_to_e8m0(scale)


# ---------- FP4 weights ----------


def fp4_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Nibble codes 0-15 -> float32 e2m1 values."""
    lut = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., n/2] -> nibble codes uint8 [..., n]; low nibble first."""
    raw = packed.view(torch.uint8)
    low, high = raw & 0x0F, raw >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Nibble codes [..., n] (n even) -> int8 [..., n/2]; element 2k goes to the low nibble."""
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


def float_to_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already scaled into [-6, 6]) to the nearest e2m1 code.

    Ties go to the even code, as the hardware cast does: 0.25->0, 0.75->1, 1.25->1,
    1.75->2, 2.5->2, 3.5->4, 5->4.
    """
    a = x.abs()
    magnitude = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    )
    sign = ((x < 0) & (magnitude > 0)).to(torch.uint8) << 3
    return magnitude | sign


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Packed FP4 [out, in/2] with scales [out, in/block] -> float32 [out, in]."""
    values = fp4_codes_to_float(unpack_fp4(packed))
    s = scale_to_float(scale).repeat_interleave(block, dim=-1)
    return values * s[..., : values.shape[-1]]


def quantize_fp4(weight: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (packed int8 [out, in/2], e8m0 scales [out, in/block])."""
    out_features, in_features = weight.shape
    blocks = weight.to(torch.float32).view(out_features, in_features // block, block)
    amax = blocks.abs().amax(-1).clamp_min(FP4_MAX * 2.0**-126)
    scale = pow2_ceil(amax / FP4_MAX)
    codes = float_to_fp4_codes((blocks / scale[..., None]).clamp(-FP4_MAX, FP4_MAX))
    return pack_fp4(codes.view(out_features, in_features)), float_to_e8m0(scale)


# ---------- QAT simulation of activations and cache entries ----------


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    n = x.shape[-1]
    pad = -n % block
    xf = F.pad(x.to(torch.float32), (0, pad)) if pad else x.to(torch.float32)
    return xf.unflatten(-1, (-1, block)), n


def fp8_round(x: torch.Tensor, block: int) -> torch.Tensor:
    """Round-trip x through per-block e4m3 with power-of-two scales (blocks along the last dim).

    A last dim that is not a multiple of `block` is zero-padded (tiny test configs); zeros do
    not change a block's amax.
    """
    blocks, n = _blocks(x, block)
    scale = pow2_ceil(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / FP8_MAX)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale
    return q.flatten(-2)[..., :n].to(x.dtype)


def fp4_round(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Round-trip x through per-block e2m1 with power-of-two scales (indexer q/k simulation)."""
    blocks, n = _blocks(x, block)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    scale = pow2_ceil(amax / FP4_MAX)
    q = fp4_codes_to_float(float_to_fp4_codes((blocks / scale).clamp(-FP4_MAX, FP4_MAX))) * scale
    return q.flatten(-2)[..., :n].to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard transform of the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    y = x.to(torch.float32).reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * n**-0.5).to(x.dtype)


# ---------- linear layers ----------


class DenseLinear(nn.Module):
    """y = x W^T with W kept in its checkpoint dtype (bf16/fp32) and cast per call."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))

    def dequantized(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Fp8Linear(nn.Module):
    """FP8 e4m3 weight [out, in] with e8m0 block scales; dequantised per matmul.

    With `simulate`, the input is first rounded to FP8 per token in blocks of the weight's
    input block size, as the reference's act_quant + fp8_gemm do.
    """

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], simulate: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.simulate = block, simulate
        bo, bi = block
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer(
            "scale", torch.empty(-(-out_features // bo), -(-in_features // bi), dtype=torch.float8_e8m0fnu)
        )

    def dequantized(self) -> torch.Tensor:
        return dequant_fp8(self.weight, self.scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.simulate:
            x = fp8_round(x, self.block[1])
        return F.linear(x, self.dequantized().to(x.dtype))


class Fp4Linear(nn.Module):
    """Packed FP4 e2m1 weight [out, in/2] with one e8m0 scale per 32 inputs; dequantised per matmul.

    The reference's fp4_gemm also quantises its input to FP8 first (block 128 along K).
    """

    def __init__(self, in_features: int, out_features: int, act_block: int = 128, simulate: bool = False):
        super().__init__()
        if in_features % FP4_BLOCK:
            raise ValueError(f"FP4 input size {in_features} is not a multiple of {FP4_BLOCK}")
        self.in_features, self.out_features = in_features, out_features
        self.act_block, self.simulate = act_block, simulate
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, in_features // FP4_BLOCK, dtype=torch.float8_e8m0fnu))

    def dequantized(self) -> torch.Tensor:
        return dequant_fp4(self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.simulate:
            x = fp8_round(x, self.act_block)
        return F.linear(x, self.dequantized().to(x.dtype))


def make_linear(
    in_features: int,
    out_features: int,
    fmt: str,
    *,
    block: tuple[int, int] = (128, 128),
    simulate: bool = False,
    dense_dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """The linear layer for a checkpoint format: 'fp8', 'fp4' or 'dense'."""
    if fmt == "fp8":
        return Fp8Linear(in_features, out_features, block, simulate)
    if fmt == "fp4":
        return Fp4Linear(in_features, out_features, block[1], simulate)
    return DenseLinear(in_features, out_features, dense_dtype)
