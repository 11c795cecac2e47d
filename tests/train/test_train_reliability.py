"""No silent NaN in any training path; Ctrl-C; evaluation of damaged data (issue 11, item 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_support import TEST, TRAIN, make_data, tiny

from kdkit.data import ArrayDataset
from kdkit.train import evaluate, train_student, train_teacher
from kdkit.train.checkpoints import load_training_state
from kdkit.train.guards import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_nan(data: ArrayDataset, row: int) -> ArrayDataset:
    x = data.features.clone()
    x[row, 2] = float("nan")
    return ArrayDataset(x, data.labels, data.domains, data.paths)


@pytest.mark.parametrize("kind", ["teacher", "student-ce", "student-kd"])
def test_nan_input_stops_at_the_first_step_naming_the_sample(tmp_path, kind, cache_dir):
    """One NaN in a training sample: a one-line error naming epoch, step and path."""
    # The first epoch is clean; the NaN appears in the second, so a checkpoint exists.
    overrides = {"cache": cache_dir, "teacher": ["a"]} if kind == "student-kd" else {}
    run = train_teacher if kind == "teacher" else train_student
    config = tiny(tmp_path, stop_after_epoch=1, eval_split=None, **overrides)
    run(config, train_data=TRAIN)
    state = tmp_path / "run" / "checkpoints" / "last_state.pt"
    before = load_training_state(state)["model"]
    config = tiny(tmp_path, resume=True, eval_split=None, **overrides)
    with pytest.raises(NonFiniteError) as info:
        run(config, train_data=_with_nan(TRAIN, 7))
    message = str(info.value)
    assert "\n" not in message
    assert "epoch 2 step" in message and "'s7'" in message, message
    after = load_training_state(state)
    assert after["epoch"] == 0  # the last good checkpoint is intact
    assert all(torch.equal(before[k], v) for k, v in after["model"].items())
    assert all(torch.isfinite(v).all() for v in after["model"].values())


def test_divergence_stops_with_finite_inputs(tmp_path):
    with pytest.raises(NonFiniteError, match=r"epoch 1 step \d+: .*inputs are finite"):
        train_teacher(tiny(tmp_path, lr=1e30, eval_split=None), train_data=TRAIN)
    assert not (tmp_path / "run" / "checkpoints" / "last_state.pt").exists()


def test_one_transfer_per_cross_entropy_step(tmp_path, monkeypatch):
    """The finiteness check rides on the step's one device-to-host transfer."""
    from kdkit.train import epoch as epoch_mod

    calls = []
    for name in ("tolist", "item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = []
    step = epoch_mod._train_step

    def counted_step(*args, **kwargs):
        before = len(calls)
        result = step(*args, **kwargs)
        steps.append(len(calls) - before)
        return result

    monkeypatch.setattr(epoch_mod, "_train_step", counted_step)
    # SGD: Adam reads its CPU step counters with .item() (no device transfer, but counted).
    config = tiny(tmp_path, epochs=1, eval_split=None, optimizer="sgd")
    train_teacher(config, train_data=TRAIN)
    assert steps == [1, 1, 1], (steps, calls[:12])


def test_nan_in_evaluation_data_warns_and_marks_metrics_invalid():
    model = torch.nn.Linear(6, 3)
    with pytest.warns(RuntimeWarning, match=r"1 sample\(s\) give non-finite logits \('s1004'"):
        metrics = evaluate(model, _with_nan(TEST, 4))
    assert metrics["invalid_samples"] == 1
    assert np.isnan(metrics["acc"]) and np.isnan(metrics["loss"])
    clean = evaluate(model, make_data(24, seed=1, offset=1000))
    assert "invalid_samples" not in clean and np.isfinite(clean["acc"])


def test_kd_on_target_without_target_samples_warns_once(tmp_path, cache_dir):
    only_source = ArrayDataset(TRAIN.features, TRAIN.labels, [0] * len(TRAIN.labels), TRAIN.paths)
    config = tiny(
        tmp_path,
        cache=cache_dir,
        teacher=["a"],
        kd_on="target",
        source_domain=[0],
        eval_split=None,
        epochs=3,
        kd={"warmup_epochs": 0, "kd_ramp_epochs": 0},
    )
    with pytest.warns(
        RuntimeWarning, match=r"epoch 1: knowledge distillation applied to no sample"
    ) as record:
        train_student(config, train_data=only_source)
    assert len([w for w in record if "coverage 0" in str(w.message)]) == 1


def test_a_label_beyond_the_others_says_the_head_is_larger(tmp_path, caplog):
    labels = list(TRAIN.labels)
    labels[0] = 9  # classes 0..2 and 9: a head of 10 outputs
    data = ArrayDataset(TRAIN.features, labels, TRAIN.domains, TRAIN.paths)
    config = tiny(tmp_path, num_classes=None, eval_split=None, epochs=1)
    with caplog.at_level("WARNING", logger="kdkit.train"):
        result = train_teacher(config, train_data=data)
    assert "the model gets 10 outputs (largest train label 9 + 1) but 6 of those" in caplog.text
    assert result.model(TRAIN.features[:1]).shape == (1, 10)
