"""One-line errors and exit codes of the command line (issue 11, items 6 and 8)."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(root, n=12, shape=(5,), odd=None, labels=None):
    """``n`` feature files of ``shape`` (``odd``: {index: shape}), every 4th in ``test``."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        np.save(root / f"{i}.npy", np.full((odd or {}).get(i, shape), i % 2, dtype=np.float32))
        label = (labels or {}).get(i, i % 2)
        records.append(ManifestRecord(f"{i}.npy", label, 0, "test" if i % 4 == 0 else "train"))
    return write_manifest(root / "m.jsonl", records)


def _args(manifest, out, *extra):
    base = ["--manifest", str(manifest), "--output_dir", str(out), "--epochs", "1"]
    return [*base, "--batch_size", "4", "--no-progress", *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_feature_file_of_the_wrong_shape(tmp_path, capsys):
    manifest = _data(tmp_path / "d", odd={5: (4,)})
    assert main(["train-teacher", *_args(manifest, tmp_path / "o")]) == 1
    err = _one_line(capsys)
    assert "5.npy: features of shape (4,)" in err and "has (5,)" in err, err


def test_eval_label_out_of_range(tmp_path, capsys):
    manifest = _data(tmp_path / "d", labels={8: 7})  # sample 8 is in the test split
    assert main(["train-teacher", *_args(manifest, tmp_path / "o")]) == 1
    err = _one_line(capsys)
    assert "eval label 7 of sample '8.npy'" in err and "[0, 2)" in err, err


@pytest.mark.parametrize("device", ["cuda:99", "gpu"])
def test_unavailable_device(tmp_path, capsys, device):
    manifest = _data(tmp_path / "d")
    assert main(["train-teacher", *_args(manifest, tmp_path / "o", "--device", device)]) == 2
    assert f"--device {device!r}" in _one_line(capsys)
    argv = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={tmp_path}"]
    assert main([*argv, "--cache", str(tmp_path / "c"), "--device", device]) == 2
    assert f"--device {device!r}" in _one_line(capsys)


@pytest.mark.parametrize("damage", ["garbage", "pickle"])
def test_corrupt_last_state(tmp_path, capsys, damage):
    manifest = _data(tmp_path / "d")
    out = tmp_path / "o"
    assert (
        main(["train-teacher", *_args(manifest, out, "--epochs", "2", "--stop_after_epoch", "1")])
        == 0
    )
    capsys.readouterr()
    state = out / "checkpoints" / "last_state.pt"
    if damage == "garbage":
        state.write_bytes(b"\x00not a state" * 10)
    else:  # an object weights_only=True refuses to unpickle
        torch.save({"x": datetime.date(2026, 1, 1)}, state)
    assert main(["train-teacher", *_args(manifest, out, "--epochs", "2", "--resume")]) == 1
    err = _one_line(capsys)
    assert "last_state.pt is damaged or not a kdkit training state" in err
    assert "weights_only" not in err


def test_teacher_weights_not_safetensors(tmp_path, capsys):
    manifest = _data(tmp_path / "d")
    weights = tmp_path / "teacher.pt"
    torch.save(torch.nn.Linear(5, 2).state_dict(), weights)
    argv = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={weights}"]
    code = main([*argv, "--model", "kdkit.models:mlp", "--cache", str(tmp_path / "c")])
    assert code == 2
    assert "teacher.pt is not a safetensors file" in _one_line(capsys)


def _failing_step(monkeypatch, error, at=2):
    from kdkit.train import epoch as epoch_mod

    step, calls = epoch_mod._train_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise error
        return step(*args, **kwargs)

    monkeypatch.setattr(epoch_mod, "_train_step", failing)


def test_ctrl_c_says_where_and_how_to_resume(tmp_path, capsys, monkeypatch):
    manifest = _data(tmp_path / "d")
    _failing_step(monkeypatch, KeyboardInterrupt())
    assert main(["train-teacher", *_args(manifest, tmp_path / "o")]) == 130
    err = _one_line(capsys)
    assert err == "kdkit train-teacher: interrupted at epoch 1 step 2; resume with --resume\n"


def test_unexpected_errors_are_one_line_without_debug(tmp_path, capsys, monkeypatch):
    manifest = _data(tmp_path / "d")
    _failing_step(monkeypatch, RuntimeError("boom\nsecond line"))
    assert main(["train-teacher", *_args(manifest, tmp_path / "o")]) == 1
    assert "error: boom second line (--debug shows the traceback)" in _one_line(capsys)
    _failing_step(monkeypatch, RuntimeError("boom"), at=1)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "train-teacher", *_args(manifest, tmp_path / "o2")])


# -- item 8: the smaller ones ------------------------------------------------------------------


def test_yaml_numbers_as_users_write_them(tmp_path):
    from kdkit.train.config import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-4\nepochs: 3\nkd:\n  temperature: 2.\n")
    values = load_config_file(path)
    assert values["lr"] == 1e-3 and values["weight_decay"] == 5e-4 and values["epochs"] == 3
    assert values["kd"]["temperature"] == 2.0


def test_toml_kd_that_is_not_a_table(tmp_path, capsys):
    manifest = _data(tmp_path / "d")
    config = tmp_path / "c.toml"
    config.write_text("kd = 3\n")
    argv = ["train-student", "--config", str(config), *_args(manifest, tmp_path / "o")]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert "kd must be a table of KD settings" in err and "got 3" in err, err


