#!/usr/bin/env python3
"""tune_report.py - docs/tile-tuning.md and its heat maps from `gqmm tune --json` files.

    python bench/tune_report.py [--out docs/tile-tuning.md] [--img docs/img] FILE.json ...

Reads every measurement record (DESIGN.md section 5 fields plus config_fields), groups them
by (backend, device, op, shape, quantization, dtype), and writes for the H100 and H200 (cuda backend)
and for the CPU a table and a heat map (configuration x rows per expert, colour = fraction
of the same run's roofline) and a conclusion computed from the numbers: how much the best
configuration beats the one closest to the seed's fixed 64x64x64 tile, which parameters move
GB/s most at 16 rows per expert, and whether the remaining gap is the kernel's or the
memory's. Missing data is said plainly; nothing is invented.
"""
import argparse
import json
import math
import os
import sys
import textwrap

ROWS = [1, 4, 8, 16, 32, 64]
FOCUS_ROWS = 16  # the seed's M
FIELDS = ["tile_m", "tile_n", "tile_k", "threads", "stages", "split_k"]
TARGETS = [  # (backend, device substring or None, heading, short name, command prefix)
    ("cuda", "H100", "NVIDIA H100", "H100", "gqmm tune --backend cuda"),
    ("cuda", "H200", "NVIDIA H200", "H200", "gqmm tune --backend cuda"),
    ("cpu", None, "CPU", "CPU", "gqmm tune --backend cpu"),
]
WHY = {
    "tile_m": "rows per tile: below the rows an expert has, every extra row tile streams the "
              "expert's weights again; above it the tensor-core/SIMD tile is padded with empty "
              "rows (tensor-core fill)",
    "tile_n": "output features per tile: sets the weight bytes each tile streams and how many "
              "tiles the grid has (bytes in flight per SM, and the tail of the last wave)",
    "tile_k": "reduction depth per step: the weight bytes in flight per pipeline stage",
    "threads": "threads per tile: how many tiles an SM (or core) keeps resident (occupancy) "
               "and so how many loads are outstanding",
    "stages": "pipeline depth: how many tile loads are in flight at once (bytes in flight per SM)",
    "split_k": "splitting K: more, smaller units for a short grid (tail), at the price of a "
               "reduction pass",
}


