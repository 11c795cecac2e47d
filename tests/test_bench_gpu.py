"""``make bench-gpu`` (benchmarks/bench_gpu.py) cannot rot: its whole code path runs here
on the CPU at tiny sizes (``--smoke``, the Triton kernel under ``TRITON_INTERPRET=1``),
every section, and a failed correctness check gives exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("KDKIT_KERNEL", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_smoke_runs_every_section():
    out = _run([sys.executable, str(SCRIPT), "--smoke"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for heading in ("## 1. correctness", "## 2. row kernel", "## 3. linear path", "## 4. training"):
        assert heading in text
    assert "correctness passed" in text
    for row in ("| naive |", "| ce |", "kdkit linear_kd_loss", "kdkit DistillationTrainer"):
        assert row in text
    assert "row_pass torch jsd" in text and "linear_kd_loss top-k jsd bucket" in text
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    assert "row_pass triton reverse_kl" in text and "kdkit-triton jsd" in text


def test_a_failed_check_fails_the_run():
    code = (
        f"import sys; sys.argv = ['bench_gpu', '--smoke']; sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import bench_gpu\n"
        "bench_gpu.TOLERANCE = {k: (0.0, 0.0) for k in bench_gpu.TOLERANCE}\n"
        "sys.exit(bench_gpu.main(['--smoke', '--sections', 'check']))\n"
    )
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "correctness FAILED" in out.stdout and "| NO |" in out.stdout


def test_without_cuda_and_without_smoke_it_says_so():
    import torch

    if torch.cuda.is_available():
        return
    out = _run([sys.executable, str(SCRIPT), "--sections", "check"])
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr
