"""gqmm.pack and gqmm.gather_qmm_packed (the CPU's packed layout for host arrays)
against mlx.core.gather_qmm on the same MLX-layout weights, and moe_forward with
packed copies against the same layer unpacked."""

import numpy as np
import pytest

import gqmm
from helpers import accuracy_problem, make_weights, mlx_gather_qmm, qmm_truth, rng


@pytest.mark.parametrize("dtype", [gqmm.bfloat16, np.float16])
@pytest.mark.parametrize("bits,gs", [(4, 64), (4, 32), (2, 128), (2, 64)])
def test_gather_qmm_packed_matches_mlx(dtype, bits, gs):
    r = rng("pack", str(np.dtype(dtype)), bits, gs)
    E, N, K, T = 5, 100, 3 * 128, 23  # N = 100: a ragged second panel
    wq, s, b = make_weights(r, (E, N, K), dtype, gs, bits)
    x = r.standard_normal((T, 1, K)).astype(dtype)
    rhs = r.integers(0, E - 1, T).astype(np.int32)  # expert E - 1 never used
    pw = gqmm.pack(wq, s, b, group_size=gs, bits=bits, backend="cpu")
    assert pw.nbytes > 0
    got = gqmm.gather_qmm_packed(x, pw, rhs_indices=rhs)
    assert gqmm.last_backend().startswith("cpu")
    want = gqmm.gather_qmm(x, wq, s, b, rhs_indices=rhs, group_size=gs, bits=bits, backend="ref")
    assert got.shape == want.shape and got.dtype == want.dtype
    mlx_out = mlx_gather_qmm(x, wq, s, b, None, rhs, True, gs, bits)
    truth = np.stack([qmm_truth(x[t], wq[rhs[t]], s[rhs[t]], b[rhs[t]], True, gs, bits)
                      for t in range(T)])
    problem = accuracy_problem(got, mlx_out, truth, np.dtype(dtype))
    assert problem is None, problem
    # quantized_matmul: no indices, a 2-D weight
    pw2 = gqmm.pack(wq[1], s[1], b[1], group_size=gs, bits=bits, backend="cpu")
    xs = x[:, 0, :]
    got2 = gqmm.gather_qmm_packed(xs, pw2)
    mlx2 = mlx_gather_qmm(xs, wq[1], s[1], b[1], None, None, True, gs, bits)
    problem = accuracy_problem(got2, mlx2, qmm_truth(xs, wq[1], s[1], b[1], True, gs, bits),
                               np.dtype(dtype))
    assert problem is None, problem


def test_pack_refusals_name_the_reason():
    r = rng("pack-refuse")
    wq, s, b = make_weights(r, (2, 64, 128), gqmm.bfloat16, 64, 3)
    with pytest.raises(gqmm.Error) as info:
        gqmm.pack(wq, s, b, group_size=64, bits=3, backend="cpu")
    assert info.value.status_name == "GQMM_ERR_UNSUPPORTED" and "2- and 4-bit" in info.value.message
    wq, s, b = make_weights(r, (2, 64, 128), np.float32, 64, 4)
    with pytest.raises(gqmm.Error) as info:
        gqmm.pack(wq, s, b, group_size=64, bits=4, backend="cpu")
    assert info.value.status_name == "GQMM_ERR_UNSUPPORTED" and "scales" in info.value.message
    with pytest.raises(gqmm.Error):
        gqmm.gather_qmm_packed(np.zeros((1, 128), np.float32), "not a pack")


def test_moe_forward_with_packed_weights():
    r = rng("pack-moe")
    T, E, k, H, I, gs = 21, 9, 4, 384, 128, 64
    dt = gqmm.bfloat16
    weights = {}
    for name, (rows, cols) in {"gate_up": (2 * I, H), "down": (H, I)}.items():
        wq, s, b = make_weights(r, (E, rows, cols), dt, gs, 4)
        weights.update({name: wq, name + "_scales": s, name + "_biases": b})
    x = r.standard_normal((T, H)).astype(dt)
    ids = np.stack([r.choice(E - 1, k, replace=False) for _ in range(T)]).astype(np.int32)
    ew = r.uniform(0.05, 1.0, (T, k)).astype(dt)
    plain = gqmm.moe_forward(x, ids, ew, weights, 4, gs, "geglu", backend="cpu")
    packed = {n: gqmm.pack(weights[n], weights[n + "_scales"], weights[n + "_biases"],
                           group_size=gs, bits=4, glu=(n == "gate_up"), backend="cpu")
              for n in ("gate_up", "down")}
    got = gqmm.moe_forward(x, ids, ew, weights, 4, gs, "geglu", backend="cpu", packed=packed)
    a, b = got.astype(np.float64), plain.astype(np.float64)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)
    with pytest.raises(gqmm.Error):
        gqmm.moe_forward(x, ids, ew, weights, 4, gs, "geglu", backend="cpu",
                         packed={"bogus": packed["down"]})
