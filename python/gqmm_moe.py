"""ctypes glue for gqmm's MoE expert layer and router (self-contained).

Loads the shared library named by the environment variable GQMM_LIB
(e.g. build/libgqmm.so). Arrays are numpy, row-contiguous, on the CPU:
float32 -> float32, float16 -> float16, and uint16 arrays carry bfloat16 bits
(numpy has no bfloat16). Packed weights are uint32 in the MLX layout.
"""
import ctypes
import os

import numpy as np

_F32, _F16, _BF16, _U32, _I32 = 0, 1, 2, 3, 4
_MAX_DIMS = 8
ACTIVATIONS = {"swiglu": 0, "geglu": 1}
ROUTER_MODES = {"softmax_topk": 0, "softmax_topk_norm": 1, "topk_softmax": 2}
BACKENDS = {"auto": 0, "ref": 1, "cpu": 2, "cuda": 3}


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


_WEIGHT_NAMES = [
    "gate_up", "gate_up_scales", "gate_up_biases",
    "gate", "gate_scales", "gate_biases",
    "up", "up_scales", "up_biases",
    "down", "down_scales", "down_biases",
]


class _MoeWeights(ctypes.Structure):
    _fields_ = [("q", _Quant)] + [(n, ctypes.POINTER(_Tensor)) for n in _WEIGHT_NAMES]


class _CtxOptions(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_int), ("num_threads", ctypes.c_int),
                ("cpu_isa", ctypes.c_char_p)]


class GqmmError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(f"gqmm status {status}: {message}")
        self.status = status


def _load():
    path = os.environ.get("GQMM_LIB")
    if not path:
        raise RuntimeError("set GQMM_LIB to the path of libgqmm.so")
    lib = ctypes.CDLL(path)
    lib.gqmm_ctx_create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_CtxOptions)]
    lib.gqmm_ctx_destroy.argtypes = [ctypes.c_void_p]
    lib.gqmm_last_error.argtypes = [ctypes.c_void_p]
    lib.gqmm_last_error.restype = ctypes.c_char_p
    lib.gqmm_last_backend.argtypes = [ctypes.c_void_p]
    lib.gqmm_last_backend.restype = ctypes.c_char_p
    T = ctypes.POINTER(_Tensor)
    lib.gqmm_moe_forward.argtypes = [ctypes.c_void_p, ctypes.POINTER(_MoeWeights), T, T, T,
                                     ctypes.c_int, T]
    lib.gqmm_router_topk.argtypes = [ctypes.c_void_p, T, ctypes.c_int, ctypes.c_int, T, T]
    return lib


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _dtype_code(a):
    codes = {np.dtype(np.float32): _F32, np.dtype(np.float16): _F16,
             np.dtype(np.uint16): _BF16, np.dtype(np.uint32): _U32, np.dtype(np.int32): _I32}
    if a.dtype not in codes:
        raise TypeError(f"unsupported array dtype {a.dtype}")
    return codes[a.dtype]


def _tensor(a):
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError("arrays must be row-contiguous")
    t = _Tensor()
    t.data = a.ctypes.data
    t.dtype = _dtype_code(a)
    t.ndim = a.ndim
    stride = 1
    for i in reversed(range(a.ndim)):
        t.shape[i] = a.shape[i]
        t.strides[i] = stride
        stride *= a.shape[i]
    t.device = 0
    return t


class Context:
    """A gqmm context (backend choice, thread count); close() or use `with`."""

    def __init__(self, backend="auto", num_threads=0):
        self._ctx = ctypes.c_void_p()
        opts = _CtxOptions(BACKENDS[backend], num_threads, None)
        st = lib().gqmm_ctx_create(ctypes.byref(self._ctx), ctypes.byref(opts))
        if st:
            raise GqmmError(st, "cannot create context")

    def close(self):
        if self._ctx:
            lib().gqmm_ctx_destroy(self._ctx)
            self._ctx = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, st):
        if st:
            raise GqmmError(st, lib().gqmm_last_error(self._ctx).decode())

    @property
    def last_backend(self):
        return lib().gqmm_last_backend(self._ctx).decode()

    def moe_forward(self, x, expert_ids, expert_weights, weights, bits=4, group_size=64,
                    act="swiglu"):
        """out [tokens, hidden] of x's dtype. `weights` maps the gqmm_moe_weights
        names (gate_up*, or gate* and up*, and down*) to packed/scale/bias arrays."""
        unknown = set(weights) - set(_WEIGHT_NAMES)
        if unknown:
            raise KeyError(f"unknown weight names {sorted(unknown)}")
        keep = {n: np.ascontiguousarray(a) for n, a in weights.items()}
        tensors = {n: _tensor(a) for n, a in keep.items()}
        w = _MoeWeights()
        w.q = _Quant(bits, group_size)
        for n, t in tensors.items():
            setattr(w, n, ctypes.pointer(t))
        x = np.ascontiguousarray(x)
        ids = np.ascontiguousarray(expert_ids, dtype=np.int32)
        ew = np.ascontiguousarray(expert_weights, dtype=x.dtype)
        out = np.empty(x.shape, dtype=x.dtype)
        tx, ti, tw, to = _tensor(x), _tensor(ids), _tensor(ew), _tensor(out)
        self._check(lib().gqmm_moe_forward(self._ctx, ctypes.byref(w), ctypes.byref(tx),
                                           ctypes.byref(ti), ctypes.byref(tw),
                                           ACTIVATIONS[act], ctypes.byref(to)))
        return out

    def router_topk(self, logits, k, mode="softmax_topk"):
        """(ids int32 [tokens, k], weights [tokens, k] of the logits' dtype)."""
        logits = np.ascontiguousarray(logits)
        ids = np.empty((logits.shape[0], k), dtype=np.int32)
        w = np.empty((logits.shape[0], k), dtype=logits.dtype)
        tl, ti, tw = _tensor(logits), _tensor(ids), _tensor(w)
        self._check(lib().gqmm_router_topk(self._ctx, ctypes.byref(tl), k, ROUTER_MODES[mode],
                                           ctypes.byref(ti), ctypes.byref(tw)))
        return ids, w


def bf16_to_f32(a):
    """bfloat16 bits (uint16) -> float32."""
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
