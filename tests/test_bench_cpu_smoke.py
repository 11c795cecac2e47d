"""The #24 CPU benchmarks that reach into kdkit's internals (the pre-#24 sparse row pass
restored by monkeypatching, a second native build swapped in) still run: tiny sizes,
their own value checks printed and read back here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KDKIT_KERNEL", None)
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_bench_sparse_pass_quick_agrees():
    text = _run("benchmarks/bench_sparse_pass.py", "--quick", "--losses", "jsd")
    diffs = [float(m) for m in re.findall(r"\| ([0-9.]+e[-+][0-9]+) \|$", text, re.M)]
    assert len(diffs) == 4 and max(diffs) < 1e-5  # every variant against the closed form


def test_bench_native_ab_runs_against_itself():
    from kdkit.losses.kernels import native

    if native._compiler() is None:
        pytest.skip("no C compiler")
    source = ROOT / "src" / "kdkit" / "losses" / "kernels" / "native.c"
    text = _run(
        "benchmarks/bench_native_ab.py", "--baseline", str(source), "--size", "8x50",
        "--dtypes", "float32", "--reps", "1",
    )  # fmt: skip
    assert "| baseline |" in text and "losses: 0.0e+00" in text
