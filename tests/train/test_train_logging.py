"""Metric sinks and progress bars of a run (kdkit.train.logging)."""

from __future__ import annotations

import re
import sys

import pytest
from train_support import TRAIN, tiny

from kdkit.train import train_teacher
from kdkit.train.logging import MetricsLogger, progress_bar, read_metrics, write_epochs_csv

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    train_teacher(tiny(tmp_path, progress=True, epochs=1), train_data=TRAIN)
    assert "epoch 1/1" in capsys.readouterr().err


def test_metrics_logger_drops_records_after_the_resumed_epoch(tmp_path):
    sink = MetricsLogger(tmp_path)
    for epoch in range(3):
        sink.log({"kind": "step", "epoch": epoch, "global_step": epoch, "total_loss": 1.0})
        sink.log({"kind": "epoch", "epoch": epoch, "global_step": epoch, "total_loss": 0.5})
    sink.close()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 6
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl", "epoch")] == [0, 1, 2]
    MetricsLogger(tmp_path, start_epoch=1).close()  # resuming at epoch 1
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 0]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_epochs_csv_has_the_union_of_columns(tmp_path):
    path = write_epochs_csv(tmp_path / "e.csv", [{"epoch": 0, "a": 1}, {"epoch": 1, "b": 2}])
    assert path.read_text().splitlines() == ["epoch,a,b", "0,1,", "1,,2"]


def test_progress_bar_is_off_without_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress_bar(3, "x", enabled=True) is None
    assert progress_bar(3, "x", enabled=False) is None


@pytest.mark.parametrize(
    ("option", "module", "message"),
    [
        ("tensorboard", "tensorboard", "needs tensorboard: pip install 'kdkit[tensorboard]'"),
        ("wandb", "wandb", "needs wandb: pip install 'kdkit[wandb]'"),
    ],
)
def test_a_missing_sink_fails_before_any_work(tmp_path, monkeypatch, option, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # simulates "not installed"
    with pytest.raises(ImportError, match=re.escape(message)):
        train_teacher(tiny(tmp_path, **{option: True}), train_data=TRAIN)
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained
    with pytest.raises(ImportError, match=re.escape(message)):
        MetricsLogger(tmp_path / "direct", **{option: True})
