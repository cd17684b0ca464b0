"""gqmm.quantized_matmul / gqmm.gather_qmm against mlx.core (CPU) and a
float64 truth over the exactly dequantized weights, on every backend that
runs here. For each case: same output shape and dtype as mlx, an error vs the
truth no larger than mlx's own (helpers.accuracy_problem says how much slack
and why), and close to mlx. The last tests show the same comparison catches a
corrupted scale, a swapped expert index and a flipped packed bit."""

import itertools

import numpy as np
import pytest

import gqmm
from helpers import (BITS, DTYPE_IDS, DTYPES, GROUP_SIZES, check_gather, qmm_truth,
                     make_weights, mlx_gather_qmm, rng)

BACKENDS = gqmm.backends()
FORMATS = list(itertools.product(BITS, GROUP_SIZES, zip(DTYPES, DTYPE_IDS)))
FORMAT_IDS = [f"b{b}-g{g}-{d[1]}" for b, g, d in FORMATS]


def odd_n(r, lo=1, hi=100):
    """An output width that is not a multiple of 8 (ragged for every tile)."""
    n = int(r.integers(lo, hi))
    return n + 1 if n % 8 == 0 else n


def assert_no_problems(problems, what):
    assert not problems, f"{what}: " + "; ".join(problems)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size,dt", FORMATS, ids=FORMAT_IDS)
def test_quantized_matmul_every_format(bits, group_size, dt, backend):
    dtype, dname = dt
    r = rng("qmm", bits, group_size, dname, backend)
    M = int(r.choice([1, 2, 5, 16, 33]))
    N = odd_n(r)
    K = group_size * int(r.integers(1, 6))
    wq, s, b = make_weights(r, (N, K), dtype, group_size, bits)
    x = r.standard_normal((M, K)).astype(dtype)
    assert_no_problems(check_gather(x, wq, s, b, None, None, True, group_size, bits, dtype, backend),
                       f"M={M} N={N} K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size,dt", FORMATS, ids=FORMAT_IDS)
def test_quantized_matmul_transpose_false(bits, group_size, dt, backend):
    """w is (K, N*bits/32): groups run along N, K is any size."""
    dtype, dname = dt
    r = rng("qmm-nt", bits, group_size, dname, backend)
    M = int(r.choice([1, 3, 17]))
    K = odd_n(r)
    N = group_size * int(r.integers(1, 4))
    wq, s, b = make_weights(r, (K, N), dtype, group_size, bits)
    x = r.standard_normal((2, M, K)).astype(dtype)
    assert_no_problems(check_gather(x, wq, s, b, None, None, False, group_size, bits, dtype, backend),
                       f"M={M} N={N} K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size,dt", FORMATS, ids=FORMAT_IDS)
def test_gather_qmm_moe_routing(bits, group_size, dt, backend):
    """mlx-lm's SwitchGLU call: x (T, 1, 1, K), rhs_indices (T, top_k) with
    skewed routing (some experts get many rows, some none)."""
    dtype, dname = dt
    r = rng("gather", bits, group_size, dname, backend)
    E, T, top_k = int(r.integers(2, 9)), int(r.integers(1, 12)), 2
    N = odd_n(r, 1, 60)
    K = group_size * int(r.integers(1, 4))
    wq, s, b = make_weights(r, (E, N, K), dtype, group_size, bits)
    p = r.dirichlet(np.full(E, 0.3))
    rhs = np.array([r.choice(E, size=top_k, replace=False, p=p) for _ in range(T)], np.int32)
    x = r.standard_normal((T, 1, 1, K)).astype(dtype)
    assert_no_problems(check_gather(x, wq, s, b, None, rhs, True, group_size, bits, dtype, backend),
                       f"E={E} T={T} N={N} K={K}")


