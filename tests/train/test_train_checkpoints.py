"""Checkpoints and resume: save/load round trips, bit-for-bit resume (kdkit.train.checkpoints)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import TEST, TRAIN, tiny, weights

from kdkit.train import load_model_from_run, train_student, train_teacher
from kdkit.train.checkpoints import (
    capture_rng_state,
    load_training_state,
    load_weights,
    restore_rng_state,
    save_training_state,
    save_weights,
)
from kdkit.train.logging import read_metrics

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kd", [False, True])
def test_resume_is_bit_for_bit(tmp_path, request, kd):
    extra = {}
    if kd:
        extra = {
            "cache": request.getfixturevalue("cache_dir"),
            "teacher": ["a", "b"],
            "schedule_per_step": True,
            "kd": {"warmup_epochs": 1, "kd_ramp_epochs": 2},
        }
    run = train_student if kd else train_teacher
    full = run(tiny(tmp_path, "full", epochs=4, **extra), train_data=TRAIN, eval_data=TEST)
    first = run(
        tiny(tmp_path, "part", epochs=4, stop_after_epoch=2, **extra),
        train_data=TRAIN,
        eval_data=TEST,
    )
    assert not first.completed and len(first.history) == 2
    resumed = run(
        tiny(tmp_path, "part", epochs=4, resume=True, **extra), train_data=TRAIN, eval_data=TEST
    )
    assert resumed.completed
    wf, wr = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed.history == full.history
    strip = [{k: v for k, v in r.items()} for r in read_metrics(full.output_dir / "metrics.jsonl")]
    assert read_metrics(resumed.output_dir / "metrics.jsonl") == strip


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train_teacher(tiny(tmp_path, resume=True), train_data=TRAIN)


def test_resume_with_changed_settings_is_refused(tmp_path):
    # Issue 11: a changed lr used to warn and then train on with the old schedule.
    train_teacher(tiny(tmp_path, epochs=3, stop_after_epoch=1), train_data=TRAIN)
    with pytest.raises(ValueError, match=r"setting\(s\) differ .*: lr 0.01 -> 0.5"):
        train_teacher(tiny(tmp_path, epochs=3, lr=0.5, resume=True), train_data=TRAIN)


# --- the public functions of kdkit.train.checkpoints -----------------------------------


def test_weights_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    path = save_weights(model, tmp_path / "ckpt", "best", {"epoch": 3, "metrics": {"acc": 0.5}})
    assert path == tmp_path / "ckpt" / "best.safetensors"
    assert json.loads((tmp_path / "ckpt" / "best.json").read_text()) == {
        "epoch": 3,
        "metrics": {"acc": 0.5},
    }
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "best.json",
        "best.safetensors",
    ]
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert load_weights(other, path) is other
    wa, wb = weights(model), weights(other)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_weights(torch.nn.Linear(4, 2), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(other, tmp_path / "nope.safetensors")


def test_training_state_round_trip_is_tensor_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {
        "epoch": 4,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "meta": json.dumps({"history": [1, 2]}),
    }
    path = save_training_state(tmp_path, "last", state)
    assert path == tmp_path / "last_state.pt"
    loaded = load_training_state(path)
    assert loaded["epoch"] == 4 and json.loads(loaded["meta"]) == {"history": [1, 2]}
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"]
    )
    # weights_only=True: an arbitrary Python object is refused.
    torch.save({"object": Path("x")}, tmp_path / "evil_state.pt")
    # (One line of kdkit's own: torch's message would suggest weights_only=False.)
    with pytest.raises(ValueError, match=r"damaged or not a kdkit training state") as info:
        load_training_state(tmp_path / "evil_state.pt")
    assert "weights_only" not in str(info.value)


def test_rng_state_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state(generator)
    save_training_state(tmp_path, "rng", {"rng": state})
    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(1),
        torch.rand(1, generator=generator),
    )
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    restore_rng_state(load_training_state(tmp_path / "rng_state.pt")["rng"], generator)
    again = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    assert expected[:2] == again[:2]
    assert torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


def test_load_model_from_run_needs_a_recorded_factory(tmp_path):
    model = torch.nn.Linear(6, 3)
    save_weights(model, tmp_path / "run" / "checkpoints", "best", {"model": None})
    with pytest.raises(ValueError, match="records no model factory"):
        load_model_from_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no 'last' checkpoint"):
        load_model_from_run(tmp_path / "run", which="last")
