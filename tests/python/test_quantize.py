"""gqmm.quantize / gqmm.dequantize must be bit-exact with mlx.core on its CPU
backend: packed words, scales, biases and dequantized values identical, for
every bits x group size x dtype, on fresh random inputs and on the edge cases
of MLX's algorithm (docs/format.md)."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import gqmm
from helpers import (BITS, DTYPE_IDS, DTYPES, GROUP_SIZES, assert_bit_equal, raw_bits, rng,
                     to_mx, to_np, unpack)

FORMATS = list(itertools.product(BITS, GROUP_SIZES, zip(DTYPES, DTYPE_IDS)))
FORMAT_IDS = [f"b{b}-g{g}-{d[1]}" for b, g, d in FORMATS]


def compare_quantize(w, group_size, bits, what):
    got = gqmm.quantize(w, group_size=group_size, bits=bits)
    want = [to_np(a) for a in mx.quantize(to_mx(w), group_size=group_size, bits=bits)]
    for name, g, m in zip(("wq", "scales", "biases"), got, want):
        assert_bit_equal(g, m, f"{what}: {name}")
    # dequantize mlx's own quantization: identical bits again
    deq = gqmm.dequantize(*want, group_size=group_size, bits=bits)
    mdeq = to_np(mx.dequantize(*[to_mx(a) for a in want], group_size=group_size, bits=bits))
    assert_bit_equal(deq, mdeq, f"{what}: dequantize")
    return got


def edge_rows(r, dtype, group_size, bits):
    """One group per row, each exercising one branch of MLX's quantizer."""
    g = group_size
    n_bins = 2**bits - 1
    rows = [
        np.zeros(g),                                       # all zero: scale -eps, bias 0
        np.full(g, 3.0),                                   # constant positive
        np.full(g, -0.75),                                 # constant negative
        -np.abs(r.standard_normal(g)) - 0.1,               # all negative: edge = min, scale > 0
        np.abs(r.standard_normal(g)) + 0.1,                # all positive: edge = max, scale < 0
        np.r_[0.0, np.abs(r.standard_normal(g - 1))],      # min exactly 0 (q0 == 0 branch)
        np.r_[0.0, -np.abs(r.standard_normal(g - 1))],     # max exactly 0
        r.integers(0, n_bins + 1, g).astype(np.float64),   # on the grid: (w-b)/s integral
        r.integers(0, 2 * n_bins + 1, g) / 2.0,            # half-integers: round-half-even ties
        r.integers(-2 * n_bins, 1, g) / 4.0,               # negative grid with ties
        np.r_[-1.0, 1.0, r.uniform(-1, 1, g - 2)],         # |min| == |max|: edge is max
        r.standard_normal(g) * 1e-6,                       # tiny: scale near eps
        r.standard_normal(g) * 1e3,                        # large
        np.r_[np.full(g - 1, 1.0), 1.0 + 2.0**-7],         # nearly constant
    ]
    return np.array(rows).astype(dtype)


@pytest.mark.parametrize("bits,group_size,dt", FORMATS, ids=FORMAT_IDS)
def test_quantize_random_matches_mlx(bits, group_size, dt):
    dtype, dname = dt
    r = rng("quantize", bits, group_size, dname)
    rows = int(r.integers(1, 40))
    groups = int(r.integers(1, 5))
    scale = r.choice([1e-3, 1.0, 50.0], size=(rows, 1))
    w = (r.standard_normal((rows, groups * group_size)) * scale).astype(dtype)
    compare_quantize(w, group_size, bits, f"random {w.shape}")


@pytest.mark.parametrize("bits,group_size,dt", FORMATS, ids=FORMAT_IDS)
def test_quantize_edge_cases_match_mlx(bits, group_size, dt):
    dtype, dname = dt
    r = rng("edges", bits, group_size, dname)
    w = edge_rows(r, dtype, group_size, bits)
    wq, scales, biases = compare_quantize(w, group_size, bits, "edge rows")
    s = scales.astype(np.float64).ravel()
    assert s[0] < 0 and biases[0] == 0  # all-zero group: scale -eps, bias 0
    assert s[3] > 0 and s[4] < 0  # all-negative groups get positive scales, and vice versa
    # the edge (larger-magnitude extreme) decodes exactly in float32: q=0 -> bias
    assert np.all(unpack(wq[:1], bits) == 0)


