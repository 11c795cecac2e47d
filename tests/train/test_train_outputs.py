"""Run output directories: locked, never reused by accident (issue 11, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
from train_support import TRAIN, tiny

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest
from kdkit.train import train_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_into_a_locked_directory_fails(holder):
    directory, proc = holder
    config = tiny(directory.parent, name="dir", eval_split=None)
    with pytest.raises(
        RuntimeError, match=rf"in use by another kdkit training run \(pid {proc.pid}\)"
    ):
        train_teacher(config, train_data=TRAIN)
    assert not (directory / "config.json").exists()


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path):
    train_teacher(tiny(tmp_path, eval_split=None, epochs=1), train_data=TRAIN)
    notes = tmp_path / "run" / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds a kdkit run.*--resume.*--overwrite"):
        train_teacher(tiny(tmp_path, eval_split=None, epochs=1), train_data=TRAIN)
    train_teacher(tiny(tmp_path, eval_split=None, epochs=1, overwrite=True), train_data=TRAIN)
    assert notes.read_text() == "mine"


def test_cli_refuses_a_finished_run_and_a_file_as_output_dir(tmp_path, capsys):
    from test_cli import small

    for i in range(4):
        np.save(tmp_path / f"{i}.npy", np.full(5, i, dtype=np.float32))
    manifest = write_manifest(
        tmp_path / "m.jsonl", [ManifestRecord(f"{i}.npy", i % 2) for i in range(4)]
    )
    out = tmp_path / "out"
    args = [*small(manifest, out), "--eval_split", "train", "--epochs", "1"]
    assert main(["train-teacher", *args]) == 0
    capsys.readouterr()
    assert main(["train-teacher", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err, err
    assert main(["train-teacher", *args, "--overwrite"]) == 0
    capsys.readouterr()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(["train-teacher", *small(manifest, afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err, err
