"""Gradient clipping (clip_grad_norm) and LR warmup (lr_warmup_epochs, kdkit.train.warmup);
resume with every issue-17 option on is bit-for-bit."""

from __future__ import annotations

import math

import pytest
import torch
from train_support import TEST, TRAIN, tiny, weights

from kdkit.train import train_student
from kdkit.train.logging import read_metrics
from kdkit.train.warmup import scaled_lr, warmup_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SGD = {"optimizer": "sgd", "momentum": 0.0, "model_kwargs": {"hidden": [8], "dropout": 0.0}}


def test_clipping_bounds_the_update_and_logs_the_norm(tmp_path):
    lr, clip = 0.5, 1e-3
    config = tiny(tmp_path, epochs=1, batch_size=48, lr=lr, clip_grad_norm=clip, **SGD)
    torch.manual_seed(0)
    from kdkit.models import mlp

    start = mlp((6,), 3, hidden=[8], dropout=0.0)
    before = weights(start)
    result = train_student(config, model=start, train_data=TRAIN)
    delta = torch.cat([(result.model.state_dict()[k] - v).flatten() for k, v in before.items()])
    assert delta.norm().item() == pytest.approx(lr * clip, rel=1e-3)
    (step,) = read_metrics(result.output_dir / "metrics.jsonl", "step")
    assert step["grad_norm"] > clip  # the norm before clipping


def test_clipping_above_the_norm_changes_nothing(tmp_path):
    plain = train_student(tiny(tmp_path, "plain", **SGD), train_data=TRAIN)
    clipped = train_student(tiny(tmp_path, "clip", clip_grad_norm=1e6, **SGD), train_data=TRAIN)
    wp = weights(plain.model)
    assert all(torch.equal(v, clipped.model.state_dict()[k]) for k, v in wp.items())


def test_warmup_factor_formula():
    assert warmup_factor(0, 0, 10, 0.0) == 1.0
    assert [warmup_factor(0, s, 2, 1.5) for s in range(2)] == [1 / 3, 2 / 3]
    assert warmup_factor(1, 0, 2, 1.5) == 1.0
    assert warmup_factor(0, 0, 4, 0.1) == 1.0  # shorter than one step: no warmup


def test_scaled_lr_restores_the_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    with scaled_lr(opt, 0.5):
        assert opt.param_groups[0]["lr"] == 0.15
    assert opt.param_groups[0]["lr"] == 0.3


def test_warmup_composes_with_the_cosine_schedule(tmp_path):
    config = tiny(tmp_path, epochs=3, lr=0.1, lr_warmup_epochs=1.5, lr_schedule="cosine")
    result = train_student(config, train_data=TRAIN)  # 48 / 16: 3 steps per epoch
    steps = read_metrics(result.output_dir / "metrics.jsonl", "step")
    expected = [
        0.1 * (1 + math.cos(math.pi * e / 3)) / 2 * min(1.0, (3 * e + s + 1) / 4.5)
        for e in range(3)
        for s in range(3)
    ]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kd", [False, True])
def test_resume_with_every_option_is_bit_for_bit(tmp_path, request, kd):
    extra = {
        "grad_accum": 2,
        "clip_grad_norm": 0.5,
        "lr_warmup_epochs": 2.5,  # the resume after epoch 2 lands inside the warmup
        "ema_decay": 0.9,
        "best_on": "ema",
        "precision": "bf16",
        "batch_size": 8,
        "epochs": 4,
    }
    if kd:
        extra.update(cache=request.getfixturevalue("cache_dir"), teacher=["a"], kd_on="target")
        extra["kd"] = {"warmup_epochs": 1, "kd_ramp_epochs": 1}
    full = train_student(tiny(tmp_path, "full", **extra), train_data=TRAIN, eval_data=TEST)
    train_student(
        tiny(tmp_path, "part", stop_after_epoch=2, **extra), train_data=TRAIN, eval_data=TEST
    )
    resumed = train_student(
        tiny(tmp_path, "part", resume=True, **extra), train_data=TRAIN, eval_data=TEST
    )
    wf, wr = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed.history == full.history
    assert resumed.best_epoch == full.best_epoch
    for name in ("last_ema", "best"):
        a = (full.output_dir / "checkpoints" / f"{name}.safetensors").read_bytes()
        b = (resumed.output_dir / "checkpoints" / f"{name}.safetensors").read_bytes()
        assert a == b, name


def test_warmup_composes_with_the_step_schedule(tmp_path):
    config = tiny(
        tmp_path,
        epochs=4,
        lr=0.1,
        lr_warmup_epochs=2,
        lr_schedule="step",
        lr_step_epochs=1,
        lr_gamma=0.5,
    )
    result = train_student(config, train_data=TRAIN)  # 3 steps per epoch
    steps = read_metrics(result.output_dir / "metrics.jsonl", "step")
    expected = [0.1 * 0.5**e * min(1.0, (3 * e + s + 1) / 6) for e in range(4) for s in range(3)]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12)