def test_unknown_model_kwargs_key_exits_2(tmp_path, capsys):
    manifest = _data(tmp_path / "d")
    argv = _args(manifest, tmp_path / "o", "--model_kwargs", '{"hiden": [8]}')
    assert main(["train-teacher", *argv]) == 2
    err = _one_line(capsys)
    assert "['hiden']" in err and "did you mean 'hidden'" in err, err
    assert not (tmp_path / "o").exists()


def test_nonexistent_teacher_directory(tmp_path, capsys):
    manifest = _data(tmp_path / "d")
    argv = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={tmp_path / 'nope'}"]
    assert main([*argv, "--cache", str(tmp_path / "c")]) == 2
    err = _one_line(capsys)
    assert "nope does not exist" in err and "needs --model" not in err, err


def test_readme_cpu_torchrun_example_keeps_the_previous_run():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cpu = readme[readme.index("# CPU only (gloo)") :].split("```", 1)[0]
    assert "--output_dir runs/student " not in cpu + " " and "--output_dir runs/student-cpu" in cpu


def test_real_sigint_exits_130_with_one_line(tmp_path):
    """A real Ctrl-C (SIGINT) to a running ``python -m kdkit train-teacher``."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    manifest = _data(tmp_path / "d", n=64)
    out = tmp_path / "o"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = _args(manifest, out, "--epochs", "100000")  # the later --epochs wins
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdkit", "train-teacher", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last_state.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("kdkit train-teacher: interrupted at epoch ") and last.endswith(
        "; resume with --resume"
    ), err


# -- #26, low: exit 2 for bad input seen once a run starts, --debug inside a run -------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("low")
    manifest = _data(root / "d")
    assert main(["train-teacher", *_args(manifest, root / "t")]) == 0
    return manifest, root / "t"


@pytest.mark.parametrize(
    "top_k,message",
    [
        ("5", r"top_k for teacher 't' must be <= its 2 classes, got 5"),
        ("zz=1", r"top_k names teachers \['zz'\] that are not passed in teachers \['t'\]"),
    ],
)
def test_bad_top_k_exits_2(teacher_run, tmp_path, capsys, top_k, message):
    import re

    manifest, run = teacher_run
    capsys.readouterr()
    argv = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={run}", "--no-progress"]
    assert main([*argv, "--cache", str(tmp_path / "c"), "--top_k", top_k]) == 2
    assert re.search(message, _one_line(capsys))


def test_capture_temperature_negative_exits_2(teacher_run, tmp_path, capsys):
    manifest, run = teacher_run
    capsys.readouterr()
    argv = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={run}", "--top_k", "1"]
    assert main([*argv, "--cache", str(tmp_path / "c"), "--capture_temperature", "-1"]) == 2
    assert "--capture_temperature must be a finite number > 0, got -1.0" in _one_line(capsys)


def test_missing_live_teacher_exits_2_before_the_run(teacher_run, tmp_path, capsys):
    manifest, _ = teacher_run
    capsys.readouterr()
    out = tmp_path / "s"
    argv = [*_args(manifest, out), "--teacher_model", f"x={tmp_path / 'missing'}"]
    assert main(["train-student", *argv]) == 2
    line = _one_line(capsys)
    assert "teacher x=" in line and "missing does not exist" in line, line
    assert not out.exists()


def test_debug_shows_the_traceback_of_errors_inside_a_run(teacher_run, tmp_path, capsys):
    """``--debug`` used to print the same one line for errors raised by the run itself."""
    manifest, run = teacher_run
    argv = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={run}", "--no-progress"]
    with pytest.raises(ValueError, match="must be <= its 2 classes"):
        main(["--debug", *argv, "--cache", str(tmp_path / "c"), "--top_k", "5"])
    student = [*_args(manifest, tmp_path / "s"), "--cache", str(tmp_path / "nocache")]
    assert main(["train-student", *student]) in (1, 2)
    capsys.readouterr()
    with pytest.raises(Exception, match="nocache"):
        main(
            [
                "--debug",
                "train-student",
                *_args(manifest, tmp_path / "s2"),
                "--cache",
                str(tmp_path / "nocache"),
            ]
        )


def test_one_dimensional_hidden_states_name_hidden_size():
    from kdkit.losses.linear import linear_kd_loss

    with pytest.raises(ValueError, match=r"^student_hidden must have shape \[B, hidden_size\]"):
        linear_kd_loss(torch.randn(4), torch.randn(7, 4), torch.randn(7), temperature=1.0)
    with pytest.raises(ValueError, match=r"^teacher_hidden must have shape \[B, hidden_size\]"):
        linear_kd_loss(
            torch.randn(2, 4), torch.randn(7, 4), torch.randn(4), teacher_weight=torch.randn(7, 4)
        )


@pytest.mark.parametrize("split", [3, ["train", 3], 2.0])
def test_an_integer_split_is_refused(tmp_path, split):
    from kdkit.data import ManifestDataset

    manifest = _data(tmp_path / "d")
    with pytest.raises(TypeError, match=r"^split must be None, a split name or a list of names"):
        ManifestDataset(manifest, split=split)
