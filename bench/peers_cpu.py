#!/usr/bin/env python3
"""peers_cpu.py - gqmm's CPU sweep and MLX's CPU backend on the same shapes, in one run.

Runs `gqmm sweep --backend cpu --json` (which measures its own ceilings), then times
mlx.core.quantized_matmul and mlx.core.gather_qmm on the CPU stream with the same
shapes: quantized_matmul K=2816 with the sweep's N (weights >= 4x the LLC), M = 1..128;
gather_qmm on the seed gate_up shape (E=128, K=2816, N=1408, 4-bit, group 64, bf16)
with random top-8 routing of 16 * rows_per_expert tokens, rows sorted by expert as
mlx-lm does (sorted_indices=True). Prints one side-by-side table and writes every
record (gqmm's and mlx's, same fields) to --json.

MLX's CPU kernels are scalar, so its slow points get fewer runs (--budget seconds per
point, at least 3 runs, or 1 after the warm-up when one run exceeds the budget; the
count is printed). Usage:
  .venv/bin/python bench/peers_cpu.py [--gqmm build/gqmm] [--json out.json] [--m 1,16]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def run_gqmm(exe, ms, runs, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [exe, "sweep", "--backend", "cpu", "--json", path, "--m", ms, "--runs", str(runs)] + extra
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(path) as f:
        recs = json.load(f)
    os.unlink(path)
    return recs


def time_mlx(fn, budget, max_runs=20):
    """Median over runs after a warm-up; 3 runs at least, or 1 when one run
    alone exceeds the budget (MLX's scalar CPU kernels at large M)."""
    import mlx.core as mx

    t0 = time.perf_counter()
    mx.eval(fn())  # warm-up
    min_runs = 1 if time.perf_counter() - t0 > budget else 3
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), len(times)


def mlx_points(gq, budget, seed):
    """One mlx record per gqmm record, same op and shape."""
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(seed)
    out = []
    cache = {}
    for r in gq:
        E, K, N, bits, gs = r["E"], r["K"], r["N"], r["bits"], r["group_size"]
        key = (r["op"], E, K, N)
        if key not in cache:  # random packed weights and realistic bf16 scales/biases
            words = K * bits // 32
            w = mx.array(rng.integers(0, 2**32, size=(E, N, words), dtype=np.uint32))
            s = mx.array(rng.uniform(0.004, 0.008, size=(E, N, K // gs)).astype(np.float32)).astype(mx.bfloat16)
            b = mx.array(rng.uniform(-0.06, -0.03, size=(E, N, K // gs)).astype(np.float32)).astype(mx.bfloat16)
            if r["op"] == "qmm":
                w, s, b = w[0], s[0], b[0]
            mx.eval(w, s, b)
            cache = {key: (w, s, b)}  # one weight set at a time (memory)
        w, s, b = cache[key]
        if r["op"] == "qmm":
            M = r["M"]
            x = mx.array(rng.uniform(-1, 1, size=(M, K)).astype(np.float32)).astype(mx.bfloat16)
            macs = M * N * K
            fn = lambda: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits)
        else:
            topk = 8
            tokens = int(round(r["rows_per_expert"] * E / topk))
            ids = np.stack([rng.choice(E, topk, replace=False) for _ in range(tokens)]).reshape(-1)
            ids = np.sort(ids).astype(np.uint32)
            rows = ids.size
            x = mx.array(rng.uniform(-1, 1, size=(rows, 1, K)).astype(np.float32)).astype(mx.bfloat16)
            idx = mx.array(ids)
            macs = rows * N * K
            fn = lambda: mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=gs,
                                       bits=bits, sorted_indices=True)
        med, mn, n = time_mlx(fn, budget)
        rec = dict(r)
        rec.update(backend="mlx-cpu", device=f"mlx {mx.__version__} CPU", config="mlx",
                   runs=n, time_us_median=med * 1e6, time_us_min=mn * 1e6,
                   weight_GBps=r["weight_bytes"] / med / 1e9)
        rec["fraction_of_roofline"] = rec["weight_GBps"] / r["roofline_GBps"]
        out.append(rec)
        g = r["weight_GBps"]
        print(f"{r['op']:7s} M={r['M']:4d} rows/e={r['rows_per_expert']:6.1f}  gqmm {g:8.3f} GB/s"
              f"  mlx {rec['weight_GBps']:8.4f} GB/s ({n} runs)  gqmm/mlx {g / rec['weight_GBps']:7.1f}x",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gqmm", default="build/gqmm")
    ap.add_argument("--json", default=None)
    ap.add_argument("--m", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of mlx runs per point")
    ap.add_argument("--int8", action="store_true", help="gqmm FAST MODE (int8 activations)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    gq = run_gqmm(a.gqmm, a.m, a.runs, ["--int8"] if a.int8 else [])
    peers = mlx_points(gq, a.budget, a.seed)
    print()
    print(f"{'op':7s} {'M':>4s} {'rows/e':>7s} {'gqmm GB/s':>10s} {'frac':>6s} {'mlx GB/s':>10s} "
          f"{'mlx frac':>8s} {'speedup':>8s}   device: {gq[0]['device']}")
    for g, m in zip(gq, peers):
        print(f"{g['op']:7s} {g['M']:4d} {g['rows_per_expert']:7.1f} {g['weight_GBps']:10.3f} "
              f"{100 * g['fraction_of_roofline']:5.1f}% {m['weight_GBps']:10.4f} "
              f"{100 * m['fraction_of_roofline']:7.2f}% {g['weight_GBps'] / m['weight_GBps']:7.1f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(gq + peers, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
