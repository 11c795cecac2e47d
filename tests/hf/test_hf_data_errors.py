"""Bad token sequences in ``dump-teacher --data`` and ``distill-lm`` (#26 items 9 and Low):
one line naming ``--data``, the line and the problem, exit 2; one-token records warned."""

from __future__ import annotations

import json

import pytest

from kdkit.cli import main

pytest.importorskip("transformers")

from hf_testing import VOCAB, tiny_llama


@pytest.fixture
def teacher_dir(tmp_path):
    path = tmp_path / "teacher"
    tiny_llama(2, seed=1).save_pretrained(path)
    return path


def _data(tmp_path, records):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


BAD = {
    "empty": ([{"input_ids": [1, 2, 3]}, {"input_ids": []}], ":2: empty token sequence"),
    "oov": ([{"input_ids": [1, 2, 3]}, {"input_ids": [1, VOCAB + 5]}], "sample '2'"),
}


def _argv(command, data, teacher_dir, tmp_path):
    if command == "dump":
        cache = str(tmp_path / "cache")
        return ["dump-teacher", "--data", data, "--teacher", f"t={teacher_dir}", "--cache", cache]
    out = str(tmp_path / "out")
    argv = ["distill-lm", "--data", data, "--teacher_model", str(teacher_dir)]
    return [*argv, "--student_from_teacher", "2", "--max_steps", "1", "--output_dir", out]


@pytest.mark.parametrize("command", ["dump", "distill"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_token_sequences_one_line_exit_2(tmp_path, teacher_dir, capsys, command, case):
    records, text = BAD[case]
    data = _data(tmp_path, records)
    assert main(_argv(command, data, teacher_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and text in err, err
    if case == "oov":
        assert f"token id {VOCAB + 5}" in err


def test_vocab_size_smaller_than_the_data_ids_is_refused_at_dump_time(
    tmp_path, teacher_dir, capsys
):
    data = _data(tmp_path, [{"input_ids": [1, 2, 40]}])
    argv = [*_argv("dump", data, teacher_dir, tmp_path), "--vocab_size", "20"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab_size 20" in err and "token id 40" in err


def test_one_token_records_warn_once_with_the_count(tmp_path):
    from kdkit.hf.data import load_lm_data

    path = _data(tmp_path, [{"input_ids": [1]}, {"input_ids": [1, 2]}, {"input_ids": [3]}])
    with pytest.warns(UserWarning, match="2 one-token record") as record:
        load_lm_data(path)
    assert len(record) == 1


@pytest.mark.parametrize("loader", ["lm", "prompts"])
@pytest.mark.parametrize(
    "content, expected",
    [
        (
            b'{"input_ids": [1, 2], "prompt_length": 1}\n\xff\xfe\n',
            r"train\.jsonl:2: not UTF-8 text",
        ),
        (
            b'{"input_ids": [1, 2], "prompt_length": 1}\n[1, 2]\n',
            r"train\.jsonl:2: each line must be a JSON object",
        ),
        (b'{"input_ids": [1, 2], "prompt_length": 1}\n{bad\n', r"train\.jsonl:2: not valid JSON"),
    ],
)
def test_jsonl_errors_name_the_file_and_line_in_both_loaders(tmp_path, loader, content, expected):
    """LM data and prompt files share the core JSONL reader (kdkit.data.jsonl_objects):
    a non-UTF-8 line is one line naming file and line, not a raw codec error."""
    from kdkit.hf import load_lm_data
    from kdkit.hf.on_policy_data import load_prompt_data

    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    load = load_lm_data if loader == "lm" else load_prompt_data
    with pytest.raises(ValueError, match=expected):
        load(path, None)
