#!/usr/bin/env python3
"""ncu_stalls.py - where a kernel's warps wait, per SASS instruction.

Reads the per-instruction table that `ncu --import REPORT --page source --csv
--print-source sass` writes for a report taken with `--section SourceCounters`
(bench/gpu_check.sh profile does both) and prints: the stall reasons over the
whole kernel, the opcodes' shares of the samples and of the executed
instructions, and the N instructions with the most samples (index in the table,
share, times executed, the instruction, its three main stall reasons).

A long-scoreboard stall on an instruction that only moves or tests a register
is a wait for a global load issued just before it: that is how session 8
found the dependent loads at the wgmma kernel's unit boundaries
(docs/perf-notes.md).

    python3 bench/ncu_stalls.py sass.csv [--top N]
"""
import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def as_int(s):
    try:
        return int(s.replace(",", ""))
    except ValueError:
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    rows = list(csv.reader(open(args.csv)))
    head = next((i for i, r in enumerate(rows) if SAMPLES in r), None)
    if head is None:
        sys.exit(f"{args.csv}: no '{SAMPLES}' column (take the report with --section SourceCounters)")
    col = {h: i for i, h in enumerate(rows[head])}
    data = [r for r in rows[head + 1:] if len(r) == len(rows[head])]
    reasons = [h for h in rows[head] if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(as_int(r[col[SAMPLES]]) for r in data) or 1
    total_x = sum(as_int(r[col[EXECUTED]]) for r in data) or 1
    by_reason, by_op, by_op_x = collections.Counter(), collections.Counter(), collections.Counter()
    for r in data:
        words = [w for w in r[col["Source"]].split() if not w.startswith("@")]
        op = words[0].split(".")[0] if words else "?"
        by_op[op] += as_int(r[col[SAMPLES]])
        by_op_x[op] += as_int(r[col[EXECUTED]])
        for h in reasons:
            by_reason[h] += as_int(r[col[h]])
    print(f"{total} samples, {total_x} warp instructions executed")
    print("stall reasons: " + ", ".join(f"{k[6:]} {100 * v / total:.1f}%"
                                        for k, v in by_reason.most_common(10)))
    print("opcodes (% of samples / % of executed): " +
          ", ".join(f"{k} {100 * v / total:.1f}/{100 * by_op_x[k] / total_x:.1f}"
                    for k, v in by_op.most_common(16)))
    top = sorted(range(len(data)), key=lambda i: -as_int(data[i][col[SAMPLES]]))[:args.top]
    for i in sorted(top):
        r = data[i]
        main3 = sorted(((as_int(r[col[h]]), h[6:]) for h in reasons), reverse=True)[:3]
        print(f"{i:5d} {100 * as_int(r[col[SAMPLES]]) / total:5.2f}% x{as_int(r[col[EXECUTED]]):>9d}  "
              f"{r[col['Source']].strip()[:60]:60s} " +
              " ".join(f"{h}:{v}" for v, h in main3 if v))


if __name__ == "__main__":
    main()
