"""On-policy DistillationTrainer under torchrun (2 CPU processes, gloo).

The torchrun process group (agent and workers) is killed on a timeout; nothing is left
behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchrun_testing import run_torchrun

pytest.importorskip("transformers")

from test_hf_on_policy import _run, _trainer

from kdkit.hf import OnPolicyConfig
from kdkit.hf.on_policy import on_policy_draw
from kdkit.losses.kd import KDLossConfig

HERE = Path(__file__).resolve().parent


def test_two_ranks_draw_alike_and_give_the_global_batch_gradient(tmp_path, one_torch_thread):
    result = run_torchrun([str(HERE / "hf_on_policy_worker.py"), str(tmp_path)], 300.0)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    want = ["student" if on_policy_draw(0, s, 0.5) else "data" for s in range(6)]
    assert rank0["sources"] == rank1["sources"] == want and len(set(want)) == 2
    # One process, one micro-batch of the 8 prompts: the same generated tokens (greedy),
    # hence the same step normalised by the generated tokens of both ranks.
    config = KDLossConfig(temperature=2.0, kd_alpha=0.5, loss_type="jsd")
    policy = OnPolicyConfig(1.0, max_new_tokens=4, top_p=1e-6)
    reference = _run(_trainer(tmp_path / "one", 8, 1, policy, config))[2]
    for got, expected in zip(rank0["grads"], reference):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