def gather_cases():
    """(name, x shape, w (E, rows, cols) float shape, lhs, rhs, transpose, sorted)."""
    u32 = np.uint32
    return [
        ("lhs and rhs broadcast (3,1)x(1,4)", (5, 4, 128), (6, 40, 128),
         np.array([[4], [0], [2]], u32), np.array([[5, 1, 1, 0]], np.int32), True, False),
        ("lhs only, w batch default", (3, 2, 64), (1, 24, 64), np.array([2, 2, 0, 1], u32), None,
         True, False),
        ("default lhs over 2 batch dims", (2, 3, 2, 64), (4, 21, 64), None,
         np.array([[3], [0]], u32), True, False),
        ("sorted rows, 0-row and all-row experts", (16, 1, 128), (8, 33, 128), None,
         np.array([1] * 13 + [5] * 2 + [6], u32), True, True),
        ("mlx-lm sorted path, M=1", (24, 1, 64), (4, 19, 64), None,
         np.sort(np.array([3, 0, 3, 3, 1, 0] * 4, u32)), True, True),
        ("transpose false", (3, 5, 45), (4, 45, 64), np.array([0, 2, 1, 1], u32),
         np.array([3, 3, 0, 2], u32), False, False),
        ("K equal to group size", (4, 7, 64), (3, 9, 64), None, np.array([2, 0, 1, 2], u32), True,
         False),
        ("large K", (2, 3, 4096), (3, 17, 4096), np.array([1, 0], u32), np.array([2, 0], u32),
         True, False),
        ("large K, M=1", (1, 1, 8192), (2, 11, 8192), None, np.array([1], u32), True, False),
        ("rhs 0-d (scalar)", (2, 3, 64), (3, 10, 64), None, np.array(2, u32), True, False),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
@pytest.mark.parametrize("case", gather_cases(), ids=[c[0] for c in gather_cases()])
def test_gather_qmm_shapes(case, dt, backend):
    name, xs, ws, lhs, rhs, transpose, sorted_indices = case
    dtype, dname = dt
    r = rng("gather-shapes", name, dname, backend)
    for bits, group_size in ((4, 64), (int(r.choice([2, 3, 5, 6, 8])), int(r.choice([32, 64])))):
        if ws[-1] % group_size:
            continue
        wq, s, b = make_weights(r, ws, dtype, group_size, bits)
        x = r.standard_normal(xs).astype(dtype)
        assert_no_problems(check_gather(x, wq, s, b, lhs, rhs, transpose, group_size, bits, dtype,
                                        backend, sorted_indices), f"{name} bits {bits} gs {group_size}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xs", [(5, 128), (128,), (1, 5, 128), (3, 5, 128), (2, 1, 5, 128)])
def test_quantized_matmul_batch_rules(xs, backend):
    """MLX's quantized_matmul with a batched w: x of ndim <= 2 uses w[0] only
    (MLX CPU quirk, kept for compatibility), x of ndim > 2 broadcasts batches."""
    r = rng("quirk", xs, backend)
    wq, s, b = make_weights(r, (3, 40, 128), np.float32, 64, 4)
    x = r.standard_normal(xs).astype(np.float32)
    got = gqmm.quantized_matmul(x, wq, s, b, group_size=64, bits=4, backend=backend)
    want = mlx_gather_qmm(x, wq, s, b, None, None, True, 64, 4)
    assert got.shape == want.shape
    if len(xs) <= 2:
        first = qmm_truth(x, wq[0], s[0], b[0], True, 64, 4)
        # relative: a different expert would be off by O(1), rounding by ~1e-6
        assert np.max(np.abs(want - first)) <= 1e-5 * np.max(np.abs(first)), \
            "mlx no longer uses w[0]: update gqmm and docs"
    assert_no_problems(check_gather(x, wq, s, b, None, None, True, 64, 4, np.float32, backend),
                       f"x {xs}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt,sdt", [(np.float16, gqmm.bfloat16), (np.float32, gqmm.bfloat16),
                                     (gqmm.bfloat16, np.float16), (np.float16, np.float32)])
def test_mixed_dtypes_promote_like_mlx(xdt, sdt, backend):
    r = rng("promote", str(xdt), str(sdt), backend)
    wq, s, b = make_weights(r, (4, 24, 64), sdt, 32, 4)
    x = r.standard_normal((4, 3, 64)).astype(xdt)
    rhs = np.array([3, 1, 1, 0], np.int32)
    want_dtype = mlx_gather_qmm(x, wq, s, b, None, rhs, True, 32, 4).dtype
    assert_no_problems(check_gather(x, wq, s, b, None, rhs, True, 32, 4, want_dtype, backend),
                       f"x {np.dtype(xdt)} scales {np.dtype(sdt)}")


# ---- the comparison catches drift ------------------------------------------


def corruption_case(r, dtype, bits=4, group_size=64):
    wq, s, b = make_weights(r, (4, 24, 128), dtype, group_size, bits)
    x = r.standard_normal((6, 3, 128)).astype(dtype)
    rhs = np.array([0, 1, 2, 3, 1, 2], np.int32)
    return x, wq, s, b, rhs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
def test_corrupted_scale_is_caught(dt, backend):
    dtype, dname = dt
    r = rng("bad-scale", dname, backend)
    x, wq, s, b, rhs = corruption_case(r, dtype)
    assert not check_gather(x, wq, s, b, None, rhs, True, 64, 4, dtype, backend)
    bad = s.copy()
    e, n, g = 2, int(r.integers(24)), int(r.integers(2))
    bad[e, n, g] = bad[e, n, g] * 1.25
    problems = check_gather(x, wq, s, b, None, rhs, True, 64, 4, dtype, backend,
                            gq_inputs=(x, wq, bad, b, None, rhs))
    assert problems, "a scale off by 25% went unnoticed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", list(zip(DTYPES, DTYPE_IDS)), ids=DTYPE_IDS)
