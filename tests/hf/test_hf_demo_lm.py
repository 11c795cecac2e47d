"""``kdkit demo --lm`` (kdkit.demo.lm) on tiny settings, and its missing-extra message."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from kdkit.cli import main


def _tiny(out, **kwargs):
    from kdkit.demo.lm import LMDemoConfig

    return LMDemoConfig(
        output_dir=str(out),
        quick=True,
        progress=False,
        corpus_chars=20_000,
        vocab_size=300,
        teacher_steps=3,
        student_steps=2,
        **kwargs,
    )


def test_lm_demo_tiny(tmp_path, one_torch_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from kdkit.demo.lm import LM_CONDITIONS, run_lm_demo

    threads = torch.get_num_threads()
    config = _tiny(tmp_path / "lm", workers=1)
    result = run_lm_demo(config)
    assert torch.get_num_threads() == threads  # restored
    assert set(result.summary) == set(LM_CONDITIONS)
    for stats in result.summary.values():
        assert stats["perplexity"][0] > 1 and 0 <= stats["accuracy"][0] <= 1
        assert -20 < stats["teacher_loglik"][0] < 0  # nats per sampled token
    assert -20 < result.teacher_metrics["teacher_loglik"] < 0
    report = result.report_path.read_text()
    assert "## Results" in report and "layer-dropped init + KD" in report
    assert "KD, then on-policy KD (GKD)" in report and "teacher log-lik" in report
    assert "KD (cross-tokenizer, map)" in report and "aligned coverage" in report
    coverage = result.summary["KD (cross-tokenizer, map)"]["coverage"][0]
    assert 0.2 < coverage < 1  # longer teacher tokens: some student targets unaligned
    xtok = tmp_path / "lm" / "teacher-xtok"
    assert (xtok / "config.json").is_file()
    assert json.loads((xtok / "config.json").read_text())["vocab_size"] == 450  # 1.5 x 300
    for png in ("perplexity_curves.png", "kd_losses.png"):
        assert (tmp_path / "lm" / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "lm" / "teacher" / "config.json").is_file()
    assert (tmp_path / "lm" / "tokenizer" / "tokenizer.json").is_file()


def test_lm_demo_workers_give_the_same_numbers(tmp_path, one_torch_thread):
    """The student runs in two spawned worker processes equal the runs in this one: each
    run starts from the files the demo wrote and its seed, nothing of the process."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from kdkit.demo.lm import run_lm_demo

    one = run_lm_demo(_tiny(tmp_path / "one", workers=1, seeds=2))
    two = run_lm_demo(_tiny(tmp_path / "two", workers=2, seeds=2))
    assert two.summary == one.summary
    assert len({v["perplexity"][1] for v in one.summary.values()}) > 1  # seeds differ


def test_lm_demo_without_transformers_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # simulates "not installed"
    out = tmp_path / "lm"
    assert main(["demo", "--lm", "--quick", "--output_dir", str(out), "--no-progress"]) == 1
    assert (
        capsys.readouterr().err == "kdkit demo --lm needs transformers: pip install 'kdkit[hf]'\n"
    )
    assert not out.exists()
