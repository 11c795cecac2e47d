"""train_student: KD from a teacher-logit cache, its checks and fusion (kdkit.train)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_support import TEST, TRAIN, make_data, tiny, weights

from kdkit.data import ArrayDataset
from kdkit.train import train_student, train_teacher
from kdkit.train.logging import read_metrics

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_student_without_cache_is_the_ce_baseline(tmp_path):
    a = train_student(tiny(tmp_path, "s"), train_data=TRAIN, eval_data=TEST)
    b = train_teacher(tiny(tmp_path, "t"), train_data=TRAIN, eval_data=TEST)
    for k, v in weights(a.model).items():
        assert torch.equal(v, b.model.state_dict()[k])


def test_missing_cache_keys_fail_before_training(tmp_path, cache_dir):
    extra = make_data(5, seed=2, offset=5000)
    data = ArrayDataset(
        np.concatenate([TRAIN.features, extra.features]),
        TRAIN.labels + extra.labels,
        TRAIN.domains + extra.domains,
        TRAIN.paths + extra.paths,
    )
    config = tiny(tmp_path, cache=cache_dir, teacher=["a"])
    with pytest.raises(ValueError, match=r"lacks logits for 5 of the 53 .*'s5000'"):
        train_student(config, train_data=data)
    assert not (tmp_path / "run").exists()


def test_unknown_teacher_and_ambiguous_default(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=r"teacher\(s\) \['c'\] not in cache"):
        train_student(tiny(tmp_path, cache=cache_dir, teacher=["c"]), train_data=TRAIN)
    with pytest.raises(ValueError, match="choose with teacher"):
        train_student(tiny(tmp_path, cache=cache_dir), train_data=TRAIN)


def test_kd_stats_schedule_and_domain_mask(tmp_path, cache_dir):
    kd = {"kd_weighting": "none", "warmup_epochs": 0, "kd_ramp_epochs": 2}
    per_step = train_student(
        tiny(tmp_path, "step", cache=cache_dir, teacher=["a"], kd=kd, schedule_per_step=True),
        train_data=TRAIN,
    )
    steps = read_metrics(per_step.output_dir / "metrics.jsonl", "step")
    assert [round(r["kd_weight"], 6) for r in steps] == [
        round(0.7 * (i / 3) / 2, 6) for i in range(6)
    ]
    assert all(r["coverage"] == 1.0 for r in steps)
    per_epoch = train_student(
        tiny(tmp_path, "epoch", cache=cache_dir, teacher=["a"], kd=kd, kd_on="target"),
        train_data=TRAIN,
    )
    steps = read_metrics(per_epoch.output_dir / "metrics.jsonl", "step")
    assert [r["kd_weight"] for r in steps] == [0.0] * 3 + [0.35] * 3
    # KD only on domains 1 and 2: exactly two thirds of the samples over an epoch.
    epoch = read_metrics(per_epoch.output_dir / "metrics.jsonl", "epoch")[0]
    assert epoch["coverage"] == pytest.approx(2 / 3, abs=0.1)
    assert all(0.0 < r["coverage"] < 1.0 for r in steps)


def test_two_teacher_fusion_runs(tmp_path, cache_dir):
    result = train_student(
        tiny(tmp_path, cache=cache_dir, teacher=["a", "b"], fusion="mean"),
        train_data=TRAIN,
        eval_data=TEST,
    )
    assert result.teacher == ["a", "b"]
    assert json.loads((result.output_dir / "results.json").read_text())["teacher"] == ["a", "b"]


def test_labels_beyond_the_cache_classes_fail_early(tmp_path, cache_dir):
    data = ArrayDataset(TRAIN.features, [5, *TRAIN.labels[1:]], TRAIN.domains, TRAIN.paths)
    config = tiny(tmp_path, cache=cache_dir, teacher=["a"], num_classes=None)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\), got 0\.\.5"):
        train_student(config, train_data=data)
