"""train_teacher: outputs, evaluation, determinism (kdkit.train.loop)."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import TEST, TRAIN, tiny, weights

from kdkit.train import evaluate, load_model_from_run, train_teacher
from kdkit.train.checkpoints import load_training_state
from kdkit.train.logging import read_metrics

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_teacher_run_writes_config_metrics_and_checkpoints(tmp_path):
    result = train_teacher(tiny(tmp_path), train_data=TRAIN, eval_data=TEST)
    out = result.output_dir
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    steps = read_metrics(out / "metrics.jsonl", "step")
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert len(steps) == 2 * 3 and len(epochs) == 2
    assert {"eval/acc/domain_0", "eval/acc/domain_2", "eval/source_acc", "eval/target_acc"} <= set(
        epochs[-1]
    )
    for name in ("best.safetensors", "best.json", "last.safetensors", "last_state.pt"):
        assert (out / "checkpoints" / name).is_file()
    rows = (out / "epochs.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,global_step,lr,total_loss")
    results = json.loads((out / "results.json").read_text())
    assert results["completed"] and results["epochs_run"] == 2
    # The last checkpoint rebuilds the trained model from its recorded factory.
    reloaded = load_model_from_run(out, which="last")
    for k, v in weights(result.model).items():
        assert torch.equal(reloaded.state_dict()[k], v)
    # The training state is loadable with weights_only=True (no arbitrary unpickling).
    state = load_training_state(out / "checkpoints" / "last_state.pt")
    assert state["epoch"] == 1 and "loader" in state["rng"]


def test_evaluate_per_domain():
    model = torch.nn.Linear(6, 3)
    metrics = evaluate(model, TEST, source_domain=[0, 1])
    per_domain = [metrics[f"acc/domain_{d}"] for d in range(3)]
    assert metrics["target_acc"] == per_domain[2]
    assert metrics["acc"] == pytest.approx(sum(per_domain) / 3)  # equal domain sizes


def test_deterministic_under_seed(tmp_path):
    a = train_teacher(tiny(tmp_path, "a", seed=3), train_data=TRAIN)
    b = train_teacher(tiny(tmp_path, "b", seed=3), train_data=TRAIN)
    c = train_teacher(tiny(tmp_path, "c", seed=4), train_data=TRAIN)
    wa, wb, wc = weights(a.model), weights(b.model), weights(c.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
