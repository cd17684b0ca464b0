"""Shared pieces of the differential tests: moving arrays between numpy and
mlx, an independent float64 model of the MLX affine format (unpacking and
gather semantics written from docs/format.md, not from gqmm's C code), and
the accuracy comparison every matmul test uses."""

import os
import time
import zlib

import mlx.core as mx
import numpy as np

import gqmm

mx.set_default_device(mx.cpu)

BITS = [2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), gqmm.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def seed():
    """One seed per test session: fresh inputs each run, printed for replay."""
    if not hasattr(seed, "value"):
        env = os.environ.get("GQMM_TEST_SEED")
        seed.value = int(env) if env else int(time.time())
        print(f"GQMM_TEST_SEED={seed.value}")
    return seed.value


def rng(*salt):
    """A generator for one test case: the session seed mixed with the case's own salt."""
    return np.random.default_rng([seed()] + [zlib.crc32(repr(s).encode()) for s in salt])


def to_mx(a):
    a = np.asarray(a)
    if a.dtype == gqmm.bfloat16:
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def to_np(a):
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(gqmm.bfloat16)
    return np.array(a)


def raw_bits(a):
    """The array's bit patterns, so that comparisons are exact (and NaN == NaN)."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_equal(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != mlx {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != mlx {want.shape}"
    diff = np.argwhere(raw_bits(got) != raw_bits(want))
    assert diff.size == 0, (
        f"{what}: {len(diff)} of {got.size} elements differ from mlx; first at "
        f"{tuple(diff[0])}: gqmm {got[tuple(diff[0])]!r} vs mlx {want[tuple(diff[0])]!r}"
    )


def unpack(wq, bits):
    """q-values of packed rows: element j is bits [j*bits, (j+1)*bits) of the
    row's little-endian byte stream (docs/format.md)."""
    wq = np.ascontiguousarray(wq, dtype=np.uint32)
    row_bytes = wq.view(np.uint8).reshape(wq.shape[:-1] + (wq.shape[-1] * 4,))
    stream = np.unpackbits(row_bytes, axis=-1, bitorder="little")
    k = wq.shape[-1] * 32 // bits
    stream = stream.reshape(wq.shape[:-1] + (k, bits)).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(axis=-1)


def dequant64(wq, scales, biases, group_size, bits):
    """The weights the quantized tensor stands for, exactly, in float64."""
    q = unpack(wq, bits).astype(np.float64)
    s = np.repeat(np.asarray(scales).astype(np.float64), group_size, axis=-1)
    b = np.repeat(np.asarray(biases).astype(np.float64), group_size, axis=-1)
    return s * q + b


def gather_truth(x, wq, scales, biases, lhs, rhs, transpose, group_size, bits):
    """float64 gather_qmm: out[i] = x_b[lhs[i]] @ W_b[rhs[i]](.T), MLX's rules:
    missing indices are arange over the batch dims, the two broadcast."""
    x64 = np.asarray(x).astype(np.float64)
    w64 = dequant64(wq, scales, biases, group_size, bits)
    xb_shape, wb_shape = x64.shape[:-2], w64.shape[:-2]
    if lhs is None:
        lhs = np.arange(int(np.prod(xb_shape))).reshape(xb_shape)
    if rhs is None:
        rhs = np.arange(int(np.prod(wb_shape))).reshape(wb_shape)
    lhs, rhs = np.broadcast_arrays(np.asarray(lhs, np.int64), np.asarray(rhs, np.int64))
    xs = x64.reshape((-1,) + x64.shape[-2:])
    ws = w64.reshape((-1,) + w64.shape[-2:])
    mats = [xs[li] @ (ws[ri].T if transpose else ws[ri]) for li, ri in zip(lhs.ravel(), rhs.ravel())]
    n = ws.shape[-2] if transpose else ws.shape[-1]
    return np.array(mats).reshape(lhs.shape + (x64.shape[-2], n))


def qmm_truth(x, wq, scales, biases, transpose, group_size, bits):
    """float64 quantized_matmul under MLX's batch rules: a 2-D w, or an x of
    ndim <= 2, folds x's leading dims into rows and uses the first matrix of
    w (MLX's CPU behaviour for a batched w); otherwise batch dims broadcast."""
    x64 = np.asarray(x).astype(np.float64)
    w64 = dequant64(wq, scales, biases, group_size, bits)
    if w64.ndim == 2 or x64.ndim <= 2:
        w0 = w64.reshape((-1,) + w64.shape[-2:])[0]
        return x64 @ (w0.T if transpose else w0)
    return x64 @ (np.swapaxes(w64, -1, -2) if transpose else w64)


def mlx_gather_qmm(x, wq, scales, biases, lhs, rhs, transpose, group_size, bits, sorted_indices=False):
    if lhs is None and rhs is None:
        y = mx.quantized_matmul(
            to_mx(x), to_mx(wq), to_mx(scales), to_mx(biases),
            transpose=transpose, group_size=group_size, bits=bits,
        )
    else:
        y = mx.gather_qmm(
            to_mx(x), to_mx(wq), to_mx(scales), to_mx(biases),
            None if lhs is None else mx.array(np.asarray(lhs, np.uint32)),
            None if rhs is None else mx.array(np.asarray(rhs, np.uint32)),
            transpose=transpose, group_size=group_size, bits=bits, sorted_indices=sorted_indices,
        )
    return to_np(y)


