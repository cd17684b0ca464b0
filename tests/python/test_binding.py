"""The Python binding itself: argument handling around the library calls."""

import numpy as np
import pytest

import gqmm
from helpers import make_weights, rng


def test_backends_and_last_backend():
    names = gqmm.backends()
    assert names[-1] == "ref" and len(set(names)) == len(names)
    r = rng("backends")
    wq, s, b = make_weights(r, (8, 64), np.float32, 32, 4)
    x = r.standard_normal((3, 64)).astype(np.float32)
    for name in names:
        gqmm.quantized_matmul(x, wq, s, b, group_size=32, bits=4, backend=name)
        assert gqmm.last_backend().startswith(name)
    assert gqmm.version().count(".") == 2


def test_non_contiguous_inputs_are_copied():
    r = rng("strided")
    wq, s, b = make_weights(r, (3, 16, 64), np.float32, 32, 4)
    x = r.standard_normal((4, 5, 128)).astype(np.float32)[:, :, ::2]  # strided view
    rhs = np.array([2, 0, 1, 2], np.int64)[::-1]  # int64, negative stride
    got = gqmm.gather_qmm(x, wq, s, b, rhs_indices=rhs, group_size=32, bits=4, backend="ref")
    want = gqmm.gather_qmm(np.ascontiguousarray(x), wq, s, b,
                           rhs_indices=np.ascontiguousarray(rhs).astype(np.int32), group_size=32,
                           bits=4, backend="ref")
    assert np.array_equal(got, want)


def test_index_conversion_limits():
    r = rng("indices")
    wq, s, b = make_weights(r, (3, 16, 64), np.float32, 32, 4)
    x = r.standard_normal((4, 5, 64)).astype(np.float32)
    for bad in (np.array([0, 2**40], np.int64), np.array([0, -(2**40)], np.int64)):
        with pytest.raises(gqmm.Error) as info:
            gqmm.gather_qmm(x, wq, s, b, rhs_indices=bad, group_size=32, bits=4)
        assert info.value.status_name == "GQMM_ERR_INDEX"
    with pytest.raises(gqmm.Error) as info:  # fits uint32, still out of range
        gqmm.gather_qmm(x, wq, s, b, rhs_indices=np.array([2**31 + 5], np.int64), group_size=32, bits=4)
    assert info.value.status_name == "GQMM_ERR_INDEX" and "rhs_indices" in info.value.message
    with pytest.raises(gqmm.Error) as info:
        gqmm.gather_qmm(x, wq, s, b, rhs_indices=np.array([0.0]), group_size=32, bits=4)
    assert info.value.status_name == "GQMM_ERR_DTYPE"


def test_error_carries_status_code_name_and_message():
    with pytest.raises(gqmm.Error) as info:
        gqmm.quantize(np.ones(64, np.float32), group_size=32)
    e = info.value
    assert e.status < 0 and e.status_name == "GQMM_ERR_NDIM" and e.message.startswith("w:")
    assert str(e) == f"{e.status_name}: {e.message}"


def test_dequantize_dtype_argument():
    r = rng("deq-dtype")
    wq, s, b = make_weights(r, (4, 64), gqmm.bfloat16, 32, 4)
    assert gqmm.dequantize(wq, s, b, group_size=32, bits=4).dtype == gqmm.bfloat16
    out = gqmm.dequantize(wq, s, b, group_size=32, bits=4, dtype=np.float32)
    assert out.dtype == np.float32 and out.shape == (4, 64)
    with pytest.raises(gqmm.Error):
        gqmm.dequantize(wq, s, b, group_size=32, bits=4, dtype=np.int32)


@pytest.mark.parametrize("bits,group_size,status", [(-4, 32, "GQMM_ERR_BITS"), (0, 32, "GQMM_ERR_BITS"),
                                                    (4, 0, "GQMM_ERR_GROUP_SIZE"),
                                                    (4, -64, "GQMM_ERR_GROUP_SIZE")])
def test_bad_parameters_reach_the_library(bits, group_size, status):
    w = np.ones((2, 64), np.float32)
    wq = np.zeros((2, 8), np.uint32)
    s = np.ones((2, 2), np.float32)
    for call in (lambda: gqmm.quantize(w, group_size=group_size, bits=bits),
                 lambda: gqmm.dequantize(wq, s, s, group_size=group_size, bits=bits)):
        with pytest.raises(gqmm.Error) as info:
            call()
        assert info.value.status_name == status
