"""The gqmm command-line tool: help, info and verify behave (exit codes, output)."""

import os
import re
import subprocess

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("GQMM_BUILD", os.path.join(ROOT, "build"))
GQMM = os.path.join(BUILD, "gqmm")


def run(*args):
    return subprocess.run([GQMM, *args], capture_output=True, text=True, timeout=600)


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "verify", "bench"):
        assert re.search(rf"^\s+{cmd}\s", r.stdout, re.M), r.stdout
    assert run().returncode == 2  # no command: usage, failure
    bad = run("no-such-command")
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_info_names_version_cpu_and_backends():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gqmm ")
    assert re.search(r"^cpu: ", r.stdout, re.M)
    assert re.search(r"^backends compiled \(best first\):.* ref$", r.stdout, re.M)
    assert re.search(r"^--backend auto runs on: \S+ \(host memory\)", r.stdout, re.M)
    assert run("info", "--bogus").returncode == 2


def test_verify_prints_a_table_and_passes():
    r = run("verify", "--seed", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:4] == ["backend", "bits", "group", "dtype"]
    rows = [ln for ln in lines[2:] if re.match(r"^\S+\s+\d+\s+\d+\s+\S+\s+\d+\s", ln)]
    assert all(ln.split()[7] == "pass" for ln in rows), r.stdout
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert m and int(m.group(1)) == len(rows) and m.group(2) == "0"
    if not rows:  # only the reference is compiled in: verify says so
        assert "no backend other than the reference" in r.stdout
    assert run("verify", "--backend", "tpu").returncode == 2
