"""gqmm - gathered low-bit quantized matmul (MLX affine format), from Python.

A thin ctypes binding over libgqmm.so with an API shaped like mlx.core:

    wq, scales, biases = gqmm.quantize(w, group_size=64, bits=4)
    w_hat = gqmm.dequantize(wq, scales, biases, group_size=64, bits=4)
    y = gqmm.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
    y = gqmm.gather_qmm(x, wq, scales, biases, rhs_indices=idx, group_size=64, bits=4)
    out = gqmm.moe_forward(x, expert_ids, expert_weights, weights, bits=4, group_size=64)
    ids, w = gqmm.router_topk(logits, k, mode="softmax_topk")
    pw = gqmm.pack(wq, scales, biases, group_size=64, bits=4)   # once, at load
    y = gqmm.gather_qmm_packed(x, pw, rhs_indices=idx)

Arrays are numpy arrays (float32, float16, or ml_dtypes.bfloat16 for bfloat16;
packed weights uint32; indices int32 or uint32, other integer dtypes are
converted when their values fit). Inputs that are not C-contiguous are copied.
Outputs are fresh numpy arrays. `backend=` picks the library backend: "auto"
(the best one present), "ref" (the scalar reference), "cpu" or "cuda".
Failures raise gqmm.Error carrying the library's status name and message.

The library is found through $GQMM_LIB, else <repo>/build/libgqmm.so.
"""

import ctypes
import os

import ml_dtypes
import numpy as np

__all__ = [
    "Error",
    "bfloat16",
    "quantize",
    "dequantize",
    "quantized_matmul",
    "gather_qmm",
    "pack",
    "Packed",
    "gather_qmm_packed",
    "moe_forward",
    "router_topk",
    "last_backend",
    "backends",
    "version",
    "lib_path",
]

bfloat16 = np.dtype(ml_dtypes.bfloat16)

_MAX_DIMS = 8
_F32, _F16, _BF16, _U32, _I32 = 0, 1, 2, 3, 4
_DTYPE_CODE = {
    np.dtype(np.float32): _F32,
    np.dtype(np.float16): _F16,
    bfloat16: _BF16,
    np.dtype(np.uint32): _U32,
    np.dtype(np.int32): _I32,
}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
_BACKENDS = {"auto": 0, "ref": 1, "cpu": 2, "cuda": 3}


class Error(Exception):
    """A gqmm call failed. `status` is the code, `status_name` e.g. "GQMM_ERR_SHAPE"."""

    def __init__(self, status, status_name, message):
        super().__init__(f"{status_name}: {message}")
        self.status = status
        self.status_name = status_name
        self.message = message


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * _MAX_DIMS),
        ("strides", ctypes.c_int64 * _MAX_DIMS),
        ("device", ctypes.c_int),
    ]


class _Quant(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int), ("group_size", ctypes.c_int)]


_MOE_WEIGHT_NAMES = [
    "gate_up", "gate_up_scales", "gate_up_biases",
    "gate", "gate_scales", "gate_biases",
    "up", "up_scales", "up_biases",
    "down", "down_scales", "down_biases",
]


class _MoeWeights(ctypes.Structure):
    """gqmm_moe_weights: the quantization, 12 tensor pointers, then the 4 optional
    gqmm_pack copies (gate_up, gate, up, down); NULL when unused. The layout must
    match gqmm.h field for field: the C side reads all of it."""

    _fields_ = (
        [("q", _Quant)]
        + [(n, ctypes.POINTER(_Tensor)) for n in _MOE_WEIGHT_NAMES]
        + [(n + "_packed", ctypes.c_void_p) for n in ("gate_up", "gate", "up", "down")]
    )


class _CtxOptions(ctypes.Structure):
    _fields_ = [
        ("backend", ctypes.c_int),
        ("num_threads", ctypes.c_int),
        ("cpu_isa", ctypes.c_char_p),
        ("cpu_int8_activations", ctypes.c_int),
    ]


def lib_path():
    """Where the shared library is loaded from."""
    env = os.environ.get("GQMM_LIB")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "build", "libgqmm.so"))


