"""``kdkit distill-lm`` on-policy flags: derived from OnPolicyConfig, one-line errors."""

from __future__ import annotations

import json

import pytest

from kdkit.cli import main

pytest.importorskip("transformers")

from hf_testing import lm_samples, tiny_llama
from test_hf_cli import WORDS, _word_tokenizer


@pytest.fixture
def teacher_dir(tmp_path):
    path = tmp_path / "teacher"
    tiny_llama(2, seed=1).save_pretrained(path)
    return path


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [
        {"input_ids": s["input_ids"], "prompt_length": max(1, len(s["input_ids"]) // 2)}
        for s in lm_samples(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_on_policy_end_to_end(tmp_path, teacher_dir, capsys, one_torch_thread):
    out = tmp_path / "student"
    data = str(_prompts(tmp_path))
    argv = ["distill-lm", "--data", data, "--eval_data", data]
    argv += ["--teacher_model", str(teacher_dir), "--student_from_teacher", "2"]
    argv += ["--loss_type", "jsd", "--jsd_beta", "0.9", "--kd_alpha", "1", "--max_steps", "2"]
    argv += ["--on_policy_fraction", "0.5", "--max_new_tokens", "3"]
    argv += ["--sampling_temperature", "0.8", "--top_p", "0.9", "--temperature", "1"]
    argv += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    argv += ["--output_dir", str(out), "--logging_steps", "1"]
    assert main(argv) == 0
    assert "eval_perplexity" in capsys.readouterr().out
    saved = json.loads((out / "kdkit_config.json").read_text())
    assert saved["on_policy"] == {
        "on_policy_fraction": 0.5,
        "seq_kd": False,
        "max_new_tokens": 3,
        "sampling_temperature": 0.8,
        "top_p": 0.9,
    }


def test_seq_kd_on_text_prompts(tmp_path, teacher_dir, one_torch_thread):
    _word_tokenizer(WORDS).save_pretrained(teacher_dir)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "w1 w2 w3"}\n{"prompt": "w4", "completion": "w5 w6"}\n')
    argv = ["distill-lm", "--data", str(data), "--teacher_model", str(teacher_dir)]
    argv += ["--student_from_teacher", "2", "--seq_kd", "--max_new_tokens", "2"]
    argv += ["--max_steps", "1", "--output_dir", str(tmp_path / "s")]
    assert main(argv) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--on_policy_fraction", "1.5"], "on_policy_fraction must be a number in [0, 1], got 1.5"),
        (["--on_policy_fraction", "-1"], "on_policy_fraction must be a number in [0, 1], got -1.0"),
        (["--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["--sampling_temperature", "0"], "sampling_temperature must be a finite number > 0"),
        (["--top_p", "0"], "top_p must be a number in (0, 1], got 0.0"),
        (["--top_p", "2"], "top_p must be a number in (0, 1], got 2.0"),
        (["--seq_kd", "--cache", "{tmp}"], "give exactly one teacher source"),
        (
            ["--on_policy_fraction", "1", "--no_prompts"],
            "plain.jsonl:1: on-policy data needs prompt_length",
        ),
    ],
)
def test_bad_on_policy_input_one_line_exit_2(tmp_path, teacher_dir, capsys, extra, message):
    data = str(_prompts(tmp_path))
    if "--no_prompts" in extra:
        extra = [e for e in extra if e != "--no_prompts"]
        plain = tmp_path / "plain.jsonl"
        plain.write_text('{"input_ids": [3, 4, 5]}\n')
        data = str(plain)
    extra = [e.format(tmp=tmp_path) for e in extra]
    argv = ["distill-lm", "--data", data, "--teacher_model", str(teacher_dir)]
    argv += ["--student_from_teacher", "2", *extra, "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdkit distill-lm: error: ")
    assert message in err
    assert not (tmp_path / "out").exists()


def test_on_policy_with_a_cache_is_refused_in_one_line(tmp_path, capsys):
    argv = ["distill-lm", "--data", str(_prompts(tmp_path)), "--cache", str(tmp_path)]
    argv += ["--student_config", str(tmp_path / "x.json"), "--on_policy_fraction", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--on_policy_fraction/--seq_kd need a live teacher" in err