def accuracy_problem(got, mlx_out, truth, dtype, terms=None):
    """None if gqmm's result is at least as accurate as mlx's on the same
    inputs, else a description of the difference.

    Error = max |y - truth| over all elements, truth in float64 over the
    exactly dequantized weights. gqmm must satisfy err_gqmm <= slack * err_mlx
    + one ulp of the output dtype at max|truth|:
      - f16/bf16: slack 1. MLX's CPU kernel rounds every product and partial
        sum to the output dtype; gqmm accumulates in float32 and rounds once,
        so its error is about half an ulp of the output. The ulp term only
        covers a float32 sum that lands next to a rounding midpoint and
        rounds the other way than the exact value would.
      - f32: slack 2. Both results are float32 sums at rounding level (about
        sqrt(K) * 2^-24 relative); a backend that sums in another order (FMA,
        blocked partial sums) has an error of the same size but not the same
        value, and the maximum over few elements fluctuates by well under 2x.
        Any semantic slip (wrong group, scale, bias, index or bit) is 10^3 or
        more times larger than that.
        Plus, for f32 with `terms` (per output, sum over k of |x| (|s| q + |b|)):
        one float32 rounding of the largest, 2^-24 max(terms). gqmm sums each
        group as s * sum(x q) + b * sum(x) (the per-group identity), so its
        rounding is relative to those two terms; where they cancel (a result of
        0.04 from terms of 14, seed 1795762443) MLX's dequantize-then-dot can be
        closer by luck, by more than 2x a single element's error. A slip is
        still ~2^15 times this (x rounded to bf16) or far more.
    """
    got64 = np.asarray(got).astype(np.float64)
    if got64.shape != truth.shape:
        return f"shape {got64.shape} != truth {truth.shape}"
    if not np.all(np.isfinite(got64)):
        return "gqmm output has NaN/inf (an element was not written?)"
    err_g = float(np.max(np.abs(got64 - truth))) if truth.size else 0.0
    err_m = float(np.max(np.abs(np.asarray(mlx_out).astype(np.float64) - truth))) if truth.size else 0.0
    top = float(np.max(np.abs(truth))) if truth.size else 0.0
    ulp = float(np.spacing(np.array(top, dtype=dtype)).astype(np.float64))
    f32 = np.dtype(dtype) == np.float32
    slack = 2.0 if f32 else 1.0
    rounding = 2.0**-24 * float(np.max(terms)) if f32 and terms is not None and terms.size else 0.0
    if err_g <= slack * err_m + ulp + rounding:
        return None
    return f"max error {err_g:.3e} > {slack} * mlx's {err_m:.3e} + ulp {ulp:.1e} (max|truth| {top:.3e})"


def closeness_problem(got, mlx_out, truth, dtype, terms=None):
    """None if gqmm and mlx agree to within mlx's own error scale (plus, for
    f32 with terms, accuracy_problem's rounding allowance)."""
    got64 = np.asarray(got).astype(np.float64)
    m64 = np.asarray(mlx_out).astype(np.float64)
    if got64.shape != m64.shape:
        return f"shape {got64.shape} != mlx {m64.shape}"
    if not truth.size:
        return None
    err_m = float(np.max(np.abs(m64 - truth)))
    top = float(np.max(np.abs(truth)))
    ulp = float(np.spacing(np.array(top, dtype=dtype)).astype(np.float64))
    diff = float(np.max(np.abs(got64 - m64)))
    # gqmm lies within 2 err_m + ulp (+ rounding) of the truth (accuracy_problem),
    # mlx within err_m: so the two are within 3 err_m + ulp (+ rounding) of each other
    f32 = np.dtype(dtype) == np.float32
    rounding = 2.0**-24 * float(np.max(terms)) if f32 and terms is not None and terms.size else 0.0
    bound = 3.0 * err_m + 2.0 * ulp + rounding
    return None if diff <= bound else f"differs from mlx by {diff:.3e} > {bound:.3e}"


def make_weights(r, shape, dtype, group_size, bits, backend="ref"):
    """Random weights quantized by gqmm (bit-exact with mlx, tested separately)."""
    w = (r.standard_normal(shape) * r.choice([0.02, 1.0, 30.0])).astype(dtype)
    return gqmm.quantize(w, group_size=group_size, bits=bits, backend=backend)


def check_gather(x, wq, scales, biases, lhs, rhs, transpose, group_size, bits, dtype, backend,
                 sorted_indices=False, gq_inputs=None):
    """Run gqmm (optionally on altered inputs gq_inputs) and mlx on the same
    problem; return a list of problems (empty when gqmm is right)."""
    args = gq_inputs or (x, wq, scales, biases, lhs, rhs)
    if args[4] is None and args[5] is None:
        got = gqmm.quantized_matmul(*args[:4], transpose=transpose, group_size=group_size,
                                    bits=bits, backend=backend)
    else:
        got = gqmm.gather_qmm(*args, transpose=transpose, group_size=group_size, bits=bits,
                              sorted_indices=sorted_indices, backend=backend)
    mlx_out = mlx_gather_qmm(x, wq, scales, biases, lhs, rhs, transpose, group_size, bits,
                             sorted_indices)
    def truth_of(xv, sv, bv):
        if lhs is None and rhs is None:
            return qmm_truth(xv, wq, sv, bv, transpose, group_size, bits)
        return gather_truth(xv, wq, sv, bv, lhs, rhs, transpose, group_size, bits)

    truth = truth_of(x, scales, biases)
    terms = None  # f32: the magnitudes the per-group identity rounds (accuracy_problem)
    if np.dtype(mlx_out.dtype) == np.float32:
        terms = truth_of(np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(scales, np.float64)),
                         np.abs(np.asarray(biases, np.float64)))
    problems = []
    if got.dtype != mlx_out.dtype:
        problems.append(f"dtype {got.dtype} != mlx {mlx_out.dtype}")
    for p in (accuracy_problem(got, mlx_out, truth, mlx_out.dtype, terms),
              closeness_problem(got, mlx_out, truth, mlx_out.dtype, terms)):
        if p:
            problems.append(p)
    return problems
