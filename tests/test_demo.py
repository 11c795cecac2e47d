"""The end-to-end demo (kdkit.demo) on its quick CI settings."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.demo.data import DOMAIN_NAMES, make_demo_data


def test_demo_data_is_deterministic_with_shifted_domains():
    a, b = make_demo_data(seed=0), make_demo_data(seed=0)
    assert np.array_equal(a.features, b.features) and list(a.splits) == list(b.splits)
    assert set(a.domains.tolist()) == set(DOMAIN_NAMES)
    assert set(a.splits.tolist()) == {"train", "teacher_train", "test"}
    # The student sees every labelled source sample but few labelled target samples.
    train = a.splits == "train"
    source = a.domains == 0
    assert not np.any(source & (a.splits == "teacher_train"))
    assert (train & ~source).sum() < 0.2 * (~source & (a.splits != "test")).sum()
    # Target devices really shift the inputs: per-domain mean intensities differ.
    means = [a.features[a.domains == d].mean() for d in DOMAIN_NAMES]
    assert min(abs(means[0] - m) for m in means[1:]) > 0.01


def test_demo_quick(tmp_path, capsys):
    pytest.importorskip("kdkit.cache")
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    for row in (
        "teacher: mlp",
        "teacher: cnn",
        "student: CE only",
        "student: KD (MLP teacher)",
        "student: KD + augment, cached logits",
        "student: KD + augment, live teacher",
    ):
        assert row in printed
    assert "target mean" in printed
    report = (out / "report.md").read_text()
    assert "## Results" in report and "T = 4, alpha = 0.7, pmax" in report
    pngs = ("accuracy_curves.png", "kd_schedule.png", "coverage_confidence.png", "losses.png")
    for png in (*pngs, "augmentation_views.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "data" / "manifest.jsonl").is_file()
    assert (out / "students" / "kd-mlp-teacher-seed0" / "metrics.jsonl").is_file()
    live = out / "students" / "kd-augment-live-teacher-seed0"
    assert '"augment": [' in (live / "config.json").read_text()
    assert "consistent" in report and "live teacher" in report
    assert "![augmentation_views.png](augmentation_views.png)" in report
    assert "chosen on a validation split" in report and "with the setting before #25" in report


def test_demo_without_matplotlib_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # simulates "not installed"
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err == "kdkit demo needs matplotlib: pip install 'kdkit[demo]'\n"
    assert not out.exists()
