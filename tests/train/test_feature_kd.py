"""Feature distillation (kdkit.features) and --feature_kd in train_student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import TEST, TRAIN, tiny, weights

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest
from kdkit.errors import InputError
from kdkit.features import (
    FeatureDistiller,
    FeaturePair,
    feature_loss,
    make_projection,
    parse_feature_pair,
)
from kdkit.models import cnn, mlp
from kdkit.train import train_student
from kdkit.train.checkpoints import load_training_state
from kdkit.train.guards import NonFiniteError
from kdkit.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KD = {"kd_weighting": "none", "warmup_epochs": 0, "kd_ramp_epochs": 0}


def mlp_teacher() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


# --- the functions ------------------------------------------------------------------------


def test_projection_from_the_observed_shapes():
    assert isinstance(make_projection([8], [16]), torch.nn.Linear)
    conv1 = make_projection([4, 6], [8, 6])
    assert isinstance(conv1, torch.nn.Conv1d) and conv1.kernel_size == (1,)
    conv2 = make_projection([4, 5, 7], [2, 5, 7])
    assert isinstance(conv2, torch.nn.Conv2d) and conv2.out_channels == 2
    for s, t in (([4, 6], [16]), ([4, 6], [8, 5]), ([2, 3, 4, 5], [2, 3, 4, 5])):
        with pytest.raises(InputError, match=r"cannot map student features \["):
            make_projection(s, t)


def test_feature_losses_match_their_formulas():
    s, t = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    torch.testing.assert_close(feature_loss(s, t, "mse"), ((s - t) ** 2).mean())
    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    torch.testing.assert_close(feature_loss(s, t, "cosine"), (1 - cos).mean())
    assert feature_loss(s, 3 * s, "cosine").abs() < 1e-6
    with pytest.raises(ValueError, match="must have the same shape"):
        feature_loss(s, t[:, :2])


def test_parse_pairs():
    assert parse_feature_pair("1:2") == FeaturePair("1", "2", 1.0)
    assert parse_feature_pair("a.b:t/c.d:0.25") == FeaturePair("a.b", "t/c.d", 0.25)
    for bad in ("1", "1:2:x", ":2", "1:2:-1"):
        with pytest.raises(ValueError, match="feature_kd"):
            parse_feature_pair(bad)


def test_distiller_in_ones_own_loop_trains_projection_and_student_only():
    torch.manual_seed(0)
    student, teacher = mlp((6,), 3, hidden=(8,)), mlp_teacher()
    distiller = FeatureDistiller(["1:0:0.5"], loss="mse").setup(student, teacher, torch.zeros(2, 6))
    x = torch.randn(5, 6)
    with distiller.capture():
        student(x)
        with torch.no_grad():
            t_feat = teacher[0](x)
            teacher(x)
        loss, stats = distiller.loss()
    s_feat = student[1](x)
    expected = 0.5 * F.mse_loss(distiller.projections["0"](s_feat), t_feat).detach()
    torch.testing.assert_close(loss, expected)
    assert stats == {
        "feature_loss/1": pytest.approx(2 * float(expected)),
        "feature_loss": float(expected),
    }
    loss.backward()
    assert distiller.projections["0"].weight.grad is not None
    assert student[1].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    student(x)  # outside capture(): nothing is kept
    assert not distiller._captured


def test_unknown_module_lists_close_names():
    student, teacher = mlp((6,), 3, hidden=(8,)), mlp_teacher()
    with pytest.raises(InputError, match=r"the student has no module '11'; close names: \['1'"):
        FeatureDistiller(["11:0"]).setup(student, teacher, torch.zeros(2, 6))
    with pytest.raises(InputError, match=r"teacher 'teacher' has no module 'x'"):
        FeatureDistiller(["1:x"]).setup(student, teacher, torch.zeros(2, 6))


# --- in training --------------------------------------------------------------------------


def test_feature_kd_adds_a_logged_loss(tmp_path):
    result = train_student(
        tiny(tmp_path, kd=KD, feature_kd=["1:0:0.5"], feature_kd_loss="cosine"),
        train_data=TRAIN,
        eval_data=TEST,
        teachers={"t": mlp_teacher()},
    )
    steps = read_metrics(result.output_dir / "metrics.jsonl", "step")
    for r in steps:
        assert r["feature_loss"] == pytest.approx(0.5 * r["feature_loss/1"])
        assert r["total_loss"] > r["feature_loss"] > 0
    epoch = result.history[-1]
    assert epoch["feature_loss"] > 0 and "feature_loss/1" in epoch
    assert steps[-1]["feature_loss"] < steps[0]["feature_loss"]  # it is learned
    state = load_training_state(result.output_dir / "checkpoints" / "last_state.pt")
    assert sorted(state["feature_kd"]) == ["projections.0.bias", "projections.0.weight"]
    assert state["feature_kd"]["projections.0.weight"].shape == (16, 8)


def test_non_finite_projection_gradient_stops_the_first_step(tmp_path, monkeypatch):
    """The finiteness guard covers what the optimiser steps: the student and the
    projections (a NaN only in a projection's gradient stops step 1, not step 2)."""
    import kdkit.features as features

    def nan_grad_projection(student_shape, teacher_shape):
        projection = make_projection(student_shape, teacher_shape)
        projection.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        return projection

    monkeypatch.setattr(features, "make_projection", nan_grad_projection)
    with pytest.raises(NonFiniteError, match=r"epoch 1 step 1: non-finite loss or gradient"):
        train_student(
            tiny(tmp_path, kd=KD, feature_kd=["1:0:0.5"]),
            train_data=TRAIN,
            teachers={"t": mlp_teacher()},
        )


def test_zero_weight_leaves_the_student_as_without_feature_kd(tmp_path):
    plain = train_student(
        tiny(tmp_path, "p", kd=KD), train_data=TRAIN, teachers={"t": mlp_teacher()}
    )
    zero = train_student(
        tiny(tmp_path, "z", kd=KD, feature_kd=["1:0:0"]),
        train_data=TRAIN,
        teachers={"t": mlp_teacher()},
    )
    wp, wz = weights(plain.model), weights(zero.model)
    assert all(torch.equal(wp[k], wz[k]) for k in wp)  # projections use their own RNG


def test_feature_kd_conv_projection_resumes_bit_for_bit(tmp_path):
    def student():
        torch.manual_seed(0)
        return cnn((6,), 3, channels=(4,))

    def teacher():
        torch.manual_seed(1)
        return cnn((6,), 3, channels=(8,))

    extra = {"kd": KD, "feature_kd": ["1:1"], "augment": ["noise"], "epochs": 3}
    full = train_student(
        tiny(tmp_path, "full", **extra),
        model=student(),
        train_data=TRAIN,
        teachers={"t": teacher()},
    )
    train_student(
        tiny(tmp_path, "part", stop_after_epoch=1, **extra),
        model=student(),
        train_data=TRAIN,
        teachers={"t": teacher()},
    )
    resumed = train_student(
        tiny(tmp_path, "part", resume=True, **extra),
        model=student(),
        train_data=TRAIN,
        teachers={"t": teacher()},
    )
    assert resumed.history == full.history
    wf, wr = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    sf = load_training_state(full.output_dir / "checkpoints" / "last_state.pt")["feature_kd"]
    sr = load_training_state(resumed.output_dir / "checkpoints" / "last_state.pt")["feature_kd"]
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert sf["projections.0.weight"].shape == (8, 4, 1)


def test_feature_kd_bad_input(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="feature_kd needs a live teacher"):
        train_student(
            tiny(tmp_path, cache=cache_dir, teacher=["a"], feature_kd=["1:0"]), train_data=TRAIN
        )
    with pytest.raises(InputError, match=r"feature_kd 1:0: cannot map student features \[8\]"):
        train_student(
            tiny(tmp_path, feature_kd=["1:0"]),
            train_data=TRAIN,
            teachers={"t": cnn((6,), 3, channels=(4,))},
        )
    with pytest.raises(InputError, match="name the module as TEACHER/MODULE"):
        train_student(
            tiny(tmp_path, feature_kd=["1:0"]),
            train_data=TRAIN,
            teachers={"t": mlp_teacher(), "u": mlp_teacher()},
        )
    ok = train_student(
        tiny(tmp_path, "two", feature_kd=["1:u/0"], epochs=1),
        train_data=TRAIN,
        teachers={"t": mlp_teacher(), "u": mlp_teacher()},
    )
    assert ok.teacher == ["t", "u"]


def test_cli_unknown_module_exits_2(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    records = []
    for i in range(16):
        np.save(tmp_path / "x" / f"{i}.npy", np.full(6, i % 2, dtype=np.float32))
        records.append(ManifestRecord(f"x/{i}.npy", i % 2, 0, "train"))
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    base = ["--manifest", str(manifest), "--eval_split", "train", "--epochs", "1", "--no-progress"]
    assert main(["train-teacher", *base, "--output_dir", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    argv = ["train-student", *base, "--output_dir", str(tmp_path / "s")]
    argv += ["--teacher_model", f"t={tmp_path / 't'}", "--feature_kd", "1:lin"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher 't' has no module 'lin'" in err
    argv[-1] = "1:1"
    assert main([*argv, "--feature_kd", "3:2:0.1"]) == 0


# --- under torchrun: 2 gloo ranks x batch 4 = 1 process x batch 8 ----------------------

DDP_TIMEOUT = 120.0


def _ddp_config(out, name: str, batch_size: int):
    return tiny(
        out,
        name,
        kd=KD,
        feature_kd=["1:0:0.5"],
        optimizer="sgd",
        momentum=0.0,
        lr=0.5,
        lr_schedule="constant",
        model_kwargs={"hidden": [8], "dropout": 0.0},
        epochs=1,
        batch_size=batch_size,
    )


def _ddp_worker(rank: int, store: str, out: str) -> None:
    import os
    from pathlib import Path

    import torch.distributed as dist
    from train_support import make_data

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        result = train_student(
            _ddp_config(Path(out), "ddp", 4),
            train_data=make_data(8),
            teachers={"t": mlp_teacher()},
        )
        torch.save(weights(result.model), f"{out}/weights.{rank}")
    finally:
        dist.destroy_process_group()


def test_feature_kd_under_torchrun_equals_one_process(tmp_path):
    """One step: the student and the projections after 2 ranks x 4 samples equal those
    after 1 process x 8 (the projections' gradients are averaged with the student's in
    DDP's all-reduce; rank 0 saves them, without DDP's ``module.`` prefix)."""
    import time

    import torch.multiprocessing as mp
    from train_support import make_data

    context = mp.start_processes(
        _ddp_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DDP_TIMEOUT
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP workers did not finish within {DDP_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
    one = train_student(
        _ddp_config(tmp_path, "one", 8), train_data=make_data(8), teachers={"t": mlp_teacher()}
    )
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"weights.{rank}", weights_only=True)
        for k, v in weights(one.model).items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
    state = "checkpoints/last_state.pt"
    single = load_training_state(one.output_dir / state)["feature_kd"]
    ranked = load_training_state(tmp_path / "ddp" / state)["feature_kd"]
    assert sorted(ranked) == ["projections.0.bias", "projections.0.weight"]
    for k, v in single.items():
        torch.testing.assert_close(ranked[k], v, rtol=1e-5, atol=1e-6, msg=k)
