"""The kdkit command line (kdkit.cli): exit codes, messages, config precedence, a full run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A small generated data set: .npy files and a JSONL manifest, 3 domains, 2 splits."""
    root = tmp_path_factory.mktemp("data")
    (root / "x").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(60):
        x = rng.normal(size=5).astype(np.float32)
        label = int(x[0] > 0)
        np.save(root / "x" / f"{i}.npy", x)
        records.append(
            ManifestRecord(f"x/{i}.npy", label, i % 3, "test" if i % 4 == 0 else "train")
        )
    return write_manifest(root / "manifest.jsonl", records)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def small(manifest: Path, out: Path) -> list[str]:
    return [
        "--manifest",
        str(manifest),
        "--epochs",
        "2",
        "--batch_size",
        "16",
        "--output_dir",
        str(out),
        "--no-progress",
        "--model_kwargs",
        '{"hidden": [8]}',
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-student", "--temprature", "3"], "did you mean: --temprature -> --temperature?"),
        (["train-student", "--kd_alpha", "1.5"], "kd_alpha must be in [0, 1]"),
        (["train-student", "--kd_weighting", "max"], "invalid choice: 'max'"),
        (["train-student", "--epochs", "two"], "invalid int value: 'two'"),
        (["train-student", "--model_kwargs", "{bad"], "not valid JSON"),
        (["train-student", "--loss_type", "mse"], "loss_type must be one of"),
        (["train-teacher", "--temperature", "3"], "unrecognized arguments: --temperature"),
        (["train-student", "--config", "missing.toml"], "does not exist"),
        (["train-student"], "no training data"),
        (["no-such-command"], "invalid choice"),
        ([], "the following arguments are required: COMMAND"),
        (["demo", "--seeds", "0"], "seeds must be an integer >= 1"),
    ],
)
def test_bad_usage_exits_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith("kdkit")
    assert message in err


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert "kdkit" in capsys.readouterr().out
    assert main(["train-student", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--temperature",
        "--kd_alpha",
        "--kd_weighting",
        "--warmup_epochs",
        "--kd_ramp_epochs",
    ):
        assert flag in out


def test_python_dash_m(tmp_path):
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run(
        [sys.executable, "-m", "kdkit", "train-student", "--kd_alpha", "7"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(src), "PATH": ""},
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kdkit train-student: error: KDLossConfig.kd_alpha")


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_flags(tmp_path, manifest, suffix):
    text = {
        ".toml": "epochs = 1\nlr = 0.01\nbatch_size = 8\n[kd]\ntemperature = 2.0\nkd_alpha = 0.5\n",
        ".yaml": "epochs: 1\nlr: 0.01\nbatch_size: 8\nkd:\n  temperature: 2.0\n  kd_alpha: 0.5\n",
    }[suffix]
    config = tmp_path / f"c{suffix}"
    config.write_text(text)
    out = tmp_path / "out"
    argv = ["train-student", "--config", str(config), "--manifest", str(manifest)]
    argv += ["--temperature", "5", "--batch_size", "16", "--output_dir", str(out), "--no-progress"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.01  # from the file
    assert saved["batch_size"] == 16 and saved["kd"]["temperature"] == 5.0  # flags win
    assert saved["kd"]["kd_alpha"] == 0.5 and saved["kd"]["kd_weighting"] == "pmax"  # defaults


def test_manifest_pipeline_end_to_end(tmp_path, manifest, capsys):
    pytest.importorskip("kdkit.cache")
    assert main(["train-teacher", *small(manifest, tmp_path / "t1")]) == 0
    assert main(["train-teacher", *small(manifest, tmp_path / "t2"), "--seed", "1"]) == 0
    cache = tmp_path / "cache"
    argv = ["dump-teacher", "--manifest", str(manifest), "--cache", str(cache)]
    argv += [
        "--teacher",
        f"t1={tmp_path / 't1'}",
        "--teacher",
        f"t2={tmp_path / 't2'}",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "cached 60 samples x 2 classes" in capsys.readouterr().out
    student = tmp_path / "s"
    argv = ["train-student", *small(manifest, student), "--cache", str(cache)]
    argv += ["--teacher", "t1,t2", "--fusion", "mean", "--kd_on", "target", "--source_domain", "0"]
    argv += ["--temperature", "4", "--kd_alpha", "0.7", "--kd_weighting", "pmax"]
    argv += ["--warmup_epochs", "0", "--kd_ramp_epochs", "1", "--schedule_per_step"]
    assert main(argv) == 0
    assert "finished:" in capsys.readouterr().out
    saved = json.loads((student / "config.json").read_text())
    assert saved["teacher"] == ["t1", "t2"] and saved["kd_on"] == "target"
    epochs = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["kind"] == "epoch" and 0 < epochs[-1]["coverage"] < 1
    # --resume of a finished run trains nothing more and still succeeds.
    assert main([*argv, "--resume"]) == 0


def test_missing_cache_keys_exit_1(tmp_path, manifest, capsys):
    pytest.importorskip("kdkit.cache")
    assert main(["train-teacher", *small(manifest, tmp_path / "t")]) == 0
    cache = tmp_path / "cache"
    argv = ["dump-teacher", "--manifest", str(manifest), "--cache", str(cache), "--split", "test"]
    assert main([*argv, "--teacher", f"t={tmp_path / 't'}", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train-student", *small(manifest, tmp_path / "s"), "--cache", str(cache)]) == 1
    err = one_line_error(capsys)
    assert "lacks logits for 45 of the 45 training samples, e.g. 'x/1.npy'" in err


def test_dump_teacher_usage_errors(tmp_path, manifest, capsys):
    pytest.importorskip("kdkit.cache")
    argv = ["dump-teacher", "--manifest", str(manifest), "--cache", str(tmp_path / "c")]
    assert main([*argv, "--teacher", "nameonly"]) == 2
    assert "expected NAME=RUN_DIR" in one_line_error(capsys)
    assert main([*argv, "--teacher", f"a={tmp_path}"]) == 2
    assert "no 'best' checkpoint" in one_line_error(capsys)


def test_dump_teacher_from_a_weights_file(tmp_path, manifest, capsys):
    cache = pytest.importorskip("kdkit.cache")
    from safetensors.torch import save_model

    from kdkit.models import mlp

    teacher = mlp((5,), 2, hidden=(4,))
    save_model(teacher, str(tmp_path / "w.safetensors"))
    argv = ["dump-teacher", "--manifest", str(manifest), "--cache", str(tmp_path / "c")]
    argv += ["--teacher", f"mine={tmp_path / 'w.safetensors'}", "--model", "kdkit.models:mlp"]
    assert main([*argv, "--model_kwargs", '{"hidden": [4]}', "--no-progress"]) == 0
    index = cache.load_cache_index(tmp_path / "c")
    x = torch.from_numpy(np.load(manifest.parent / "x" / "7.npy"))
    expected = teacher(x[None]).detach()
    assert torch.allclose(cache.load_cached_logits(["x/7.npy"], index, "mine"), expected)
    assert main([*argv, "--no-progress"]) == 2  # hidden size differs from the weights
    assert "does not fit the model" in one_line_error(capsys)


def _options(command: str) -> set[str]:
    from kdkit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    return {o for a in sub.choices[command]._actions for o in a.option_strings}


def test_every_config_field_has_a_flag_or_is_file_only():
    import dataclasses

    from kdkit.losses.kd import KDLossConfig
    from kdkit.train.config import (
        FIELD_HELP,
        FILE_ONLY_FIELDS,
        KD_FIELD_HELP,
        STUDENT_FIELDS,
        TrainConfig,
    )

    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    kd_fields = [f.name for f in dataclasses.fields(KDLossConfig)]
    assert set(FIELD_HELP) == set(train_fields) and set(KD_FIELD_HELP) == set(kd_fields)
    student, teacher = _options("train-student"), _options("train-teacher")
    for name in train_fields + kd_fields:
        if name not in FILE_ONLY_FIELDS:
            assert f"--{name}" in student, name
    for name in train_fields:
        if name not in FILE_ONLY_FIELDS and name not in STUDENT_FIELDS:
            assert f"--{name}" in teacher, name
    assert not {f"--{n}" for n in [*STUDENT_FIELDS, *kd_fields]} & teacher


def test_choices_come_from_the_constants(capsys):
    from kdkit.fusion import FUSION_STRATEGIES
    from kdkit.losses.kd import LOSS_TYPES, WEIGHTINGS
    from kdkit.train.config import KD_ON, OPTIMIZERS

    assert main(["train-student", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for choices in (LOSS_TYPES, WEIGHTINGS, FUSION_STRATEGIES, KD_ON, OPTIMIZERS):
        assert "{" + ",".join(choices) + "}" in out
    assert "--jsd_beta" in out and "--momentum" in out and "--wandb_project" in out


def test_new_flags_reach_the_config():
    from kdkit.cli import build_config, build_parser

    argv = ["train-student", "--jsd_beta", "0.25", "--loss_type", "jsd", "--momentum", "0.5"]
    argv += ["--wandb_project", "p", "--optimizer", "sgd"]
    config = build_config(build_parser().parse_args(argv), student=True)
    assert config.kd.jsd_beta == 0.25 and config.kd.loss_type == "jsd"
    assert config.momentum == 0.5 and config.wandb_project == "p" and config.optimizer == "sgd"
    teacher = build_config(build_parser().parse_args(["train-teacher", "--momentum", "0.1"]), False)
    assert teacher.momentum == 0.1