def num(v):
    """A finite float or None (JSON null, strings and NaN become None)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def load(paths):
    """Records from files holding {"records": [...]}, a list, or JSON lines; bad ones counted."""
    recs, bad, notes = [], 0, []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            notes.append(f"{path}: not readable ({e.strerror})")
            continue
        try:
            doc = json.loads(text)
            items = doc.get("records", []) if isinstance(doc, dict) else doc
        except ValueError:
            items = []
            for line in text.splitlines():
                try:
                    items.append(json.loads(line)) if line.strip() else None
                except ValueError:
                    bad += 1
        if not isinstance(items, list):
            notes.append(f"{path}: no record list")
            continue
        # the ceilings' device name names the GPU even where the device key does not
        ceil = doc.get("ceilings") if isinstance(doc, dict) else None
        dev_name = ceil.get("device_name") if isinstance(ceil, dict) else None
        for r in items:
            if not isinstance(r, dict) or not isinstance(r.get("config"), str):
                bad += 1
                continue
            rows = num(r.get("rows_per_expert", r.get("M")))
            if rows is None:
                bad += 1
                continue
            fields = r.get("config_fields") if isinstance(r.get("config_fields"), dict) else {}
            device = str(r.get("device", "?"))
            if isinstance(dev_name, str) and dev_name and dev_name not in device:
                device = f"{dev_name} ({device})"
            recs.append({
                "backend": str(r.get("backend", "?")), "device": device,
                "op": str(r.get("op", "?")), "E": num(r.get("E")), "K": num(r.get("K")),
                "N": num(r.get("N")), "bits": num(r.get("bits")),
                "group_size": num(r.get("group_size")), "dtype": str(r.get("dtype", "?")),
                "rows": int(rows), "config": r["config"],
                "fields": {k: int(num(fields.get(k)) or 0) for k in FIELDS},
                "us": num(r.get("time_us_median")), "us_min": num(r.get("time_us_min")), "gbps": num(r.get("weight_GBps")),
                "frac": num(r.get("fraction_of_roofline")), "roof": num(r.get("roofline_GBps")),
                "copy": num(r.get("ceiling_copy_GBps")), "read": num(r.get("ceiling_read_GBps")),
                "heuristic": r.get("heuristic") is True, "file": path,
            })
    return recs, bad, notes


def datasets(recs):
    """Group records by what makes them comparable; within a group keep, per (config, rows),
    the fastest valid measurement (several files may measure the same point)."""
    groups = {}
    for r in recs:
        key = (r["backend"], r["device"], r["op"], r["E"], r["K"], r["N"], r["bits"],
               r["group_size"], r["dtype"])
        cell = groups.setdefault(key, {}).setdefault((r["config"], r["rows"]), r)
        if r["gbps"] is not None and (cell["gbps"] is None or r["gbps"] > cell["gbps"]):
            groups[key][(r["config"], r["rows"])] = r
    return groups


def fmt_int(v):
    return "?" if v is None else f"{int(v)}"


def shape_name(key):
    backend, device, op, E, K, N, bits, gs, dtype = key
    e = f"E={fmt_int(E)} " if op == "gather_qmm" else ""
    return f"{op} {e}K={fmt_int(K)} N={fmt_int(N)}, {fmt_int(bits)}-bit, group {fmt_int(gs)}, {dtype}"


def dist64(fields):
    """How far a tile is from 64x64x64 (log2 steps); fields a kernel does not use count 0."""
    return sum(abs(math.log2(fields[k] / 64)) for k in ("tile_m", "tile_n", "tile_k")
               if fields[k] > 0)


def heat_map(cells, configs, rows, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    vals = np.full((len(configs), len(rows)), np.nan)
    use_frac = any(c["frac"] is not None for c in cells.values())
    for i, c in enumerate(configs):
        for j, r in enumerate(rows):
            rec = cells.get((c, r))
            if rec is not None:
                v = rec["frac"] if use_frac else rec["gbps"]
                vals[i, j] = np.nan if v is None else v
    h = max(3.0, 0.22 * len(configs) + 1.5)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(rows), h))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    im = ax.imshow(np.ma.masked_invalid(vals), aspect="auto", cmap=cmap,
                   vmin=0.0 if use_frac else None, vmax=1.0 if use_frac else None)
    ax.set_xticks(range(len(rows)), [str(r) for r in rows])
    ax.set_yticks(range(len(configs)), configs, fontsize=7)
    ax.set_xlabel("rows per expert")
    ax.set_title(title, fontsize=9)
    if len(configs) <= 48:
        for i in range(len(configs)):
            for j in range(len(rows)):
                rec = cells.get((configs[i], rows[j]))
                if rec is not None and rec["gbps"] is not None:
                    ax.text(j, i, gb(rec["gbps"]), ha="center", va="center", fontsize=6,
                            color="white" if (vals[i, j] < 0.6 if use_frac else False) else "black")
    fig.colorbar(im, ax=ax, label="fraction of same-run roofline" if use_frac else "weight GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_at(cells, configs, r):
    cand = [cells[(c, r)] for c in configs if (c, r) in cells and cells[(c, r)]["gbps"] is not None]
    return max(cand, key=lambda x: x["gbps"]) if cand else None


def gb(x):
    """GB/s with three significant digits (CPU figures are ~0.3, H100 ones ~3000)."""
    return "n/a" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def conclusion(cells, configs, rows):
    """Plain words computed from the numbers."""
    out = []
    focus = FOCUS_ROWS if FOCUS_ROWS in rows else min(rows, key=lambda r: abs(r - FOCUS_ROWS))
    fields = {c: next(cells[k]["fields"] for k in cells if k[0] == c) for c in configs}
    base = min(configs, key=lambda c: (dist64(fields[c]), c))
    bf = fields[base]
    out.append(f"- **Fixed tile vs tuned.** The configuration closest to the seed's fixed "
               f"64x64x64 tile is `{base}` (tile {bf['tile_m']}x{bf['tile_n']}x{bf['tile_k']}).")
    for r in rows:
        b, f = best_at(cells, configs, r), cells.get((base, r))
        if b is None:
            continue
        if f is b:
            out.append(f"  - M={r}: the 64-tile is itself the fastest, {gb(b['gbps'])} GB/s "
                       f"({pct(b['frac'])} of roofline).")
        elif f is None or f["gbps"] is None:
            out.append(f"  - M={r}: best `{b['config']}` {gb(b['gbps'])} GB/s "
                       f"({pct(b['frac'])} of roofline); the 64-tile has no figure here.")
        else:
            out.append(f"  - M={r}: best `{b['config']}` {gb(b['gbps'])} GB/s "
                       f"({pct(b['frac'])}) vs `{base}` {gb(f['gbps'])} GB/s ({pct(f['frac'])}): "
                       f"{b['gbps'] / f['gbps']:.2f}x.")
    # parameter effects at the focus rows, within the kernel family of the best config (a
    # config name's first word: "mma_w8_m1_s4" -> "mma"; another family is another kernel)
    fam = lambda c: c.split("_")[0]
    b = best_at(cells, configs, focus)
    at = [cells[(c, focus)] for c in configs
          if (c, focus) in cells and cells[(c, focus)]["gbps"] is not None
          and b is not None and fam(c) == fam(b["config"])]
    for other in sorted({fam(c) for c in configs} - ({fam(b["config"])} if b else set())):
        o = best_at(cells, [c for c in configs if fam(c) == other], focus)
        if o is not None and b is not None:
            out.append(f"- Kernel family `{other}` is another kernel, not a tile choice: best "
                       f"{gb(o['gbps'])} GB/s at {focus} rows, {b['gbps'] / o['gbps']:.1f}x slower "
                       f"than `{b['config']}`; the analysis below compares `{fam(b['config'])}` "
                       f"configurations only.")
    effects = []
    for p in FIELDS:
        by = {}
        for rec in at:
            v = rec["fields"][p]
            by[v] = max(by.get(v, 0.0), rec["gbps"])
        if len(by) >= 2 and min(by.values()) > 0:
            effects.append((max(by.values()) / min(by.values()), p, by))
    effects.sort(reverse=True)
    if effects:
        out.append(f"- **What matters at {focus} rows per expert** (best GB/s reachable with the "
                   f"parameter held at each value; the larger the spread, the more it matters):")
        for spread, p, by in effects:
            vals = ", ".join(f"{v}: {gb(g)}" for v, g in sorted(by.items()))
            out.append(f"  - `{p}` {spread:.2f}x ({vals} GB/s) - {WHY[p]}.")
        unused = [p for p in FIELDS if p not in {e[1] for e in effects}]
        if unused:
            out.append(f"  - Not varied in this table: {', '.join('`' + p + '`' for p in unused)}.")
        # controlled comparisons: two configs that differ in exactly one field
        pairs = []
        for i, x in enumerate(at):
            for y in at[i + 1:]:
                diff = [p for p in FIELDS if x["fields"][p] != y["fields"][p]]
                if len(diff) == 1:
                    lo, hi = sorted((x, y), key=lambda r: r["fields"][diff[0]])
                    pairs.append((abs(math.log(hi["gbps"] / lo["gbps"])), diff[0], lo, hi))
        pairs.sort(key=lambda t: -t[0])
        if pairs:
            out.append("  - Controlled pairs (only that field differs): " + "; ".join(
                f"`{p}` {lo['fields'][p]} -> {hi['fields'][p]}: {gb(lo['gbps'])} -> "
                f"{gb(hi['gbps'])} GB/s ({hi['gbps'] / lo['gbps']:.2f}x)"
                for _, p, lo, hi in pairs[:6]) + ".")
        elif len(effects) > 1:
            out.append("  - No two configurations differ in one field only, so these effects are "
                       "confounded (each value comes with other changes).")
    else:
        out.append(f"- No parameter varies among the configurations measured at {focus} rows.")
    # where the gap is
    b1 = best_at(cells, configs, min(rows))
    if b is None or b["frac"] is None:
        out.append("- **Gap to the ceiling:** no same-run ceiling was recorded, so the gap cannot be "
                   "split between kernel and memory.")
        return out
    mem = max(x for x in (b["copy"], b["read"], 0.0) if x is not None)
    compute_bound = b["roof"] is not None and mem > 0 and b["roof"] < 0.999 * mem
    gap = f"{gb(b['gbps'])} GB/s is {pct(b['frac'])} of the roofline ({gb(b['roof'])} GB/s)"
    if b["frac"] >= 0.9:
        verdict = ("within 10% of the ceiling measured in the same run: what remains is the memory "
                   "itself, not the kernel.")
    elif compute_bound:
        verdict = (f"here the roofline is the compute ceiling ({gb(b['roof'])} GB/s of weights at "
                   f"this arithmetic, below the memory's {gb(mem)} GB/s): the gap is arithmetic "
                   f"(dequantize and multiply-add throughput), a kernel problem, not the memory.")
    elif b1 is not None and b1["frac"] is not None and b1["frac"] >= 0.9 and b1 is not b:
        verdict = (f"yet at {b1['rows']} row(s) per expert the best config reaches "
                   f"{pct(b1['frac'])}: the memory can deliver, so the gap at {focus} rows is the "
                   f"kernel's (its weight-reuse path), not the memory's.")
    else:
        low = "" if b1 is None else f" (best at {b1['rows']} row(s): {pct(b1['frac'])})"
        verdict = (f"no configuration reaches 90% even at the smallest M measured{low}: the "
                   f"kernel's streaming path (bytes in flight, instruction overhead) limits it, "
                   f"not the memory.")
    out.append(f"- **Gap to the ceiling at {focus} rows:** best {gap}; {verdict}")
    h = [cells[(c, focus)] for c in configs if (c, focus) in cells and cells[(c, focus)]["heuristic"]]
    if h and h[0]["gbps"] is not None:
        out.append(f"- **gqmm's generic heuristic** (`gqmm__tune_heuristic`, for backends that "
                   f"defer to it when the cache has no entry) picks "
                   f"`{h[0]['config']}` at {focus} rows: {gb(h[0]['gbps'])} GB/s, "
                   f"{100 * h[0]['gbps'] / b['gbps']:.0f}% of the tuned best.")
    return out


def section(key, cells, img_dir, md_dir):
    configs = sorted({c for c, _ in cells},
                     key=lambda c: ([next(cells[k]["fields"] for k in cells if k[0] == c)[f]
                                     for f in FIELDS], c))
    rows = sorted({r for _, r in cells})
    backend, device = key[0], key[1]
    any_rec = next(iter(cells.values()))
    if any_rec["copy"] is None and any_rec["read"] is None:
        ceil = "same-run ceilings not recorded"
    else:
        ceil = (f"same-run ceilings: copy {any_rec['copy'] or 0:.1f} GB/s, read "
                f"{any_rec['read'] or 0:.1f} GB/s")
    lines = [f"### {shape_name(key)}", "",
             f"Device `{device}`, backend `{backend}`; {ceil} "
             f"(source: `{os.path.basename(any_rec['file'])}`).", ""]
    noise = sorted(c["us"] / c["us_min"] for c in cells.values()
                   if c["us"] is not None and c["us_min"] is not None and c["us_min"] > 0)
    if noise:
        lines += [f"Run-to-run noise (median / fastest sample of each measurement): typically "
                  f"{noise[len(noise) // 2]:.2f}x, at worst {noise[-1]:.2f}x; differences between "
                  f"configurations smaller than that are not significant.", ""]
    missing = [r for r in ROWS if r not in rows]
    if missing:
        lines += [f"Rows per expert not measured in these files: {', '.join(map(str, missing))}.", ""]
    # The device's first two words keep heat maps of different cards apart.
    dev_tag = " ".join(device.split(" (")[0].split()[:2])
    safe = "".join(ch if ch.isalnum() else "-" for ch in f"{dev_tag}-{backend}-{key[2]}-K"
                   f"{fmt_int(key[4])}-N{fmt_int(key[5])}-{fmt_int(key[6])}bit-{key[8]}")
    png = os.path.join(img_dir, f"tune-{safe}.png")
    short = textwrap.shorten(device.split(" (")[0], width=70, placeholder="...")
    heat_map(cells, configs, rows, f"{short}\n{shape_name(key)}", png)
    lines += [f"![heat map]({os.path.relpath(png, md_dir)})", "",
              "Weight GB/s (fraction of the same-run roofline); **bold** = fastest at that M.", ""]
    lines.append("| config | tm | tn | tk | thr | stg | sk | " +
                 " | ".join(f"M={r}" for r in rows) + " |")
    lines.append("|" + " --- |" * (7 + len(rows)))
    best = {r: best_at(cells, configs, r) for r in rows}
    for c in configs:
        f = next(cells[k]["fields"] for k in cells if k[0] == c)
        row = [f"`{c}`"] + [str(f[k]) for k in FIELDS]
        for r in rows:
            rec = cells.get((c, r))
            if rec is None:
                row.append("")
            elif rec["gbps"] is None:
                row.append("failed")
            else:
                txt = f"{gb(rec['gbps'])} ({pct(rec['frac'])})"
                row.append(f"**{txt}**" if best[r] is rec else txt)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "#### Conclusion", ""] + conclusion(cells, configs, rows) + [""]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="gqmm tune --json outputs")
    ap.add_argument("--out", default="docs/tile-tuning.md")
    ap.add_argument("--img", default="docs/img")
    a = ap.parse_args()
    recs, bad, notes = load(a.files)
    groups = datasets(recs)
    os.makedirs(a.img, exist_ok=True)
    md_dir = os.path.dirname(os.path.abspath(a.out))
    names = ", ".join(f"`{os.path.basename(p)}`" for p in a.files) or "none"
    lines = ["# Tile tuning of the gathered quantized GEMM", "",
             "<!-- generated by bench/tune_report.py from `gqmm tune --json` files: edit the script,"
             " not this file -->", "",
             "The seed asks whether tuning the tiles (bm, bn, bk, warps) of a small-M gathered "
             "quantized GEMM is tractable and what it buys at about 16 rows per expert "
             "(E=128, K=2816, N in {1408, 704}, 4-bit, group 64). `gqmm tune` measures every "
             "configuration a backend compiles in and caches the fastest per rows-per-expert "
             "bucket; this page shows what it measured.", "",
             "How `gqmm tune` measures: every configuration the backend offers (already pruned "
             "for registers/shared memory) runs once on NaN-poisoned output and must agree with "
             "the first configuration, then the median of 20 timed samples (host clock around "
             "back-to-back calls ended by the backend's sync, at least 1 ms per sample on a GPU) "
             "is taken, rotating through input copies that together exceed 512 MB so caches do "
             "not flatter; routing is random top-8 over E experts, so at 1 row per expert about a "
             "third of the experts get no row. Weight GB/s counts packed weights + scales + "
             "biases of the experts used; the fraction is of the roofline "
             "min(max(copy, read), compute x bytes / MACs) measured in the same run.", "",
             "Using the result: `gqmm tune` stores the fastest configuration per rows-per-expert "
             "bucket (the power of two at or above rows / experts) in a JSON cache, "
             "`$GQMM_TUNE_CACHE` or else `~/.cache/gqmm/tune.json` (`$XDG_CACHE_HOME` honoured), "
             "keyed by device, backend, op, dtype, bits, group size, K, N, bucket and library "
             "version. Every later call looks its key up once per context (a neighbouring bucket's "
             "choice stands in for an untuned one); a missing, corrupt or stale entry falls back "
             "to the backend's heuristic, and a stored name is used only if that configuration "
             "is still compiled in and valid for the call. `GQMM_TUNE=auto` tunes a missing key "
             "on first use (quick search) and stores it.", "",
             f"Input files: {names}; {len(recs)} measurements."]
    if bad:
        lines.append(f"{bad} malformed records were skipped.")
    lines += [f"Note: {n}." for n in notes] + [""]
    for backend, dev_sub, heading, short, cmd in TARGETS:
        lines += [f"## {heading}", ""]
        keys = [k for k in groups if k[0] == backend and (dev_sub is None or dev_sub in k[1])]
        if not keys:
            tag = short.lower()
            lines += [f"No {short} data in these files. To produce it, on that machine: "
                      f"`{cmd} --N 1408 --json bench/data/tune-{tag}-n1408.json` and "
                      f"`{cmd} --N 704 --json bench/data/tune-{tag}-n704.json`, then "
                      f"`make tune-report`.", ""]
            continue
        seed_first = sorted(keys, key=lambda k: (k[5] != 1408, k[5] != 704, str(k)))
        for k in seed_first:
            lines += section(k, groups[k], a.img, md_dir)
    others = [k for k in groups if not any(
        k[0] == b and (d is None or d in k[1]) for b, d, *_ in TARGETS)]
    if others:
        lines += ["## Other devices", ""]
        for k in sorted(others, key=str):
            lines += section(k, groups[k], a.img, md_dir)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {a.out} ({len(groups)} data sets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
