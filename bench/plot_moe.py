"""Plot time per canvas against canvases per step (B), one line per expert bit
width, with the memory floor (weight bytes / same-run ceiling) drawn dashed.

usage: python bench/plot_moe.py RECORDS.json OUT.png
RECORDS.json: the array (or JSON lines) that `gqmm bench --levers --json` writes.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    text = open(path).read().strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(src, dst):
    recs = [r for r in load(src) if r.get("op") == "moe_step"]
    if not recs:
        sys.exit(f"{src}: no moe_step records")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # a GPU run times each step launched by the host and replayed from a CUDA graph
    launches = sorted({r.get("launch", "host") for r in recs}, reverse=True)  # host, graph
    style = {"graph": "o-", "host": "s:"}
    for i, bits in enumerate(sorted({r["bits"] for r in recs}, reverse=True)):
        c = colors[i % len(colors)]
        for launch in launches:
            rs = sorted((r for r in recs if r["bits"] == bits and r.get("launch", "host") == launch),
                        key=lambda r: r["canvases"])
            what = "measured" if len(launches) == 1 else f"measured, {launch} launch"
            ax.plot([r["canvases"] for r in rs], [r["time_us_per_canvas"] / 1e3 for r in rs],
                    style.get(launch, "o-"), color=c, label=f"{bits}-bit {what}")
        rs = sorted((r for r in recs if r["bits"] == bits and r.get("launch", "host") == launches[0]),
                    key=lambda r: r["canvases"])
        b = [r["canvases"] for r in rs]
        if all(r.get("roofline_GBps") for r in rs):
            floor = [r["weight_bytes"] / (r["roofline_GBps"] * 1e9) * 1e3 / r["canvases"] for r in rs]
            ax.plot(b, floor, "--", color=c, alpha=0.7, label=f"{bits}-bit floor (bytes/ceiling)")
    r0 = recs[0]
    ceiling = "no measured ceiling" if not r0.get("roofline_GBps") else \
        f"ceiling copy {r0['ceiling_copy_GBps']:.0f} / read {r0['ceiling_read_GBps']:.0f} GB/s"
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["canvases"] for r in recs}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("canvases per step B (rows per expert = 16 B)")
    ax.set_ylabel("expert-layer time per canvas per step (ms)")
    ax.set_title(f"{r0['model']}: {r0['layers']} MoE layers, E={r0['E']}, top-{r0['top_k']}\n"
                 f"{r0['backend']} {r0.get('device') or ''} ({ceiling})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
