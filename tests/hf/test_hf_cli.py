"""``kdkit distill-lm``: local directories only, one-line errors with exit status 2."""

from __future__ import annotations

import json
import sys

import pytest

from kdkit.cli import main

pytest.importorskip("transformers")

from hf_testing import VOCAB, lm_samples, tiny_llama


@pytest.fixture
def teacher_dir(tmp_path):
    path = tmp_path / "teacher"
    tiny_llama(2, seed=1).save_pretrained(path)
    return path


def _data(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ids(tmp_path):
    return _data(tmp_path, [{"input_ids": s["input_ids"]} for s in lm_samples(8)])


def test_distill_lm_end_to_end(tmp_path, teacher_dir, capsys, one_torch_thread):
    out = tmp_path / "student"
    argv = ["distill-lm", "--data", str(_ids(tmp_path)), "--eval_data", str(_ids(tmp_path))]
    argv += ["--teacher_model", str(teacher_dir), "--student_from_teacher", "2"]
    argv += ["--temperature", "2", "--kd_alpha", "0.5", "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    argv += ["--output_dir", str(out), "--logging_steps", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eval_perplexity" in printed and str(out) in printed
    saved = json.loads((out / "kdkit_config.json").read_text())
    assert saved["kd"]["temperature"] == 2.0 and saved["student_from_teacher"] == 2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def _word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def test_text_data_with_the_teachers_tokenizer(tmp_path, teacher_dir, one_torch_thread):
    _word_tokenizer(WORDS).save_pretrained(teacher_dir)
    data = _data(tmp_path, [{"text": "w1 w2 w3 w4 w5"}, {"text": "w7 w8 w9"}])
    config_json = tmp_path / "student.json"
    config = tiny_llama(1).config.to_dict()
    config_json.write_text(json.dumps(config))
    argv = ["distill-lm", "--data", str(data), "--teacher_model", str(teacher_dir)]
    argv += ["--student_config", str(config_json), "--max_steps", "1"]
    argv += ["--output_dir", str(tmp_path / "s")]
    assert main(argv) == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dir", "--teacher_model '{tmp}/nope' is not a directory (no such path)"),
        ("hub_id", "looks like a Hugging Face hub id"),
        ("no_input_ids", "a record needs 'input_ids' (token ids) or 'text'"),
        ("text_without_tokenizer", "a 'text' record needs a tokenizer (--tokenizer DIR)"),
        ("two_teachers", "give exactly one teacher source"),
        ("no_student", "give exactly one student"),
        ("bad_kd", "KDLossConfig.temperature must be a finite number > 0"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, teacher_dir, capsys, case, message):
    teacher, data = str(teacher_dir), str(_ids(tmp_path))
    student = ["--student_from_teacher", "2"]
    extra: list[str] = []
    if case == "missing_dir":
        teacher = str(tmp_path / "nope")
    elif case == "hub_id":
        teacher = "meta-llama/Llama-3.2-1B"
    elif case == "no_input_ids":
        data = str(_data(tmp_path, [{"tokens": [1, 2]}], "bad.jsonl"))
    elif case == "text_without_tokenizer":
        data = str(_data(tmp_path, [{"text": "hello"}], "text.jsonl"))
    elif case == "two_teachers":
        extra = ["--cache", str(tmp_path)]
    elif case == "no_student":
        student = []
    elif case == "bad_kd":
        extra = ["--temperature", "-1"]
    argv = ["distill-lm", "--data", data, "--teacher_model", teacher, *student, *extra]
    argv += ["--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdkit distill-lm: error: ")
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_missing_extra_is_said_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # simulates "not installed"
    argv = ["distill-lm", "--data", "x.jsonl", "--teacher_model", str(tmp_path)]
    assert main([*argv, "--student_from_teacher", "2"]) == 1
    assert capsys.readouterr().err == (
        "kdkit distill-lm needs accelerate: pip install 'kdkit[hf]'\n"
    )


def test_student_dir_with_another_tokenizer_fails_before_training(tmp_path, teacher_dir, capsys):
    _word_tokenizer(WORDS).save_pretrained(teacher_dir)
    student_dir = tmp_path / "student_model"
    tiny_llama(1, seed=3).save_pretrained(student_dir)
    _word_tokenizer(list(reversed(WORDS))).save_pretrained(student_dir)
    argv = ["distill-lm", "--data", str(_ids(tmp_path)), "--teacher_model", str(teacher_dir)]
    argv += ["--student_model", str(student_dir), "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()  # save_pretrained's progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher and student tokenizers differ on" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_distill_lm_from_a_top_k_cache(tmp_path, capsys, one_torch_thread):
    from kdkit.hf import dump_lm_teacher, load_lm_data

    data = _ids(tmp_path)
    samples = load_lm_data(data)
    dump_lm_teacher(tiny_llama(2, seed=1), samples, tmp_path / "cache", top_k=8)
    dump_lm_teacher(tiny_llama(2, seed=1), samples[:5], tmp_path / "small", top_k=8)
    config_json = tmp_path / "student.json"
    config_json.write_text(json.dumps(tiny_llama(1).config.to_dict()))
    argv = ["distill-lm", "--data", str(data), "--student_config", str(config_json)]
    argv += ["--max_steps", "1", "--temperature", "1"]
    out = str(tmp_path / "s")
    assert main([*argv, "--cache", str(tmp_path / "cache"), "--output_dir", out]) == 0
    capsys.readouterr()
    assert main([*argv, "--cache", str(tmp_path / "small"), "--output_dir", out + "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "of 8 samples, 3 missing from the cache" in err


def test_a_top_k_cache_at_another_temperature_needs_retemper(
    tmp_path, capsys, monkeypatch, one_torch_thread
):
    """Captured at T = 1, trained at T = 2: exit 2 with the loss's message before any
    training step; --retemper (and --sparse_tail) reach the loss."""
    from kdkit.hf import DistillationTrainer, dump_lm_teacher, load_lm_data

    data = _ids(tmp_path)
    dump_lm_teacher(tiny_llama(2, seed=1), load_lm_data(data), tmp_path / "cache", top_k=8)
    config_json = tmp_path / "student.json"
    config_json.write_text(json.dumps(tiny_llama(1).config.to_dict()))
    argv = ["distill-lm", "--data", str(data), "--student_config", str(config_json)]
    argv += ["--max_steps", "1", "--temperature", "2", "--cache", str(tmp_path / "cache")]
    steps = []
    original = DistillationTrainer.compute_loss

    def counted(self, *args, **kwargs):
        steps.append((self.retemper, self.sparse_tail))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "compute_loss", counted)
    assert main([*argv, "--output_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from the sparse teacher's capture temperature" in err
    assert steps == []  # refused before training
    out = str(tmp_path / "b")
    assert main([*argv, "--retemper", "--sparse_tail", "renormalize", "--output_dir", out]) == 0
    assert steps and set(steps) == {(True, "renormalize")}
