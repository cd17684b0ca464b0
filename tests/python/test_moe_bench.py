"""`gqmm bench` end to end on a tiny custom model: the tables, the JSON
records (DESIGN.md 5 fields plus canvases and bits) and the plot."""
import json
import os
import subprocess

import pytest

GQMM = os.path.join(os.path.dirname(os.environ.get("GQMM_LIB", "")), "gqmm")
TINY = ["--layers", "3", "--experts", "8", "--topk", "2", "--hidden", "128", "--inter", "64",
        "--tokens", "16", "--backend", "ref", "--max-layers", "2"]


@pytest.fixture(scope="module")
def levers(tmp_path_factory):
    if not os.path.exists(GQMM):
        pytest.skip(f"{GQMM} not built")
    out = tmp_path_factory.mktemp("bench")
    res = subprocess.run([GQMM, "bench", *TINY, "--levers", "--breakdown", "--reps", "3",
                          "--json", str(out / "r.json"), "--plot", str(out / "r.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout, json.load(open(out / "r.json")), out


def test_levers_table_and_records(levers):
    stdout, recs, _ = levers
    assert "ceiling: not measured" in stdout  # the reference backend has no ceilings hook
    assert "step time = measured time x 3/2" in stdout  # scaled, and says so
    assert [(r["bits"], r["canvases"]) for r in recs] == \
        [(b, c) for b in (8, 4, 3, 2) for c in (1, 2, 4, 8)]
    for r in recs:
        for key in ("backend", "op", "E", "K", "N", "M", "rows_per_expert", "bits", "group_size",
                    "dtype", "time_us_median", "time_us_min", "weight_bytes", "weight_GBps",
                    "ceiling_copy_GBps", "roofline_GBps", "fraction_of_roofline", "canvases"):
            assert key in r, key
        assert r["M"] == 16 * r["canvases"] * 2 and r["rows_per_expert"] == r["M"] / 8
        # weight bytes of the experts used: packed + bf16 scale and bias per group of 64
        per_expert = 3 * 128 * 64 * (r["bits"] / 8 + 4 / 64)
        assert r["weight_bytes"] <= 3 * 8 * per_expert + 1
        assert r["weight_bytes"] >= 3 * 2 * per_expert
        assert r["time_us_min"] <= r["time_us_median"]
        assert r["layer_gate_up_us"] > 0 and r["layer_down_us"] > 0


def test_plot_written(levers):
    _, _, out = levers
    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bad_options_fail_cleanly():
    if not os.path.exists(GQMM):
        pytest.skip(f"{GQMM} not built")
    for args in (["--model", "nope"], ["--bits", "7"], ["--topk", "9", "--experts", "4"],
                 ["--canvases", "0"]):
        res = subprocess.run([GQMM, "bench", *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