def _load():
    lib = ctypes.CDLL(lib_path())
    T = ctypes.POINTER(_Tensor)
    c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    sigs = {
        "gqmm_ctx_create": (c_int, [ctypes.POINTER(c_void_p), ctypes.POINTER(_CtxOptions)]),
        "gqmm_ctx_destroy": (None, [c_void_p]),
        "gqmm_last_error": (c_char_p, [c_void_p]),
        "gqmm_last_backend": (c_char_p, [c_void_p]),
        "gqmm_strerror": (c_char_p, [c_int]),
        "gqmm_status_name": (c_char_p, [c_int]),
        "gqmm_version": (c_char_p, []),
        "gqmm_quantize": (c_int, [c_void_p, T, _Quant, T, T, T]),
        "gqmm_dequantize": (c_int, [c_void_p, T, T, T, _Quant, T]),
        "gqmm_quantized_matmul": (c_int, [c_void_p, T, T, T, T, c_int, _Quant, T]),
        "gqmm_quantized_matmul_output": (c_int, [c_void_p, T, T, T, T, c_int, _Quant, T]),
        "gqmm_gather_qmm": (c_int, [c_void_p, T, T, T, T, T, T, c_int, _Quant, c_int, T]),
        "gqmm_gather_qmm_output": (c_int, [c_void_p, T, T, T, T, T, T, c_int, _Quant, T]),
        "gqmm_moe_forward": (c_int, [c_void_p, ctypes.POINTER(_MoeWeights), T, T, T, c_int, T]),
        "gqmm_router_topk": (c_int, [c_void_p, T, c_int, c_int, T, T]),
        "gqmm_pack": (c_int, [c_void_p, T, T, T, _Quant, ctypes.POINTER(c_void_p)]),
        "gqmm_pack_glu": (c_int, [c_void_p, T, T, T, _Quant, ctypes.POINTER(c_void_p)]),
        "gqmm_packed_free": (None, [c_void_p, c_void_p]),
        "gqmm_packed_nbytes": (ctypes.c_int64, [c_void_p]),
        "gqmm_gather_qmm_packed": (c_int, [c_void_p, T, c_void_p, T, T, c_int, T]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


_lib = _load()


class _Context:
    """One library context per (backend kind, thread count), kept for the life of the module."""

    def __init__(self, kind, num_threads):
        self.handle = ctypes.c_void_p()
        opts = _CtxOptions(_BACKENDS[kind], num_threads, None, 0)
        st = _lib.gqmm_ctx_create(ctypes.byref(self.handle), ctypes.byref(opts))
        if st:
            raise _error(st, f"cannot create a context for backend {kind!r}, "
                             f"num_threads={num_threads}")

    def __del__(self):
        if _lib is not None and self.handle:
            _lib.gqmm_ctx_destroy(self.handle)

    def check(self, st):
        if st:
            raise _error(st, _lib.gqmm_last_error(self.handle).decode())


_contexts = {}
_last = [None]


def _ctx(backend, num_threads=0):
    if backend not in _BACKENDS:
        raise _error(-15, f"backend: {backend!r} is not one of {sorted(_BACKENDS)}")
    if not isinstance(num_threads, int) or num_threads < 0:
        raise _error(-15, f"num_threads: {num_threads!r} is not an integer >= 0")
    key = (backend, num_threads)
    if key not in _contexts:
        _contexts[key] = _Context(backend, num_threads)
    _last[0] = _contexts[key]
    return _contexts[key]


def _error(status, message):
    return Error(status, _lib.gqmm_status_name(status).decode(), message)


def version():
    return _lib.gqmm_version().decode()


def last_backend():
    """Name of the backend that ran the last op ("ref", "cpu-avx2", ...)."""
    return _lib.gqmm_last_backend(_last[0].handle).decode() if _last[0] else ""


def backends():
    """Backends that run a small host-memory quantized_matmul here, best first ("ref" last)."""
    x = np.ones((1, 32), np.float32)
    w, s, b = quantize(np.ones((1, 32), np.float32), group_size=32, bits=4, backend="ref")
    found = []
    for kind in ("cuda", "cpu", "ref"):
        try:
            quantized_matmul(x, w, s, b, group_size=32, bits=4, backend=kind)
        except Error as e:
            if e.status_name != "GQMM_ERR_UNSUPPORTED":
                raise
            continue
        found.append(kind)
    return found


def _array(a, name, float_only=False):
    a = np.asarray(a)
    if a.dtype not in _DTYPE_CODE or (float_only and _DTYPE_CODE[a.dtype] > _BF16):
        want = "float32, float16 or bfloat16" if float_only else "a gqmm dtype"
        raise _error(-2, f"{name}: numpy dtype {a.dtype} is not supported (expected {want})")
    return np.ascontiguousarray(a)


def _indices(a, name):
    """int32/uint32 pass through; other integer arrays are narrowed when they fit."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype in (np.int32, np.uint32):
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise _error(-2, f"{name}: dtype {a.dtype} is not an integer type")
    if a.size and (a.min() < -(2**31) or a.max() >= 2**32):
        raise _error(-7, f"{name}: values outside the int32/uint32 range")
    if a.size and a.max() >= 2**31:
        return np.ascontiguousarray(a.astype(np.uint32))
    return np.ascontiguousarray(a.astype(np.int32))


def _desc(data, dtype, shape):
    """A row-contiguous gqmm_tensor of `shape` and numpy dtype `dtype` at address `data`."""
    if len(shape) > _MAX_DIMS:
        raise _error(-3, f"array has {len(shape)} dimensions, at most {_MAX_DIMS} are supported")
    t = _Tensor()
    t.data = data
    t.dtype = _DTYPE_CODE[np.dtype(dtype)]
    t.ndim = len(shape)
    stride = 1
    for i in range(len(shape) - 1, -1, -1):
        t.shape[i] = shape[i]
        t.strides[i] = stride
        stride *= shape[i]
    return t


def _tensor(a):
    """A gqmm_tensor describing the C-contiguous numpy array `a`."""
    if a is None:
        return None
    return _desc(a.ctypes.data if a.size else None, a.dtype, a.shape)


def _ref(t):
    return ctypes.byref(t) if t is not None else None


def _empty_like_desc(t):
    shape = tuple(t.shape[i] for i in range(t.ndim))
    return np.empty(shape, dtype=_CODE_DTYPE[t.dtype])


def quantize(w, group_size=64, bits=4, backend="auto"):
    """Affine-quantize the last axis of w: returns (wq uint32, scales, biases) like mx.quantize."""
    w = _array(w, "w", float_only=True)
    if w.ndim < 2:
        raise _error(-3, f"w: must have at least 2 dimensions, got {w.ndim}")
    k = w.shape[-1]
    lead = w.shape[:-1]
    # shapes from possibly bad parameters stay >= 0 so the library names the error
    wq = np.empty(lead + (max(0, k * bits // 32),), dtype=np.uint32)
    scales = np.empty(lead + (k // group_size if group_size > 0 else 0,), dtype=w.dtype)
    biases = np.empty_like(scales)
    ctx = _ctx(backend)
    tw, twq, ts, tb = _tensor(w), _tensor(wq), _tensor(scales), _tensor(biases)
    ctx.check(
        _lib.gqmm_quantize(ctx.handle, _ref(tw), _Quant(bits, group_size), _ref(twq), _ref(ts), _ref(tb))
    )
    return wq, scales, biases


def dequantize(w, scales, biases, group_size=64, bits=4, dtype=None, backend="auto"):
    """w_hat = scales * q + biases, rounded as MLX's CPU backend rounds (see docs/format.md).

    dtype: output dtype; default the promotion of scales' and biases' dtypes."""
    w = _array(w, "w")
    scales = _array(scales, "scales", float_only=True)
    biases = _array(biases, "biases", float_only=True)
    if dtype is None:
        dtype = scales.dtype if scales.dtype == biases.dtype else np.dtype(np.float32)
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_CODE or _DTYPE_CODE[dtype] > _BF16:
        raise _error(-8, f"dtype: {dtype} is not float32, float16 or bfloat16")
    if w.ndim < 2:
        raise _error(-3, f"w: must have at least 2 dimensions, got {w.ndim}")
    out = np.empty(w.shape[:-1] + (w.shape[-1] * 32 // bits if bits > 0 else 0,), dtype=dtype)
    ctx = _ctx(backend)
    tw, ts, tb, to = _tensor(w), _tensor(scales), _tensor(biases), _tensor(out)
    ctx.check(
        _lib.gqmm_dequantize(ctx.handle, _ref(tw), _ref(ts), _ref(tb), _Quant(bits, group_size), _ref(to))
    )
    return out


def quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4, backend="auto"):
    """x @ dequantize(w).T (transpose=True) or x @ dequantize(w), like mx.quantized_matmul."""
    return gather_qmm(x, w, scales, biases, None, None, transpose, group_size, bits, False, backend)


def gather_qmm(
    x,
    w,
    scales,
    biases,
    lhs_indices=None,
    rhs_indices=None,
    transpose=True,
    group_size=64,
    bits=4,
    sorted_indices=False,
    backend="auto",
):
    """out[i] = x[lhs[i]] @ dequantize(w[rhs[i]])(.T), indices broadcast, like mx.gather_qmm."""
    arrays = [
        _array(x, "x", float_only=True),
        _array(w, "w"),
        _array(scales, "scales", float_only=True),
        _array(biases, "biases", float_only=True),
        _indices(lhs_indices, "lhs_indices"),
        _indices(rhs_indices, "rhs_indices"),
    ]
    tx, tw, ts, tb, tl, tr = (_tensor(a) for a in arrays)
    q = _Quant(bits, group_size)
    ctx = _ctx(backend)
    desc = _Tensor()
    ctx.check(
        _lib.gqmm_gather_qmm_output(
            ctx.handle, _ref(tx), _ref(tw), _ref(ts), _ref(tb), _ref(tl), _ref(tr),
            int(bool(transpose)), q, ctypes.byref(desc),
        )
    )
    out = _empty_like_desc(desc)
    to = _tensor(out)
    ctx.check(
        _lib.gqmm_gather_qmm(
            ctx.handle, _ref(tx), _ref(tw), _ref(ts), _ref(tb), _ref(tl), _ref(tr),
            int(bool(transpose)), q, int(bool(sorted_indices)), _ref(to),
        )
    )
    return out


class Packed:
    """A gqmm_pack copy of quantized weights (transpose layout) in the kernels' own
    layout: made once at load, then given to gather_qmm_packed or moe_forward
    (packed=...). Host arrays pack for the CPU backend (2- and 4-bit, float16 or
    bfloat16 scales; docs/format.md "CPU packed layout"). It keeps the shapes of the
    arrays it came from and frees its copy when collected."""

    def __init__(self, ctx, handle, w, scales, biases, group_size, bits, glu):
        self._ctx, self.handle = ctx, handle
        self.shape, self.scales_shape = w.shape, scales.shape
        self.scales_dtype, self.group_size, self.bits, self.glu = scales.dtype, group_size, bits, glu

    @property
    def nbytes(self):
        return int(_lib.gqmm_packed_nbytes(self.handle))

    def __del__(self):
        if _lib is not None and self.handle:
            _lib.gqmm_packed_free(self._ctx.handle, self.handle)
            self.handle = None


def pack(w, scales, biases, group_size=64, bits=4, glu=False, backend="auto"):
    """gqmm_pack (glu=True: gqmm_pack_glu) of w [..., N, K*bits/32] with its scales and
    biases: a Packed copy for gather_qmm_packed and moe_forward."""
    arrays = [_array(w, "w"), _array(scales, "scales", float_only=True),
              _array(biases, "biases", float_only=True)]
    tw, ts, tb = (_tensor(a) for a in arrays)
    ctx = _ctx(backend)
    handle = ctypes.c_void_p()
    fn = _lib.gqmm_pack_glu if glu else _lib.gqmm_pack
    ctx.check(fn(ctx.handle, _ref(tw), _ref(ts), _ref(tb), _Quant(bits, group_size),
                 ctypes.byref(handle)))
    return Packed(ctx, handle, arrays[0], arrays[1], arrays[2], group_size, bits, glu)


def gather_qmm_packed(x, w, lhs_indices=None, rhs_indices=None, sorted_indices=False):
    """gather_qmm (transpose=True) over a Packed copy w: the same result as gather_qmm
    with the arrays w was packed from, on the backend that packed it."""
    if not isinstance(w, Packed) or not w.handle:
        raise _error(-1, "w: expected a live gqmm.Packed (from gqmm.pack)")
    arrays = [_array(x, "x", float_only=True), _indices(lhs_indices, "lhs_indices"),
              _indices(rhs_indices, "rhs_indices")]
    tx, tl, tr = (_tensor(a) for a in arrays)
    # the output's shape and dtype: gather_qmm's for descriptors of the packed shapes
    # over the copy (the query reads shapes only, as gqmm_gather_qmm_packed's own)
    tw = _desc(w.handle, np.uint32, w.shape)
    ts = _desc(w.handle, w.scales_dtype, w.scales_shape)
    desc = _Tensor()
    ctx = w._ctx
    ctx.check(_lib.gqmm_gather_qmm_output(ctx.handle, _ref(tx), _ref(tw), _ref(ts), _ref(ts),
                                          _ref(tl), _ref(tr), 1, _Quant(w.bits, w.group_size),
                                          ctypes.byref(desc)))
    out = _empty_like_desc(desc)
    to = _tensor(out)
    _last[0] = ctx
    ctx.check(_lib.gqmm_gather_qmm_packed(ctx.handle, _ref(tx), w.handle, _ref(tl), _ref(tr),
                                          int(bool(sorted_indices)), _ref(to)))
    return out


from .moe import moe_forward, router_topk  # noqa: E402  (uses the helpers above)
