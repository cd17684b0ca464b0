"""What mlx.core computes on its CPU backend (the Linux wheel pinned in the
Makefile), settled by experiment; docs/format.md states the answers. If a new
mlx changes any of this, these tests say which statement in the doc is stale."""

import mlx.core as mx
import numpy as np
import pytest

import gqmm
from helpers import dequant64, make_weights, mlx_gather_qmm, raw_bits, rng, to_mx, to_np, unpack


def emulate_mlx_cpu_qmm(x, wq, s, b, group_size, bits, dtype):
    """MLX's scalar CPU kernel in numpy: for each (m, n), k ascending,
    sum = T(sum + T(x * T(T(s * q) + b))) with every op rounded to T, no FMA."""
    T = np.dtype(dtype)
    q = unpack(wq, bits).astype(T)
    sg = np.repeat(s, group_size, axis=-1)
    bg = np.repeat(b, group_size, axis=-1)
    w = ((sg * q).astype(T) + bg).astype(T)  # (N, K)
    acc = np.zeros((x.shape[0], w.shape[0]), dtype=T)
    for k in range(x.shape[1]):
        acc = (acc + (x[:, k, None] * w[None, :, k]).astype(T)).astype(T)
    return acc


@pytest.mark.parametrize("dtype", [np.float32, np.float16, gqmm.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mlx_cpu_qmm_is_a_sequential_sum_in_the_output_dtype(dtype, bits):
    """Open question 1 (FMA contraction) and 2 (SIMD path on Linux): the wheel's
    qmm is the scalar loop, each op rounded to T, no FMA, k ascending."""
    r = rng("mlx-kernel", bits, str(dtype))
    wq, s, b = make_weights(r, (13, 128), dtype, 64, bits)
    x = r.standard_normal((5, 128)).astype(dtype)
    want = mlx_gather_qmm(x, wq, s, b, None, None, True, 64, bits)
    got = emulate_mlx_cpu_qmm(x, wq, s, b, 64, bits, dtype)
    assert np.array_equal(raw_bits(got), raw_bits(want))


def test_gqmm_reference_f32_is_bit_identical_to_mlx():
    """Consequence for float32: gqmm's reference (float32 w = s*q + b, float32
    sequential sum) computes the same float ops in the same order as mlx."""
    r = rng("ref-f32")
    wq, s, b = make_weights(r, (3, 40, 256), np.float32, 32, 5)
    x = r.standard_normal((4, 3, 256)).astype(np.float32)
    rhs = np.array([2, 0, 2, 1], np.uint32)
    got = gqmm.gather_qmm(x, wq, s, b, rhs_indices=rhs, group_size=32, bits=5, backend="ref")
    want = mlx_gather_qmm(x, wq, s, b, None, rhs, True, 32, 5)
    assert np.array_equal(raw_bits(got), raw_bits(want))


def test_mlx_half_accumulation_is_less_accurate_than_gqmm():
    """Why gqmm accumulates in float32 even for bf16 outputs: on a long K,
    MLX's bf16 running sum drifts far more than one final rounding does."""
    r = rng("bf16-drift")
    wq, s, b = make_weights(r, (16, 4096), gqmm.bfloat16, 64, 4)
    x = r.standard_normal((4, 4096)).astype(gqmm.bfloat16)
    truth = x.astype(np.float64) @ dequant64(wq, s, b, 64, 4).T
    err_mlx = np.abs(mlx_gather_qmm(x, wq, s, b, None, None, True, 64, 4) - truth).max()
    err_gqmm = np.abs(gqmm.quantized_matmul(x, wq, s, b, backend="ref").astype(np.float64) - truth).max()
    assert err_gqmm * 4 < err_mlx


def test_mlx_quantize_on_cpu_clamps_both_ends_and_rounds_half_even():
    """The CPU quantizer (not Metal's): all-negative groups keep their own
    range (w_max is not clamped at 0), ties go to even, q is clamped at 0."""
    w = np.array([[-1.0] * 31 + [-4.0]], np.float32)  # all negative
    wq, s, b = [to_np(a) for a in mx.quantize(to_mx(w), group_size=32, bits=2)]
    assert float(b[0, 0]) == -4.0 and float(s[0, 0]) > 0  # edge = min, scale = 3/3
    assert list(unpack(wq, 2)[0, :2]) == [3, 3]
    ties = np.array([[0.0, 0.5, 1.5, 2.5] + [3.0] * 28], np.float32)  # scale -1, bias 3
    wq, s, b = [to_np(a) for a in mx.quantize(to_mx(ties), group_size=32, bits=2)]
    assert float(s[0, 0]) == -1.0 and float(b[0, 0]) == 3.0
    # (w - 3) / -1 = 3, 2.5, 1.5, 0.5 -> rint: 3, 2, 2, 0
    assert list(unpack(wq, 2)[0, :4]) == [3, 2, 2, 0]


def test_mlx_dequantize_output_dtype_and_gather_default_indices():
    """dequantize's dtype is promote(scales, biases); gather_qmm with only rhs
    given uses arange over x's batch for lhs, broadcast against rhs."""
    r = rng("dtype-rules")
    wq, s, b = make_weights(r, (2, 8, 64), np.float16, 32, 4)
    out = mx.dequantize(to_mx(wq), to_mx(s), to_mx(b.astype(gqmm.bfloat16)), group_size=32, bits=4)
    assert out.dtype == mx.float32
    x = r.standard_normal((3, 1, 2, 64)).astype(np.float16)
    y = mlx_gather_qmm(x, wq, s, b, None, np.array([[1, 0, 1, 1]], np.uint32), True, 32, 4)
    assert y.shape == (3, 4, 2, 8)
