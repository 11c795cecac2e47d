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


def _two_tokenizers(tmp_path):
    from kdkit.demo.lm_data import stdlib_corpus, train_tokenizer

    texts, _ = stdlib_corpus(20_000)
    return (
        texts,
        train_tokenizer(texts, 300, tmp_path / "a"),
        train_tokenizer(texts, 450, tmp_path / "b"),
    )


def test_cross_teacher_copies_layers_and_the_shared_embedding_rows(tmp_path):
    pytest.importorskip("transformers")
    from kdkit.demo.lm_cross_tokenizer import cross_teacher_model
    from kdkit.demo.lm_data import demo_llama

    _, tok_a, tok_b = _two_tokenizers(tmp_path)
    teacher = demo_llama(len(tok_a), 2, 16, seed=0)
    new = demo_llama(len(tok_b), 2, 16, seed=1)
    fresh = new.get_input_embeddings().weight.detach().clone()
    copied = cross_teacher_model(teacher, tok_a, tok_b, new)
    # reference: byte-level BPE spells a token's bytes the same way in both vocabularies
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    shared = sorted(set(va) & set(vb))
    assert copied == len(shared) > 256
    old_rows, new_rows = teacher.get_input_embeddings().weight, new.get_input_embeddings().weight
    for token in shared:
        assert torch.equal(new_rows[vb[token]], old_rows[va[token]]), token
    only_b = [vb[t] for t in vb if t not in va]
    assert only_b and torch.equal(new_rows[only_b], fresh[only_b])  # the rest stays fresh
    assert new.lm_head.weight.data_ptr() == new_rows.data_ptr()  # tied head follows
    for name, value in teacher.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(new.state_dict()[name], value), name


def test_kd_then_on_policy_is_one_run_of_one_optimizer_and_schedule(
    tmp_path, monkeypatch, one_torch_thread
):
    pytest.importorskip("transformers")
    import kdkit.demo.lm_train as lm_train
    from kdkit.demo import lm_on_policy
    from kdkit.demo.lm import LMDemoConfig
    from kdkit.demo.lm_data import blocks_of, demo_llama

    texts, tok, _ = _two_tokenizers(tmp_path)
    data = blocks_of(texts, tok, 16)[:64]
    config = LMDemoConfig(output_dir=str(tmp_path / "o"), quick=True, progress=False, block=16)
    trainers = []

    def spy(*args):  # records each trainer as it is prepared
        prepare = args[-1]
        return lm_on_policy.kd_then_on_policy(
            *args[:-1], lambda t: trainers.append(t) or prepare(t)
        )

    monkeypatch.setattr(lm_train, "kd_then_on_policy", spy)
    student, teacher = demo_llama(len(tok), 1, 16, seed=0), demo_llama(len(tok), 1, 16, seed=1)
    _, curve, _, _ = lm_train.train_run(
        lm_on_policy.ON_POLICY_CONDITION, student, teacher.eval(), data, data[:8], config, 8,
        0, tmp_path / "run", tok,
    )  # fmt: skip
    first, second = trainers
    assert first.on_policy is None and second.on_policy.on_policy_fraction == 0.5
    assert (first.state.global_step, second.state.global_step) == (6, 2)  # 75 % KD of 8
    assert second.lr_scheduler is first.lr_scheduler  # one schedule over the 8 steps
    assert first.lr_scheduler.last_epoch == 8
    assert getattr(second.optimizer, "optimizer", second.optimizer) is getattr(
        first.optimizer, "optimizer", first.optimizer
    )  # AdamW's moments carry over
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6, 7, 8]  # steps counted across both
