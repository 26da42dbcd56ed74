"""FP8 / FP4 formats against hand-computed values, and the quantised linear layers."""

from __future__ import annotations

import pytest
import torch

from engine.fp8 import (
    DenseLinear,
    Fp4Linear,
    Fp8Linear,
    dequant_fp4,
    dequant_fp8,
    e8m0_to_float,
    float_to_e8m0,
    float_to_fp4_codes,
    fp4_codes_to_float,
    fp4_round,
    fp8_round,
    hadamard,
    pack_fp4,
    quantize_fp4,
    quantize_fp8,
    unpack_fp4,
)


def test_e8m0_decodes_biased_exponents():
    raw = torch.tensor([127, 128, 126, 0, 254, 255], dtype=torch.uint8)
    got = e8m0_to_float(raw)
    assert got[:5].tolist() == [1.0, 2.0, 0.5, 2.0**-127, 2.0**127]
    assert torch.isnan(got[5])
    # float8_e8m0fnu tensors decode the same as their bytes.
    assert torch.equal(e8m0_to_float(raw[:5].view(torch.float8_e8m0fnu)), got[:5])
    assert float_to_e8m0(torch.tensor([0.25, 8.0])).view(torch.uint8).tolist() == [125, 130]


def test_fp4_low_nibble_is_the_first_element():
    # byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1.
    # byte 0xF8: low nibble 8 (-0), high nibble 15 (-6).
    packed = torch.tensor([[0x21, 0xF8 - 256]], dtype=torch.int8)
    assert unpack_fp4(packed).tolist() == [[1, 2, 8, 15]]
    assert fp4_codes_to_float(unpack_fp4(packed)).tolist() == [[0.5, 1.0, -0.0, -6.0]]
    assert torch.equal(pack_fp4(unpack_fp4(packed)), packed)


def test_fp4_lut_covers_all_sixteen_codes():
    values = fp4_codes_to_float(torch.arange(16)).tolist()
    assert values[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert values[8:] == [-v for v in values[:8]]


def test_fp4_rounding_ties_to_even_codes():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, -2.9, 7.0])
    got = fp4_codes_to_float(float_to_fp4_codes(x.clamp(-6, 6))).tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, -3.0, 6.0]


def test_dequant_fp4_applies_one_scale_per_32_inputs():
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 31], codes[0, 32], codes[0, 63] = 2, 7, 2, 11  # 1, 6, 1, -1.5
    scale = torch.tensor([[128, 125]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2, 0.25
    w = dequant_fp4(pack_fp4(codes), scale)
    assert w.shape == (1, 64)
    assert [w[0, 0].item(), w[0, 31].item(), w[0, 32].item(), w[0, 63].item()] == [2.0, 12.0, 0.25, -0.375]
    assert w.abs().sum().item() == 2 + 12 + 0.25 + 0.375


def test_dequant_fp8_maps_block_scales_by_index():
    w = torch.ones(130, 260).to(torch.float8_e4m3fn)  # 2 x 3 blocks of 128, ragged edges
    exps = torch.tensor([[127, 128, 129], [126, 125, 130]], dtype=torch.uint8)
    out = dequant_fp8(w, exps.view(torch.float8_e8m0fnu))
    assert out[0, 0] == 1 and out[127, 127] == 1
    assert out[0, 128] == 2 and out[0, 256] == 4 and out[0, 259] == 4
    assert out[128, 0] == 0.5 and out[129, 200] == 0.25 and out[129, 259] == 8


def test_quantize_round_trips_within_format_precision():
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    assert torch.allclose(dequant_fp8(q, s), w, rtol=2**-3, atol=2**-6)
    p, s4 = quantize_fp4(w[:, :256])
    assert p.dtype == torch.int8 and p.shape == (200, 128) and s4.shape == (200, 8)
    # e2m1 keeps one mantissa bit: relative error up to 1/4 of the block max's power of two.
    err = (dequant_fp4(p, s4) - w[:, :256]).abs()
    assert (err <= w[:, :256].abs().view(200, 8, 32).amax(-1).repeat_interleave(32, -1) / 4 + 1e-6).all()
    # Values already on the grid survive exactly.
    exact = dequant_fp4(p, s4)
    assert torch.equal(dequant_fp4(*quantize_fp4(exact)), exact)


def test_fp8_round_uses_power_of_two_block_scales():
    x = torch.tensor([[448.0, 1.0, 0.3, -100.0]])
    # amax 448 -> scale 1: values round to e4m3 directly (0.3 -> 0.3125 at exponent -2).
    assert fp8_round(x, 4).tolist() == [[448.0, 1.0, 0.3125, -96.0]]
    # amax 500 -> scale 2^ceil(log2(500/448)) = 2: 3 is stored as 1.5 * 2.
    y = torch.tensor([[500.0, 3.0]])
    assert fp8_round(y, 2).tolist() == [[512.0, 3.0]]
    # blocks are independent; a ragged tail is padded, not mixed into another block
    z = torch.tensor([[1000.0, 1.1, 1.1]])
    assert fp8_round(z, 2)[0, 2].item() == pytest.approx(1.125)


def test_fp4_round_scales_each_block_to_six():
    x = torch.tensor([[6.0, 3.1, -1.2, 0.2] + [0.0] * 28])
    assert fp4_round(x)[0, :4].tolist() == [6.0, 3.0, -1.0, 0.0]
    assert fp4_round(x * 8)[0, :4].tolist() == [48.0, 24.0, -8.0, 0.0]


def test_hadamard_is_orthonormal_sylvester():
    h = hadamard(torch.eye(8))
    assert torch.allclose(h @ h.T, torch.eye(8), atol=1e-6)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(8)] for a in range(8)])
    assert torch.allclose(h, (1 - 2 * parity).float() / 8**0.5)
    with pytest.raises(ValueError):
        hadamard(torch.ones(6))


def _fill(module: torch.nn.Module, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    module.weight = weight
    if scale is not None:
        module.scale = scale


def test_quantised_linears_dequantise_per_matmul():
    torch.manual_seed(1)
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    q, s = quantize_fp8(w, (32, 32))
    lin = Fp8Linear(64, 48, (32, 32))
    _fill(lin, q, s)
    assert torch.allclose(lin(x), x @ dequant_fp8(q, s, (32, 32)).T, atol=1e-5)
    assert lin.weight.dtype == torch.float8_e4m3fn  # still quantised after the call

    p, s4 = quantize_fp4(w)
    lin4 = Fp4Linear(64, 48)
    _fill(lin4, p, s4)
    assert torch.allclose(lin4(x), x @ dequant_fp4(p, s4).T, atol=1e-5)

    dense = DenseLinear(64, 48)
    _fill(dense, w.to(torch.bfloat16))
    assert torch.allclose(dense(x), x @ w.to(torch.bfloat16).float().T, atol=1e-5)


def test_simulated_activation_rounding_matches_fp8_round():
    torch.manual_seed(2)
    w, x = torch.randn(16, 64), torch.randn(5, 64)
    q, s = quantize_fp8(w, (32, 32))
    lin = Fp8Linear(64, 16, (32, 32), simulate=True)
    _fill(lin, q, s)
    expect = fp8_round(x, 32) @ dequant_fp8(q, s, (32, 32)).T
    assert torch.allclose(lin(x), expect, atol=1e-5)
    assert not torch.allclose(lin(x), x @ dequant_fp8(q, s, (32, 32)).T, atol=1e-4)