@pytest.mark.parametrize("dt", list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
def test_quantize_batched_and_large_k(dt):
    dtype, dname = dt
    r = rng("batched", dname)
    w = r.standard_normal((2, 3, 5, 4096)).astype(dtype)
    for bits in (3, 4):
        compare_quantize(w, 64, bits, f"batched {w.shape} bits {bits}")


@pytest.mark.parametrize("dt", list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
def test_quantize_random_bit_patterns_match_mlx(dt):
    """Every finite value of moderate exponent, subnormals included."""
    dtype, dname = dt
    r = rng("patterns", dname)
    if dtype == np.float32:
        u = r.integers(0, 2**32, size=(64, 256), dtype=np.uint64).astype(np.uint32)
        w = (u & np.uint32(0xBFFFFFFF)).view(np.float32)  # exponent < 128: |w| < 2
    else:
        u = r.integers(0, 2**16, size=(64, 256)).astype(np.uint16)
        w = (u & np.uint16(0xBFFF if dtype == gqmm.bfloat16 else 0xBBFF)).view(dtype)
    for bits in BITS:
        compare_quantize(w, 32, bits, f"bit patterns bits {bits}")


@pytest.mark.parametrize("dt", list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
def test_quantize_nan_and_inf_match_mlx(dt):
    """Non-finite input gives garbage, but the same garbage as mlx."""
    dtype, dname = dt
    r = rng("nonfinite", dname)
    w = r.standard_normal((6, 32)).astype(np.float32)
    w[0, 3] = np.nan
    w[1, :] = np.nan
    w[2, 5] = np.inf
    w[3, 7] = -np.inf
    w[4, 2], w[4, 3] = 6e4, -6e4  # (max - min) overflows float16's range, not float32's
    w[5, 0] = -0.0
    for bits in (2, 4, 5):
        compare_quantize(w.astype(dtype), 32, bits, f"non-finite bits {bits}")


@pytest.mark.parametrize("bits", BITS)
def test_packed_layout_is_a_little_endian_bit_stream(bits):
    """Known q-values land at bits [j*bits, (j+1)*bits) of the row's bytes."""
    r = rng("layout", bits)
    n_bins = 2**bits - 1
    q = r.integers(0, n_bins + 1, size=(3, 64))
    q[:, 0] = 0
    q[:, 1] = n_bins  # pin the range so scale = -1 exactly and q decodes as n_bins - w
    w = (n_bins - q).astype(np.float32)
    wq, scales, biases = gqmm.quantize(w, group_size=64, bits=bits)
    assert np.all(scales == -1) and np.all(biases == n_bins)
    stream = 0
    for j, v in enumerate(q[1]):
        stream |= int(v) << (j * bits)
    want = np.frombuffer(stream.to_bytes(64 * bits // 8, "little"), dtype="<u4")
    assert np.array_equal(wq[1], want)


def test_dequantize_rounding_is_mlx_cpu_graph():
    """MLX's CPU dequantize is T(T(q*s) + b): two roundings. Find inputs where
    that differs from a single rounding of s*q+b and check gqmm follows mlx."""
    r = rng("two-roundings")
    wq, s, b = [to_np(a) for a in mx.quantize(
        to_mx(r.standard_normal((256, 128)).astype(gqmm.bfloat16)), group_size=32, bits=8)]
    got = gqmm.dequantize(wq, s, b, group_size=32, bits=8)
    want = to_np(mx.dequantize(*[to_mx(a) for a in (wq, s, b)], group_size=32, bits=8))
    assert_bit_equal(got, want, "bf16 dequantize")
    q = unpack(wq, 8).astype(np.float32)
    s32 = np.repeat(s.astype(np.float32), 32, axis=-1)
    b32 = np.repeat(b.astype(np.float32), 32, axis=-1)
    once = (s32 * q + b32).astype(gqmm.bfloat16)
    assert np.any(raw_bits(once) != raw_bits(got)), "no case distinguishes the two roundings"


@pytest.mark.parametrize("sdt,bdt,out", [
    (np.float16, gqmm.bfloat16, None),
    (np.float32, np.float16, None),
    (gqmm.bfloat16, gqmm.bfloat16, np.float32),
    (np.float32, np.float32, np.float16),
])
def test_dequantize_mixed_dtypes_match_mlx(sdt, bdt, out):
    r = rng("mixed", str(sdt), str(bdt), str(out))
    wq, s, b = gqmm.quantize(r.standard_normal((7, 128)).astype(np.float32), 64, 4)
    s, b = s.astype(sdt), b.astype(bdt)
    got = gqmm.dequantize(wq, s, b, group_size=64, bits=4, dtype=out)
    kw = {} if out is None else {"dtype": {np.float32: mx.float32, np.float16: mx.float16}[out]}
    want = to_np(mx.dequantize(to_mx(wq), to_mx(s), to_mx(b), group_size=64, bits=4, **kw))
    assert_bit_equal(got, want, "mixed-dtype dequantize")


def test_scalar_casts_match_numpy_and_ml_dtypes():
    """gqmm_f32_to_f16/bf16 round to nearest even exactly like numpy/ml_dtypes
    on random float32 bit patterns (inf, subnormals, overflow included); NaN
    becomes MLX's canonical NaN. The reverse casts are exact."""
    import ctypes

    lib = gqmm._lib
    for name, res, arg in (("gqmm_f32_to_f16", ctypes.c_uint16, ctypes.c_float),
                           ("gqmm_f32_to_bf16", ctypes.c_uint16, ctypes.c_float),
                           ("gqmm_f16_to_f32", ctypes.c_float, ctypes.c_uint16),
                           ("gqmm_bf16_to_f32", ctypes.c_float, ctypes.c_uint16)):
        getattr(lib, name).restype = res
        getattr(lib, name).argtypes = [arg]
    r = rng("casts")
    f = r.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f = np.r_[f, np.float32([0.0, -0.0, np.inf, -np.inf, 65504, 65520, 65519.99, 2.0**-25,
                             2.0**-24 * 1.5, 3.3895314e38, np.nan, -np.nan])]
    for dtype, to_half, from_half in ((np.float16, lib.gqmm_f32_to_f16, lib.gqmm_f16_to_f32),
                                      (gqmm.bfloat16, lib.gqmm_f32_to_bf16, lib.gqmm_bf16_to_f32)):
        with np.errstate(over="ignore", invalid="ignore"):
            want = raw_bits(f.astype(dtype)).copy()
        nan = np.isnan(f)
        sign = (f.view(np.uint32) >> 16).astype(np.uint16) & 0x8000
        want[nan] = (sign[nan] | 0x7D00) if dtype == np.float16 else 0x7FC0  # MLX's NaN
        got = np.array([to_half(float(v)) for v in f], dtype=np.uint16)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, f"{np.dtype(dtype)}: {f[bad[0]]!r} -> {got[bad[0]]:#06x}, want {want[bad[0]]:#06x}"
        h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
        back = np.array([from_half(int(v)) for v in h], dtype=np.float32)
        assert_bit_equal(back[~np.isnan(back)],
                         h.view(dtype).astype(np.float32)[~np.isnan(back)], "widening cast")
