"""engine.quant: each fast kernel against its dequantise-then-matmul reference, and the GGUF
block unpackers against gguf's own dequantisers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from engine.quant import (
    DenseLinear,
    Int4Linear,
    Int8Linear,
    int4_dequantize,
    int4_quantize,
    int8_dequantize,
    int8_quantize_levels,
    q4_1_unpack,
    q8_0_dequantize,
    q8_0_unpack,
)


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k**0.5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_q4_1_unpack_matches_gguf_dequantize():
    w = _weights(48, 96).numpy()
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    q, scale, minimum = q4_1_unpack(torch.from_numpy(blocks))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    np.testing.assert_allclose(int4_dequantize(q, scale, minimum).numpy(), expected, rtol=0, atol=1e-6)


def test_q8_0_unpack_matches_gguf_dequantize():
    w = _weights(40, 64).numpy()
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(q8_0_dequantize(*q8_0_unpack(torch.from_numpy(blocks))).numpy(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (960, 576)])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_kernel_matches_reference(shape, rows):
    n, k = shape
    q, scale, minimum = int4_quantize(_weights(n, k))
    layer = Int4Linear(q, scale, minimum)
    x = torch.randn(2, rows, k)
    reference = torch.nn.functional.linear(x, int4_dequantize(q, scale, minimum))
    y = layer(x)
    assert y.shape == (2, rows, n) and y.dtype == torch.bfloat16
    # bf16 activations, scales and outputs: ~3 significant digits.
    assert _rel_err(y, reference) < 1.5e-2


def test_int4_from_q4_1_blocks_is_exact_up_to_bf16():
    w = _weights(128, 64, seed=3).numpy()
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    layer = Int4Linear(*q4_1_unpack(torch.from_numpy(blocks)))
    x = torch.randn(4, 64)
    expected = x @ torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)).t()
    assert _rel_err(layer(x), expected) < 1.5e-2


def test_int4_quantize_error_is_bounded_by_half_a_step():
    w = _weights(32, 64, seed=1)
    q, scale, minimum = int4_quantize(w)
    err = (int4_dequantize(q, scale, minimum) - w).abs().view(32, 2, 32)
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("levels", [1, 2])
def test_int8_kernel_matches_reference(levels):
    w = _weights(200, 64)
    layer = Int8Linear.from_float(w, levels=levels)
    x = torch.randn(3, 64)
    reference = torch.nn.functional.linear(x, layer.dequantize())
    assert layer(x).shape == (3, 200)
    assert _rel_err(layer(x), reference) < 1.5e-2
    ids = torch.tensor([[0, 7], [199, 3]])
    torch.testing.assert_close(layer.rows(ids), layer.dequantize()[ids])


def test_two_level_int8_is_far_more_precise_than_one():
    w = _weights(64, 64, seed=2) * torch.linspace(0.01, 10, 64)  # rows with a wide value range
    one = (int8_dequantize(*int8_quantize_levels(w, 1)) - w).abs().max()
    q, s = int8_quantize_levels(w, 2)
    two = (int8_dequantize(q, s).view(2, 64, 64).sum(0) - w).abs().max()
    assert two < one / 50


def test_dense_linear_casts_to_its_dtype():
    w = _weights(8, 16)
    layer = DenseLinear(w.to(torch.bfloat16))
    y = layer(torch.randn(2, 16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(layer.rows(torch.tensor([1])), w[1:2].to(torch.bfloat16).float())


def test_int8_rejects_a_malformed_weight():
    with pytest.raises(ValueError):
        Int8Linear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


def test_int4_direct_from_q4_1_bytes_equals_unpacked_route():
    """from_q4_1 reuses Q4_1's nibble bytes; every buffer must match the unpack-then-pack route."""
    w = _weights(96, 128, seed=4).numpy()
    blocks = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1))
    direct, unpacked = Int4Linear.from_q4_1(blocks), Int4Linear(*q4_1_unpack(blocks))
    for name in ("packed", "scale_zeros", "nibbles", "scale_min"):
        assert torch.equal(getattr(direct, name), getattr(unpacked, name)), name
    x = torch.randn(70, 128)  # past DENSE_MIN_ROWS: the expanded path reads the nibbles
    assert torch.equal(direct(x), unpacked(x))
    assert torch.equal(direct(x[:3]), unpacked(x[:3]))


@pytest.mark.parametrize("kind", ["dense-fp32", "dense-bf16", "int8", "int8x2", "int4"])
def test_few_rows_kernel_equals_forward(kind):
    """few_rows() is forward without its checks: the same numbers for decode-sized inputs."""
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    layer = {
        "dense-fp32": lambda: DenseLinear(weight),
        "dense-bf16": lambda: DenseLinear(weight.bfloat16()),
        "int8": lambda: Int8Linear.from_float(weight),
        "int8x2": lambda: Int8Linear.from_float(weight, levels=2),
        "int4": lambda: Int4Linear.from_float(weight),
    }[kind]()
    x = torch.randn(3, 64).to(layer.compute_dtype)
    assert torch.equal(layer.few_rows()(x), layer.forward(x))


def test_stacked_int4_equals_one_conversion():
    """Int4Linear.stacked: row chunks converted apart give the whole matrix's layer exactly."""
    weight = torch.randn(160, 64, generator=torch.Generator().manual_seed(4))
    whole = Int4Linear.from_float(weight)
    stacked = Int4Linear.stacked([Int4Linear.from_float(weight[:64]), Int4Linear.from_float(weight[64:])])
    for name in ("packed", "scale_zeros", "nibbles", "scale_min"):
        assert torch.equal(getattr(stacked, name), getattr(whole, name)), name
    x = torch.randn(2, 64).bfloat16()
    assert torch.equal(stacked.forward(x), whole.forward(x))