def test_swapped_expert_index_is_caught(dt, backend):
    dtype, dname = dt
    r = rng("bad-index", dname, backend)
    x, wq, s, b, rhs = corruption_case(r, dtype)
    bad = rhs.copy()
    bad[0], bad[2] = rhs[2], rhs[0]
    problems = check_gather(x, wq, s, b, None, rhs, True, 64, 4, dtype, backend,
                            gq_inputs=(x, wq, s, b, None, bad))
    assert problems, "rows routed to swapped experts went unnoticed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
def test_flipped_packed_bit_is_caught(bits, backend):
    r = rng("bad-bit", bits, backend)
    x, wq, s, b, rhs = corruption_case(r, np.float32, bits, 32)
    bad = wq.copy()
    e, n, word = 1, int(r.integers(24)), int(r.integers(wq.shape[-1]))
    bad[e, n, word] ^= np.uint32(1) << np.uint32(r.integers(32))
    problems = check_gather(x, wq, s, b, None, rhs, True, 32, bits, np.float32, backend,
                            gq_inputs=(x, bad, s, b, None, rhs))
    assert problems, "one flipped bit in the packed weights went unnoticed"


# ---- errors ------------------------------------------------------------------


def test_errors_raise_with_status_and_argument():
    r = rng("errors")
    wq, s, b = make_weights(r, (3, 16, 64), np.float32, 32, 4)
    x = r.standard_normal((2, 5, 64)).astype(np.float32)
    cases = [
        (lambda: gqmm.quantized_matmul(x[..., :32], wq, s, b, group_size=32, bits=4),
         "GQMM_ERR_SHAPE", "x"),
        (lambda: gqmm.gather_qmm(x, wq, s, b, rhs_indices=np.array([0, 3]), group_size=32, bits=4),
         "GQMM_ERR_INDEX", "rhs_indices"),
        (lambda: gqmm.gather_qmm(x, wq, s, b, lhs_indices=np.array([-1], np.int32), group_size=32,
                                 bits=4), "GQMM_ERR_INDEX", "lhs_indices"),
        (lambda: gqmm.quantized_matmul(x, wq, s, b, group_size=32, bits=7), "GQMM_ERR_BITS", "bits"),
        (lambda: gqmm.quantized_matmul(x, wq, s, b, group_size=48, bits=4), "GQMM_ERR_GROUP_SIZE",
         "group_size"),
        (lambda: gqmm.quantized_matmul(x, wq, s[..., :1], b, group_size=32, bits=4),
         "GQMM_ERR_SHAPE", "scales"),
        (lambda: gqmm.quantize(np.ones((4, 48), np.float32), group_size=32), "GQMM_ERR_SHAPE", "w"),
        (lambda: gqmm.quantized_matmul(x, wq, s, b, group_size=32, bits=4, backend="tpu"),
         "GQMM_ERR_ARG", "backend"),
        (lambda: gqmm.quantized_matmul(x.astype(np.float64), wq, s, b, group_size=32, bits=4),
         "GQMM_ERR_DTYPE", "x"),
    ]
    for fn, status, arg in cases:
        with pytest.raises(gqmm.Error) as info:
            fn()
        assert info.value.status_name == status, str(info.value)
        assert info.value.message.startswith(arg), str(info.value)
