"""Cross-tokenizer distillation (kdkit.hf.cross_tokenizer): the loss, the trainer, caches."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_testing import tiny_llama
from xtok_testing import CORPUS, byte_fallback, byte_level

from kdkit import KDLossConfig
from kdkit.hf.alignment import Alignment
from kdkit.hf.cross_tokenizer import cross_tokenizer_loss
from kdkit.hf.loss import lm_distillation_loss
from kdkit.hf.vocab_map import VocabMap


def _problem(seed=0, b=2, length=7, h=8, v=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=True).double()
    teacher = torch.randn(b, length, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[1, 4:] = -100
    return hidden, head, teacher, labels


@pytest.mark.parametrize("loss_type", ["kldiv", "reverse_kl", "jsd"])
def test_identical_tokenizers_reduce_to_the_plain_loss(loss_type):
    hidden, head, teacher, labels = _problem()
    b, length = labels.shape
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, loss_type=loss_type)
    rows, pos = torch.meshgrid(torch.arange(b), torch.arange(length), indexing="ij")
    everything = Alignment(rows.reshape(-1), pos.reshape(-1), pos.reshape(-1))
    identity = VocabMap(torch.arange(11), torch.arange(11))
    plain, p_stats = lm_distillation_loss(hidden, head, teacher, labels, config, 1.0)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    cross, c_stats = cross_tokenizer_loss(
        hidden, head, teacher, labels, config, 1.0, alignment=everything, vocab_map=identity
    )
    (g_cross,) = torch.autograd.grad(cross, hidden)
    torch.testing.assert_close(cross, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_cross, g_plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_stats.kd_sum, p_stats.kd_sum)
    assert float(c_stats.selected) == float(p_stats.num_tokens)  # coverage 1


def test_kd_only_on_aligned_targets_and_uld():
    hidden, head, teacher, labels = _problem(seed=1)
    config = KDLossConfig(temperature=1.0, kd_alpha=1.0)
    one = Alignment(torch.tensor([0, 1]), torch.tensor([2, 6]), torch.tensor([3, 1]))
    loss, stats = cross_tokenizer_loss(
        hidden, head, teacher, labels, config, alignment=one, loss="uld"
    )
    from kdkit.losses.uld import uld_distance

    s = head(hidden[0, 2])  # position (1, 6) predicts a padding target: not counted
    want = uld_distance(s[None], teacher[0, 3][None])[0]
    torch.testing.assert_close(loss, want)
    assert float(stats.selected) == 1.0


def _texts_file(tmp_path, tokenizer):
    import json

    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": t}) for t in CORPUS[:8]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from kdkit.hf import load_lm_data

    return load_lm_data(path, tokenizer, max_length=32)


def _trainer(tmp_path, student_tok, teacher_tok, **kwargs):
    from transformers import TrainingArguments

    from kdkit.hf import CausalLMCollator, DistillationTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
    )
    return DistillationTrainer(
        tiny_llama(1, vocab=len(student_tok), seed=1),
        args,
        teacher=tiny_llama(2, vocab=len(teacher_tok), seed=2),
        train_dataset=_texts_file(tmp_path, student_tok),
        data_collator=CausalLMCollator(student_tok.pad_token_id),
        processing_class=student_tok,
        teacher_tokenizer=teacher_tok,
        kd_config=KDLossConfig(temperature=2.0, kd_alpha=0.5),
        **kwargs,
    )


@pytest.mark.parametrize("loss", ["map", "uld"])
def test_trainer_distils_across_tokenizers_and_logs_coverage(tmp_path, loss, one_torch_thread):
    trainer = _trainer(tmp_path, byte_level(), byte_fallback(), cross_tokenizer_loss=loss)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "coverage" in h]
    assert logs and all(0.2 < h["coverage"] < 1.0 for h in logs)
    assert all(h["kd_loss"] > 0 for h in logs)


def test_different_tokenizers_without_cross_mode_are_still_an_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizers differ"):
        _trainer(tmp_path, byte_level(), byte_fallback())


def test_cache_from_another_tokenizer_is_refused(tmp_path):
    from kdkit.hf import dump_lm_teacher

    teacher_tok = byte_fallback()
    samples = _texts_file(tmp_path, teacher_tok)
    cache = tmp_path / "cache"
    dump_lm_teacher(tiny_llama(1, vocab=len(teacher_tok)), samples, cache, tokenizer=teacher_tok)
    from transformers import TrainingArguments

    from kdkit.hf import DistillationTrainer

    student_tok = byte_level()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="was made with another tokenizer"):
        DistillationTrainer(
            tiny_llama(1, vocab=len(student_tok)),
            args,
            teacher_cache=cache,
            processing_class=student_tok,
        )
    # the tokenizer that made it passes the check (then the data check runs as before)
    DistillationTrainer(
        tiny_llama(1, vocab=len(teacher_tok)),
        args,
        teacher_cache=cache,
        processing_class=teacher_tok,
        train_dataset=samples,
    )


def _cli_setup(tmp_path):
    import json

    teacher_dir = tmp_path / "teacher"
    tok = byte_level()
    tiny_llama(1, vocab=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:4]), encoding="utf-8")
    return teacher_dir, data


def test_cli_teacher_tokenizer_that_cannot_be_loaded(tmp_path, capsys):
    from kdkit.cli import main

    teacher_dir, data = _cli_setup(tmp_path)
    (tmp_path / "empty").mkdir()
    argv = ["distill-lm", "--data", str(data), "--teacher_model", str(teacher_dir)]
    argv += ["--student_from_teacher", "1", "--teacher_tokenizer", str(tmp_path / "empty")]
    argv += ["--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--teacher_tokenizer" in err and "not a loadable" in err


def test_cli_cross_tokenizer_run(tmp_path, capsys, one_torch_thread):
    from kdkit.cli import main

    teacher_dir, data = _cli_setup(tmp_path)
    student_dir = tmp_path / "student"
    other = byte_fallback()
    tiny_llama(1, vocab=len(other), seed=4).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    argv = ["distill-lm", "--data", str(data), "--teacher_model", str(teacher_dir)]
    argv += ["--student_model", str(student_dir), "--teacher_tokenizer", str(teacher_dir)]
    argv += [
        "--cross_tokenizer_loss",
        "uld",
        "--max_steps",
        "1",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    assert "finished" in capsys.readouterr().out
