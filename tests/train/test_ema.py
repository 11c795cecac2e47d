"""The EMA of the student's weights (ema_decay, best_on; kdkit.train.ema)."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import TEST, TRAIN, tiny, weights

from kdkit.train import load_model_from_run, train_student
from kdkit.train.checkpoints import load_training_state, load_weights, save_training_state
from kdkit.train.ema import ModelEMA
from kdkit.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_update_is_the_exponential_average_of_every_float_entry():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = ModelEMA(model, decay=0.75)
    history = [weights(model)]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves the BatchNorm statistics
        ema.update()
        history.append(weights(model))
    for key, value in ema.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, history[-1][key])  # num_batches_tracked: copied
            continue
        expected = history[0][key].double()
        for step in history[1:]:
            expected = 0.75 * expected + 0.25 * step[key].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_ema_is_evaluated_checkpointed_and_chosen_for_best(tmp_path):
    config = tiny(tmp_path, epochs=3, ema_decay=0.5, best_on="ema")
    result = train_student(config, train_data=TRAIN, eval_data=TEST)
    epochs = read_metrics(result.output_dir / "metrics.jsonl", "epoch")
    assert all("eval_ema/acc" in r and "eval/acc" in r for r in epochs)
    best = max(range(3), key=lambda e: (epochs[e]["eval_ema/acc"], -e))
    assert result.best_epoch == best
    ckpt = result.output_dir / "checkpoints"
    meta = json.loads((ckpt / "best.json").read_text())
    assert meta["weights"] == "ema" and meta["metrics"]["acc"] == epochs[best]["eval_ema/acc"]
    state = load_training_state(ckpt / "last_state.pt")
    last_ema = load_weights(
        load_model_from_run(result.output_dir, "last"), ckpt / "last_ema.safetensors"
    )
    for key, value in state["ema"].items():
        assert torch.equal(value, last_ema.state_dict()[key])
    # The EMA differs from the raw weights it averages.
    raw = weights(result.model)
    assert any(not torch.equal(raw[k], v) for k, v in state["ema"].items())
    assert "eval_ema/acc" in (result.output_dir / "epochs.csv").read_text().splitlines()[0]


def test_best_on_raw_keeps_raw_weights(tmp_path):
    result = train_student(
        tiny(tmp_path, epochs=2, ema_decay=0.9), train_data=TRAIN, eval_data=TEST
    )
    meta = json.loads((result.output_dir / "checkpoints" / "best.json").read_text())
    assert meta["weights"] == "raw"
    epochs = read_metrics(result.output_dir / "metrics.jsonl", "epoch")
    assert meta["metrics"]["acc"] == epochs[result.best_epoch]["eval/acc"]


def test_ema_off_writes_no_ema_files(tmp_path):
    result = train_student(tiny(tmp_path, epochs=1), train_data=TRAIN, eval_data=TEST)
    ckpt = result.output_dir / "checkpoints"
    assert not (ckpt / "last_ema.safetensors").exists()
    assert "ema" not in load_training_state(ckpt / "last_state.pt")


def test_resume_may_not_add_an_ema(tmp_path):
    train_student(tiny(tmp_path, epochs=2, stop_after_epoch=1), train_data=TRAIN)
    with pytest.raises(ValueError, match=r"cannot resume .*ema_decay None -> 0.999"):
        train_student(tiny(tmp_path, epochs=2, resume=True, ema_decay=0.999), train_data=TRAIN)


def test_resume_of_a_checkpoint_from_before_the_ema_starts_it_from_the_resumed_weights(
    tmp_path,
):
    first = train_student(tiny(tmp_path, epochs=2, stop_after_epoch=1), train_data=TRAIN)
    resumed_from = weights(first.model)
    path = tmp_path / "run" / "checkpoints" / "last_state.pt"
    state = load_training_state(path)
    meta = json.loads(state["meta"])
    del meta["config"]["ema_decay"]  # as written before ema_decay existed
    state["meta"] = json.dumps(meta)
    save_training_state(path.parent, "last", state)
    result = train_student(tiny(tmp_path, epochs=2, resume=True, ema_decay=0.999), train_data=TRAIN)
    assert result.completed
    ema = load_training_state(path)["ema"]
    raw = weights(result.model)
    for key, value in ema.items():  # 3 steps at decay 0.999: still next to the start
        step = raw[key] - resumed_from[key]
        torch.testing.assert_close(
            value,
            resumed_from[key] + 0.001 * step,
            atol=2e-3 * step.abs().max().item() + 1e-7,
            rtol=0,
        )
