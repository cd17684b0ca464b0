#!/usr/bin/env python3
"""peers_cuda.py - the peers of gqmm's CUDA backend, timed in one run:
torch._grouped_mm (bf16 weights) on the seed's gather shapes and the
rows-per-expert sweep, and torch._weight_int4pack_mm (tinygemm int4, group
64) on the dense K=2816 N=180224 sweep (the same packed bytes as gate_up).
Records follow DESIGN.md section 5, with this run's own ceilings.
"""
import argparse
import json

import numpy as np
import torch

E, TOPK, TOKENS = 128, 8, 256
SHAPES = {"gate_up": (2816, 1408), "gate": (2816, 704), "down": (704, 2816)}


def timed(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], ts[0]


def ceilings(reps):
    n = 512 << 20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy, _ = timed(lambda: dst.copy_(src), reps)
    # a float32 sum streams at the read bandwidth (an int32 sum into int64,
    # used before, ran at ~570 GB/s on the H100: a slow kernel, not memory)
    f = torch.randn(n // 4, dtype=torch.float32, device="cuda")
    t_read, _ = timed(lambda: torch.sum(f), reps)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t_mm, _ = timed(lambda: a @ a, 5)
    return {"copy": 2 * n / t_copy / 1e3, "read": n / t_read / 1e3,
            "gmacs": 8192 ** 3 / t_mm / 1e3}


def routing(rng, rows_per_expert=None):
    """Sorted expert ids: random top-8 of 256 tokens, or r rows on every expert."""
    if rows_per_expert is not None:
        return np.repeat(np.arange(E), rows_per_expert)
    scores = rng.random((TOKENS, E))
    ids = np.argsort(-scores, axis=1)[:, :TOPK].reshape(-1)
    return np.sort(ids)


def record(out, c, backend, op, shape, K, N, rows, used, wbytes, t):
    mem = max(c["copy"], c["read"])
    macs = rows * N * K
    roof = min(mem, c["gmacs"] * wbytes / macs)
    gbps = wbytes / (t[0] * 1e-6) / 1e9
    r = {"backend": backend, "device": torch.cuda.get_device_name(), "op": op, "shape": shape,
         "E": used, "K": K, "N": N, "M": rows, "rows_per_expert": rows / used, "bits": 16 if
         "grouped" in backend else 4, "group_size": 0 if "grouped" in backend else 64,
         "dtype": "bfloat16", "config": "default", "time_us_median": t[0], "time_us_min": t[1],
         "weight_bytes": wbytes, "weight_GBps": gbps, "ceiling_copy_GBps": c["copy"],
         "ceiling_read_GBps": c["read"], "ceiling_compute_GMACps": c["gmacs"],
         "roofline_GBps": roof, "fraction_of_roofline": gbps / roof}
    out.append(r)
    print(f"{backend:22s} {op:7s} {shape:8s} K={K:5d} N={N:6d} rows={rows:6d} "
          f"rows/e={rows / used:6.1f} {t[0]:9.1f} us {gbps:7.0f} GB/s {100 * gbps / roof:5.1f}%")


def grouped(out, c, reps, rng):
    mm = getattr(torch, "_grouped_mm", None)
    if mm is None:
        print("torch._grouped_mm: not in this torch")
        return
    runs = [(name, K, N, routing(rng), "gather") for name, (K, N) in SHAPES.items()]
    K, N = SHAPES["gate_up"]
    runs += [("gate_up", K, N, routing(rng, r), "sweep") for r in (1, 2, 4, 8, 16, 32, 64, 128)]
    weights = {}
    for name, K, N, ids, op in runs:
        if name not in weights:  # (E, K, N) as a transposed (E, N, K): the layout it wants
            weights[name] = torch.randn(E, N, K, dtype=torch.bfloat16, device="cuda").transpose(-2, -1)
        w = weights[name]
        counts = np.bincount(ids, minlength=E)
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device="cuda")
        x = torch.randn(len(ids), K, dtype=torch.bfloat16, device="cuda")
        try:
            t = timed(lambda: mm(x, w, offs=offs), reps)
        except Exception as e:  # report, don't hide
            print(f"torch._grouped_mm {name}: {type(e).__name__}: {e}")
            continue
        used = int((counts > 0).sum())
        record(out, c, "torch._grouped_mm", op, name, K, N, len(ids), used, used * K * N * 2, t)
    del weights


def tinygemm(out, c, reps):
    K, N, gs = 2816, E * 1408, 64
    try:
        q = torch.randint(0, 255, (N, K // 2), dtype=torch.uint8, device="cuda")
        packed = torch._convert_weight_to_int4pack(q, 8)
        sz = torch.randn(K // gs, N, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    except Exception as e:
        print(f"tinygemm setup: {type(e).__name__}: {e}")
        return
    wbytes = N * K // 2 + (K // gs) * N * 4
    for m in (1, 2, 4, 8, 16, 32, 64, 128):
        x = torch.randn(m, K, dtype=torch.bfloat16, device="cuda")
        try:
            t = timed(lambda: torch._weight_int4pack_mm(x, packed, gs, sz), reps)
        except Exception as e:
            print(f"tinygemm M={m}: {type(e).__name__}: {e}")
            continue
        record(out, c, "torch._weight_int4pack_mm", "dense", "E*N_x_K", K, N, m, 1, wbytes, t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="peers_cuda.json")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    c = ceilings(a.reps)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: copy {c['copy']:.0f} GB/s "
          f"read {c['read']:.0f} GB/s bf16 mm {c['gmacs']:.0f} GMAC/s")
    out = []
    grouped(out, c, a.reps, rng)
    torch.cuda.empty_cache()
    tinygemm(out, c, a.reps)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
