"""Live teachers in train_student (kdkit.train.teachers): equal to cached, mixed, never updated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_support import TEST, TRAIN, tiny, weights

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest
from kdkit.errors import InputError
from kdkit.train import train_student, train_teacher
from kdkit.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KD = {"kd_weighting": "none", "warmup_epochs": 0, "kd_ramp_epochs": 0}
LOSSES = ("total_loss", "ce_loss", "kd_loss", "coverage", "avg_confidence")


def cache_teachers() -> dict[str, torch.nn.Module]:
    """The modules whose logits the ``cache_dir`` fixture holds (same seed, same order)."""
    torch.manual_seed(0)
    return {"a": torch.nn.Linear(6, 3), "b": torch.nn.Linear(6, 3)}


def step_losses(result) -> list[list[float]]:
    steps = read_metrics(result.output_dir / "metrics.jsonl", "step")
    return [[r[k] for k in LOSSES] for r in steps]


def test_live_teacher_gives_the_losses_of_the_cached_one(tmp_path, cache_dir):
    cached = train_student(
        tiny(tmp_path, "cached", cache=cache_dir, teacher=["a"], kd=KD), train_data=TRAIN
    )
    live = train_student(
        tiny(tmp_path, "live", kd=KD), train_data=TRAIN, teachers={"a": cache_teachers()["a"]}
    )
    assert live.teacher == ["a"]
    np.testing.assert_allclose(step_losses(live), step_losses(cached), rtol=1e-5, atol=1e-6)
    wc, wl = weights(cached.model), weights(live.model)
    assert all(torch.allclose(wc[k], wl[k], atol=1e-5) for k in wc)


@pytest.mark.parametrize("fusion", ["mean", "prob_mean", "weighted_mean"])
def test_cached_and_live_teachers_mix(tmp_path, cache_dir, fusion):
    extra = {"fusion_weights": [0.25, 0.75]} if fusion == "weighted_mean" else {}
    config = {"kd": KD, "fusion": fusion, **extra}
    both_cached = train_student(
        tiny(tmp_path, "cached", cache=cache_dir, teacher=["a", "b"], **config), train_data=TRAIN
    )
    mixed = train_student(  # "a" from the cache, "b" live: fused in the order a, b
        tiny(tmp_path, "mixed", cache=cache_dir, teacher=["a"], **config),
        train_data=TRAIN,
        teachers={"b": cache_teachers()["b"]},
    )
    assert mixed.teacher == ["a", "b"]
    np.testing.assert_allclose(step_losses(mixed), step_losses(both_cached), rtol=1e-5, atol=1e-6)


def test_teacher_in_train_mode_with_grads_is_never_updated(tmp_path):
    torch.manual_seed(3)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(16, 3),
    )
    teacher.train()
    assert all(p.requires_grad for p in teacher.parameters())
    before = weights(teacher)
    result = train_student(
        tiny(tmp_path, kd=KD, augment=["mixup", "noise"], feature_kd=["1:1"]),
        train_data=TRAIN,
        eval_data=TEST,
        teachers={"t": teacher},
    )
    after = weights(teacher)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers too
    assert all(p.grad is None for p in teacher.parameters())
    assert result.history[-1]["kd_loss"] > 0


def test_live_teacher_from_a_run_directory_and_a_weights_file(tmp_path):
    trained = train_teacher(tiny(tmp_path, "teacher", epochs=1), train_data=TRAIN)
    run_dir = str(trained.output_dir)
    from_run = train_student(
        tiny(
            tmp_path, "from-run", kd=KD, teacher_model=[f"t={run_dir}"], teacher_checkpoint="last"
        ),
        train_data=TRAIN,
    )
    assert from_run.teacher == ["t"]
    assert json.loads((from_run.output_dir / "results.json").read_text())["teacher"] == ["t"]
    from_file = train_student(
        tiny(
            tmp_path,
            "from-file",
            kd=KD,
            teacher_model=[f"t={run_dir}/checkpoints/last.safetensors"],
            teacher_factory="kdkit.models:mlp",
            teacher_factory_kwargs={"hidden": [8], "dropout": 0.2},
        ),
        train_data=TRAIN,
    )
    assert step_losses(from_file) == step_losses(from_run)
    with pytest.raises(ValueError, match="a weights file needs teacher_factory"):
        train_student(
            tiny(tmp_path, "x", teacher_model=[f"t={run_dir}/checkpoints/last.safetensors"]),
            train_data=TRAIN,
        )


def test_live_teacher_with_other_classes_names_both(tmp_path, cache_dir):
    with pytest.raises(
        InputError, match=r"live teacher 'big' outputs 5-class logits but the student has 3"
    ):
        train_student(tiny(tmp_path), train_data=TRAIN, teachers={"big": torch.nn.Linear(6, 5)})
    with pytest.raises(
        InputError, match=r"'big' outputs 5-class .* the cache and the student have 3"
    ):
        train_student(
            tiny(tmp_path, cache=cache_dir, teacher=["a"]),
            train_data=TRAIN,
            teachers={"big": torch.nn.Linear(6, 5)},
        )
    with pytest.raises(ValueError, match="given twice"):
        train_student(
            tiny(tmp_path, cache=cache_dir, teacher=["a"]),
            train_data=TRAIN,
            teachers={"a": torch.nn.Linear(6, 3)},
        )
    assert not (tmp_path / "run").exists()


def test_train_teacher_refuses_live_teachers(tmp_path):
    with pytest.raises(ValueError, match="cross-entropy only"):
        train_teacher(tiny(tmp_path, teacher_model=["t=somewhere"]), train_data=TRAIN)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "x").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        x = rng.normal(size=(2, 8)).astype(np.float32)
        np.save(root / "x" / f"{i}.npy", x)
        records.append(ManifestRecord(f"x/{i}.npy", int(x[0, 0] > 0), i % 2, "train"))
    return write_manifest(root / "manifest.jsonl", records)


def cli_args(manifest, out) -> list[str]:
    return [
        "train-student",
        "--manifest",
        str(manifest),
        "--eval_split",
        "train",
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--no-progress",
        "--model_kwargs",
        '{"hidden": [8]}',
        "--output_dir",
        str(out),
    ]


def test_cli_live_teachers_repeatable_and_bad_output_exits_2(tmp_path, manifest, capsys):
    runs = {}
    for name, classes in (("two", 2), ("four", 4)):
        argv = ["train-teacher", *cli_args(manifest, tmp_path / name)[1:]]
        argv += ["--num_classes", str(classes)]
        assert main(argv) == 0
        runs[name] = tmp_path / name
    capsys.readouterr()
    argv = cli_args(manifest, tmp_path / "s")
    argv += ["--teacher_model", f"t1={runs['two']}", "--teacher_model", f"t2={runs['two']}"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["teacher_model"] == [f"t1={runs['two']}", f"t2={runs['two']}"]
    assert json.loads((tmp_path / "s" / "results.json").read_text())["teacher"] == ["t1", "t2"]
    capsys.readouterr()
    argv = [*cli_args(manifest, tmp_path / "bad"), "--teacher_model", f"t={runs['four']}"]
    argv += ["--num_classes", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "live teacher 't' outputs 4-class logits" in err


def test_live_teacher_with_augmentation_under_torchrun(tmp_path, manifest):
    from test_distributed_train import _torchrun  # the bounded torchrun helper

    teacher = tmp_path / "teacher"
    assert main(["train-teacher", *cli_args(manifest, teacher)[1:]]) == 0
    out = tmp_path / "student"
    argv = [*cli_args(manifest, out), "--epochs", "2", "--teacher_model", f"t={teacher}"]
    argv += ["--augment", "mixup,noise,shift", "--warmup_epochs", "0"]
    result = _torchrun(argv, timeout=300)  # two processes importing torch on a busy machine
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = read_metrics(out / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1] and epochs[-1]["kd_loss"] > 0
    assert json.loads((out / "results.json").read_text())["teacher"] == ["t"]


def test_config_checks_the_live_fields(tmp_path):
    from kdkit.train import TrainConfig

    for values, error, match in (
        ({"teacher_model": ["noequals"]}, ValueError, "expected NAME=RUN_DIR"),
        ({"teacher": ["a"], "teacher_model": ["a=x"]}, ValueError, "'a' given twice"),
        ({"teacher_model": ["a=x", "a=y"]}, ValueError, "'a' given twice"),
        ({"teacher_checkpoint": "first"}, ValueError, "teacher_checkpoint"),
        ({"feature_kd_loss": "l1"}, ValueError, "feature_kd_loss"),
        ({"feature_kd": ["nocolon"]}, ValueError, "STUDENT_MODULE:TEACHER_MODULE"),
        ({"teacher_model": [3]}, TypeError, "teacher_model must be a non-empty list"),
        ({"consistent_teacher": "yes"}, TypeError, "consistent_teacher"),
        ({"teacher_model": ["a=x", "b=y"], "fusion_weights": [1.0]}, ValueError, "one weight per"),
    ):
        with pytest.raises(error, match=match):
            TrainConfig.from_dict(values)
    config = TrainConfig(teacher_model="a=x", feature_kd="1:2", augment="noise, shift")
    assert (config.teacher_model, config.feature_kd) == (["a=x"], ["1:2"])
    assert config.augment == ["noise", "shift"]
