"""DistillationTrainer under torchrun (2 CPU processes, gloo) = one process on the global batch.

The torchrun process group (agent and workers) is killed on a timeout; nothing is left
behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from torchrun_testing import run_torchrun

pytest.importorskip("transformers")

from hf_testing import reference_grads

from kdkit.losses.kd import KDLossConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT = 240.0


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return run_torchrun([str(HERE / "hf_ddp_worker.py"), *args], TIMEOUT)


def test_ddp_two_ranks_give_the_global_batch_gradient(tmp_path):
    # pmax weighting: the KD normaliser (the confidence-weight sum) differs per rank.
    result = _torchrun(str(tmp_path), "pmax")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "rank0.pt")
    reference = reference_grads(KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting="pmax"))
    for got, want in zip(saved["grads"], reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    (log,) = saved["logs"]
    assert log["coverage"] == pytest.approx(1.0) and log["kd_weight"] == pytest.approx(0.6)
    assert log["loss"] == pytest.approx(0.4 * log["ce_loss"] + 0.6 * log["kd_loss"], rel=1e-5)


def test_fsdp_smoke_on_cpu(tmp_path):
    """FSDP (through accelerate) on CPU: runs, and the step's loss and gradient norm are
    those of the global batch (the sharded gradients themselves are not compared)."""
    result = _torchrun(str(tmp_path), "none", "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    (log,) = torch.load(tmp_path / "rank0.pt")["logs"]
    reference = reference_grads(KDLossConfig(temperature=2.0, kd_alpha=0.6))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in reference])).item()
    assert log["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert log["loss"] == pytest.approx(0.4 * log["ce_loss"] + 0.6 * log["kd_loss"], rel=1e-5)
