"""The README's C and Python examples compile and run, so they cannot rot."""

import os
import re
import shutil
import subprocess


import gqmm

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def readme_block(lang):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"^```" + lang + r"\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one {lang} block in README.md, found {len(blocks)}"
    return blocks[0]


def test_readme_c_example_compiles_and_runs(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler found"
    src = tmp_path / "readme_example.c"
    src.write_text(readme_block("c"))
    lib_dir = os.path.dirname(os.path.abspath(gqmm.lib_path()))
    exe = tmp_path / "readme_example"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "include"),
                    str(src), "-L", lib_dir, "-lgqmm", f"-Wl,-rpath,{lib_dir}", "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    assert re.match(r"y\[0\]\[0\] = -?\d+\.\d{4} on backend \S+", out), out


def test_readme_python_example_runs():
    exec(compile(readme_block("python"), "README.md", "exec"), {"__name__": "readme"})
