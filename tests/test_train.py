"""The training loop, its config, checkpoints and resume (kdkit.train)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdkit.data import ArrayDataset
from kdkit.losses.kd import KDLossConfig
from kdkit.train import (
    TrainConfig,
    evaluate,
    load_config_file,
    load_model_from_run,
    train_student,
    train_teacher,
)
from kdkit.train.checkpoints import load_training_state
from kdkit.train.logging import read_metrics

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_data(n: int = 48, seed: int = 0, offset: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    d = np.arange(n) % 3
    return ArrayDataset(x, y, d, [f"s{offset + i}" for i in range(n)])


TRAIN, TEST = make_data(48), make_data(24, seed=1, offset=1000)


def tiny(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    values = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 1e-2,
        "output_dir": str(tmp_path / name),
        "model_kwargs": {"hidden": [8], "dropout": 0.2},
        "progress": False,
        "num_classes": 3,
        **overrides,
    }
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    cache = pytest.importorskip("kdkit.cache")
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teachers = {"a": torch.nn.Linear(6, 3), "b": torch.nn.Linear(6, 3)}
    everything = ArrayDataset(
        np.concatenate([TRAIN.features, TEST.features]),
        TRAIN.labels + TEST.labels,
        TRAIN.domains + TEST.domains,
        TRAIN.paths + TEST.paths,
    )
    cache.dump_teacher_logits(teachers, everything, root / "cache", progress=False)
    return str(root / "cache")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- outputs -------------------------------------------------------------------------


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


def test_student_without_cache_is_the_ce_baseline(tmp_path):
    a = train_student(tiny(tmp_path, "s"), train_data=TRAIN, eval_data=TEST)
    b = train_teacher(tiny(tmp_path, "t"), train_data=TRAIN, eval_data=TEST)
    for k, v in weights(a.model).items():
        assert torch.equal(v, b.model.state_dict()[k])


def test_deterministic_under_seed(tmp_path):
    a = train_teacher(tiny(tmp_path, "a", seed=3), train_data=TRAIN)
    b = train_teacher(tiny(tmp_path, "b", seed=3), train_data=TRAIN)
    c = train_teacher(tiny(tmp_path, "c", seed=4), train_data=TRAIN)
    wa, wb, wc = weights(a.model), weights(b.model), weights(c.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


# --- resume ----------------------------------------------------------------------------


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


# --- KD --------------------------------------------------------------------------------


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


# --- config ----------------------------------------------------------------------------


def test_config_defaults_are_the_spec_recommendation():
    kd = TrainConfig().kd
    # A partial kd dict keeps the recommended values for the fields it does not set.
    assert TrainConfig(kd={"temperature": 4.0}).kd == kd
    assert TrainConfig.from_dict({"kd": {}}).kd == kd
    assert kd == KDLossConfig(
        temperature=4.0, kd_alpha=0.7, kd_weighting="pmax", warmup_epochs=5, kd_ramp_epochs=10
    )


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number > 0"),
        ({"kd_on": "source"}, ValueError, "kd_on must be one of"),
        ({"fusion": "median"}, ValueError, "fusion must be one of"),
        ({"kd": {"kd_alpha": 2}}, ValueError, "kd_alpha must be in"),
        ({"kd": {"alpha": 2}}, KeyError, "unknown kd field"),
        ({"epoch": 3}, KeyError, "did you mean 'epochs'"),
        ({"batch_size": "8"}, TypeError, "batch_size must be an integer"),
        ({"fusion_weights": [1.0]}, ValueError, "one weight per teacher"),
        ({"source_domain": "a"}, ValueError, "source_domain"),
    ],
)
def test_config_validation(values, error, message):
    with pytest.raises(error, match=message):
        TrainConfig.from_dict(values)


def test_config_round_trip_and_normalisation(tmp_path):
    config = TrainConfig.from_dict({"teacher": "a,b", "source_domain": 1, "kd": {"temperature": 2}})
    assert config.teacher == ["a", "b"] and config.source_domain == [1]
    path = config.save(tmp_path / "c.json")
    assert TrainConfig.from_dict(json.loads(path.read_text())) == config


def test_config_files_toml_and_yaml(tmp_path):
    (tmp_path / "c.toml").write_text('epochs = 3\nteacher = ["a"]\n[kd]\ntemperature = 2.5\n')
    (tmp_path / "c.yaml").write_text("epochs: 3\nteacher: [a]\nkd:\n  temperature: 2.5\n")
    a = TrainConfig.from_dict(load_config_file(tmp_path / "c.toml"))
    b = TrainConfig.from_dict(load_config_file(tmp_path / "c.yaml"))
    assert a == b and a.kd.temperature == 2.5 and a.kd.kd_alpha == 0.7
    (tmp_path / "bad.toml").write_text("epochs = [\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ValueError, match="must end in"):
        load_config_file(tmp_path / "c.ini")


# --- optional sinks --------------------------------------------------------------------


def test_tensorboard_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'kdkit\[tensorboard\]'"):
            train_teacher(tiny(tmp_path, tensorboard=True), train_data=TRAIN)
        return
    result = train_teacher(tiny(tmp_path, tensorboard=True), train_data=TRAIN)
    assert any((result.output_dir / "tensorboard").iterdir())


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train_teacher(tiny(tmp_path, wandb=True, wandb_mode="offline"), train_data=TRAIN)
    assert (result.output_dir / "wandb").is_dir()


def test_resume_with_changed_settings_warns(tmp_path):
    train_teacher(tiny(tmp_path, epochs=3, stop_after_epoch=1), train_data=TRAIN)
    with pytest.warns(UserWarning, match=r"changed setting\(s\) \['lr'\]"):
        train_teacher(tiny(tmp_path, epochs=3, lr=0.5, resume=True), train_data=TRAIN)


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    train_teacher(tiny(tmp_path, progress=True, epochs=1), train_data=TRAIN)
    assert "epoch 1/1" in capsys.readouterr().err


def test_labels_beyond_the_cache_classes_fail_early(tmp_path, cache_dir):
    data = ArrayDataset(TRAIN.features, [5, *TRAIN.labels[1:]], TRAIN.domains, TRAIN.paths)
    config = tiny(tmp_path, cache=cache_dir, teacher=["a"], num_classes=None)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\), got 0\.\.5"):
        train_student(config, train_data=data)
