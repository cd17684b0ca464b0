"""The MoE expert layer and router of gqmm, from Python (re-exported as
gqmm.moe_forward and gqmm.router_topk).

Same conventions as the rest of the package: numpy arrays (float32, float16 or
ml_dtypes.bfloat16; packed weights uint32 in the MLX layout), inputs that are
not C-contiguous are copied, outputs are fresh arrays, failures raise
gqmm.Error. The structs, loader and contexts are the package's.
"""

import ctypes

import numpy as np

from . import _MOE_WEIGHT_NAMES, _MoeWeights, _Quant, _array, _ctx, _error, _indices, _lib
from . import _ref, _tensor

ACTIVATIONS = {"swiglu": 0, "geglu": 1}
ROUTER_MODES = {"softmax_topk": 0, "softmax_topk_norm": 1, "topk_softmax": 2}


def _choice(table, value, name):
    if value not in table:
        raise _error(-15, f"{name}: {value!r} is not one of {sorted(table)}")
    return table[value]


def moe_forward(x, expert_ids, expert_weights, weights, bits=4, group_size=64, act="swiglu",
                backend="auto", num_threads=0, packed=None):
    """out [tokens, hidden] of x's dtype: the expert layer of a MoE block
    (mlx-lm's SwitchGLU plus the router's weighted sum, see gqmm_moe_forward).

    `weights` maps the gqmm_moe_weights names (gate_up*, or gate* and up*, and
    down*) to packed / scales / biases arrays; expert_weights is converted to
    x's dtype. `packed` optionally maps "gate_up", "gate", "up" and "down" to
    gqmm.pack copies of those weights (made on the backend that runs the layer)."""
    unknown = set(weights) - set(_MOE_WEIGHT_NAMES)
    if unknown:
        raise _error(-15, f"weights: unknown names {sorted(unknown)} "
                          f"(expected some of {_MOE_WEIGHT_NAMES})")
    packed = packed or {}
    unknown = set(packed) - {"gate_up", "gate", "up", "down"}
    if unknown:
        raise _error(-15, f"packed: unknown names {sorted(unknown)} "
                          f"(expected some of gate_up, gate, up, down)")
    code = _choice(ACTIVATIONS, act, "act")
    x = _array(x, "x", float_only=True)
    # the arrays must outlive the call: keep them next to their descriptors
    keep = {n: _array(a, n) for n, a in weights.items()}
    tensors = {n: _tensor(a) for n, a in keep.items()}
    w = _MoeWeights()
    w.q = _Quant(bits, group_size)
    for n, t in tensors.items():
        setattr(w, n, ctypes.pointer(t))
    for n, p in packed.items():
        setattr(w, n + "_packed", p.handle)
    ids = _indices(expert_ids, "expert_ids")
    ew = _array(np.asarray(expert_weights).astype(x.dtype), "expert_weights", float_only=True)
    out = np.empty(x.shape, dtype=x.dtype)
    tx, ti, tw, to = _tensor(x), _tensor(ids), _tensor(ew), _tensor(out)
    ctx = _ctx(backend, num_threads)
    ctx.check(_lib.gqmm_moe_forward(ctx.handle, ctypes.byref(w), _ref(tx), _ref(ti), _ref(tw),
                                    code, _ref(to)))
    return out


def router_topk(logits, k, mode="softmax_topk", backend="auto"):
    """(expert_ids int32 [tokens, k], expert_weights [tokens, k] of the logits'
    dtype), slots in descending order of weight (see gqmm_router_topk)."""
    code = _choice(ROUTER_MODES, mode, "mode")
    logits = _array(logits, "logits", float_only=True)
    # shapes from bad arguments stay >= 0 so that the library names the error
    shape = (logits.shape[0] if logits.ndim else 0, max(0, int(k)))
    ids = np.empty(shape, dtype=np.int32)
    w = np.empty(shape, dtype=logits.dtype)
    tl, ti, tw = _tensor(logits), _tensor(ids), _tensor(w)
    ctx = _ctx(backend)
    ctx.check(_lib.gqmm_router_topk(ctx.handle, _ref(tl), int(k), code, _ref(ti), _ref(tw)))
    return ids, w


__all__ = ["moe_forward", "router_topk", "ACTIVATIONS", "ROUTER_MODES"]
