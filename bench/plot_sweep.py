#!/usr/bin/env python3
"""plot_sweep.py - GB/s of weights streamed vs rows per expert (M), gqmm and
its peers, with the run's memory ceiling drawn. Reads the JSON records of
`gqmm cuda-bench` / `gqmm sweep` and bench/peers_cuda.py (DESIGN.md section 5).

  python3 bench/plot_sweep.py gqmm.json [peers.json ...] -o sweep.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("-o", "--out", default="sweep.png")
    a = ap.parse_args()
    recs = []
    for f in a.files:
        if os.path.exists(f):
            with open(f) as fh:
                recs += json.load(fh)
    series, ceiling, device = {}, 0.0, ""
    for r in recs:
        if r["op"] not in ("sweep", "dense"):
            continue
        if r["backend"] == "cuda" and r.get("config") not in ("auto", "packed-auto"):
            continue  # per-config points of the sweep: the built-in choice is plotted
        who = "gqmm cuda" if r["backend"] == "cuda" else r["backend"]
        if r.get("config") == "packed-auto":
            who += " packed"
        label = f"{who} {r['op']} ({r['bits']}-bit)" if r["bits"] != 16 else \
            f"{who} {r['op']} (bf16 weights: 4x the bytes)"
        series.setdefault(label, []).append((r["rows_per_expert"], r["weight_GBps"]))
        ceiling = max(ceiling, r["ceiling_copy_GBps"], r["ceiling_read_GBps"])
        device = r["device"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if ceiling:
        ax.axhline(ceiling, color="k", ls="--", label=f"memory ceiling {ceiling:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per expert (gather) / M (dense)")
    ax.set_ylabel("weight bytes streamed, GB/s")
    ax.set_title(f"weight-reuse sweep, K=2816 N=1408 x 128 experts: {device}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
