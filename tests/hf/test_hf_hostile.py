"""Reliability III (#22) items 3 and 5: ``kdkit.hf`` attacked as a careless or hostile user.

Data records with their own labels and masks, batches without targets, caches of another
teacher / dataset / tokenizer, model directories that ask to run code, interrupted and
concurrent runs.  Each case: a one-line error naming the argument, or the correct result.
The torchrun cases (a rank killed mid-way) live in ``test_hf_hostile_torchrun.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdkit.cli import main

pytest.importorskip("transformers")

from hf_testing import VOCAB, lm_samples, tiny_llama

MARKER = "kdkit_remote_code_ran"


def _data(tmp_path: Path, records: list[dict], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ids(tmp_path: Path, n: int = 8, name: str = "train.jsonl") -> Path:
    return _data(tmp_path, [{"input_ids": s["input_ids"]} for s in lm_samples(n)], name)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "teacher"
    tiny_llama(2, seed=1).save_pretrained(path)
    return path


def _distill(data: Path, teacher: Path, out: Path, *extra: str) -> int:
    argv = ["distill-lm", "--data", str(data), "--teacher_model", str(teacher)]
    argv += ["--student_from_teacher", "2", "--max_steps", "1", "--output_dir", str(out)]
    return main([*argv, *extra])


def _one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prefix), err
    return err


# --- records with their own labels / attention_mask ------------------------------------


def test_record_labels_and_mask_are_kept_and_split_into_blocks(tmp_path):
    """They used to be dropped silently: a prompt masked with -100 was trained on."""
    from kdkit.hf import CausalLMCollator, load_lm_data

    ids = [5, 6, 7, 8, 9]
    labels = [-100, -100, 7, 8, 9]
    mask = [1, 1, 1, 1, 0]
    path = _data(tmp_path, [{"input_ids": ids, "labels": labels, "attention_mask": mask}])
    (whole,) = load_lm_data(path)
    assert whole["labels"] == labels and whole["attention_mask"] == mask
    first, second = load_lm_data(path, max_length=3)
    assert (first["labels"], second["labels"]) == (labels[:3], labels[3:])
    assert (first["attention_mask"], second["attention_mask"]) == (mask[:3], mask[3:])
    batch = CausalLMCollator(0)([whole])
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100]]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"input_ids": [3, 4], "labels": [3]}, "labels must be 2 integers >= 0 or -100"),
        ({"input_ids": [3, 4], "labels": [3, -5]}, "labels must be 2 integers >= 0 or -100"),
        ({"input_ids": [3, 4], "labels": "x"}, "labels must be 2 integers"),
        ({"input_ids": [3, 4], "attention_mask": [1, 2]}, "attention_mask must be 2 0/1"),
        ({"text": "w1 w2", "labels": [1, 2]}, "labels needs input_ids"),
    ],
    ids=["labels-short", "labels-negative", "labels-string", "mask-not-binary", "text-labels"],
)
def test_bad_record_labels_or_mask_are_one_line_naming_the_line(tmp_path, record, message):
    from kdkit.hf import load_lm_data

    path = _data(tmp_path, [{"input_ids": [3, 4, 5]}, record])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: ") as info:
        load_lm_data(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_label_out_of_the_vocabulary_is_one_line_exit_2(tmp_path, teacher_dir, capsys):
    data = _data(tmp_path, [{"input_ids": [3, 4, 5], "labels": [3, 4, VOCAB + 3]}])
    assert _distill(data, teacher_dir, tmp_path / "out") == 2
    err = _one_line(capsys, "kdkit distill-lm: error: --data ")
    assert f"token id {VOCAB + 3}" in err


@pytest.mark.parametrize("kind", ["labels", "attention_mask", "one_token"])
def test_data_without_any_target_is_one_line_exit_2(tmp_path, teacher_dir, capsys, kind):
    """Decision (#22): a whole data file without targets is an error (it trained at loss 0
    for the whole run); a batch without targets is an exact 0 (next test)."""
    records = []
    for s in lm_samples(4):
        n = len(s["input_ids"])
        if kind == "labels":
            records.append({"input_ids": s["input_ids"], "labels": [-100] * n})
        elif kind == "attention_mask":
            records.append({"input_ids": s["input_ids"], "attention_mask": [1] + [0] * (n - 1)})
        else:
            records.append({"input_ids": s["input_ids"][:1]})
    assert _distill(_data(tmp_path, records), teacher_dir, tmp_path / "out") == 2
    err = _one_line(capsys, "kdkit distill-lm: error: --data ")
    assert "none of its 4 record(s) has a token to predict" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_records_without_targets_warn_with_their_count(tmp_path):
    from kdkit.hf import load_lm_data

    path = _data(tmp_path, [{"input_ids": [3, 4], "labels": [-100, -100]}, {"input_ids": [3, 4]}])
    with pytest.warns(UserWarning, match="1 record\\(s\\) have no target"):
        load_lm_data(path)


def test_batches_without_targets_are_an_exact_zero_and_change_nothing(tmp_path, one_torch_thread):
    """Labels all -100 / padding-only batches: loss 0, gradient 0, no NaN, weights kept."""
    from transformers import TrainingArguments

    from kdkit.hf import CausalLMCollator, DistillationTrainer

    samples = lm_samples(4)
    for s in samples[:2]:
        s["labels"] = [-100] * len(s["input_ids"])
    for s in samples[2:]:
        s["attention_mask"] = [0] * len(s["input_ids"])
    student = tiny_llama(1, seed=2)
    before = [p.detach().clone() for p in student.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        student,
        args,
        teacher=tiny_llama(2, seed=1),
        train_dataset=samples,
        data_collator=CausalLMCollator(0),
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "ce_loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert (log["loss"], log["ce_loss"], log["kd_loss"], log["grad_norm"]) == (0, 0, 0, 0)
    for p, q in zip(student.parameters(), before):
        assert torch.equal(p.detach(), q)


# --- model directories that ask to run code --------------------------------------------


def _remote_dir(root: Path, name: str, model_type: str | None, where: str = "config.json"):
    """A saved tiny Llama whose ``where`` asks for ``modeling_evil.py`` (which would write
    a marker file if it ever ran); ``model_type`` replaces the config's when given."""
    path = root / name
    tiny_llama(1, seed=3).save_pretrained(path)
    if where == "tokenizer_config.json":
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(path)
    config = json.loads((path / where).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    if where == "tokenizer_config.json":
        config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    if model_type is not None:
        config["model_type"] = model_type
    (path / where).write_text(json.dumps(config))
    code = f"open({str(root / MARKER)!r}, 'w').write('ran')\n"
    (path / "modeling_evil.py").write_text(code)
    (path / "tokenization_evil.py").write_text(code)
    return path


REMOTE = [
    ("custom-model-type", "evil", "config.json"),
    ("llama-with-auto-map", None, "config.json"),
    ("tokenizer-auto-map", None, "tokenizer_config.json"),
]


@pytest.mark.parametrize("case, model_type, where", REMOTE, ids=[c for c, _, _ in REMOTE])
@pytest.mark.parametrize("command", ["distill-lm", "dump-teacher"])
def test_a_directory_asking_for_code_is_refused_without_trust(
    tmp_path, capsys, command, case, model_type, where
):
    """transformers would prompt (and run the code on 'y') or silently load its own class
    of the same model_type; kdkit refuses in one line and never prompts."""
    remote = _remote_dir(tmp_path, "remote", model_type, where)
    data = _ids(tmp_path)
    capsys.readouterr()
    if command == "distill-lm":
        assert _distill(data, remote, tmp_path / "out") == 2
        label = f"--teacher_model {str(remote)!r}"
    else:
        argv = ["dump-teacher", "--data", str(data), "--teacher", f"t={remote}"]
        assert main([*argv, "--cache", str(tmp_path / "cache"), "--no-progress"]) == 2
        label = f"--teacher t={str(remote)!r}"
    err = _one_line(capsys, f"kdkit {command}: error: {label} asks to run its own code ")
    assert f"({where} auto_map: " in err and "--trust_remote_code" in err
    assert "[y/N]" not in err and not (tmp_path / MARKER).exists()


def test_trust_remote_code_is_passed_on_only_when_given(tmp_path, monkeypatch):
    import transformers

    from kdkit.hf.loading import check_remote_code, load_causal_lm

    remote = _remote_dir(tmp_path, "remote", None)
    check_remote_code(remote, "--teacher_model", True)  # trusted: no error
    seen: list[object] = []

    def fake(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return "model"

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    assert load_causal_lm(remote, "--teacher_model", trust_remote_code=True) == "model"
    plain = tmp_path / "plain"
    tiny_llama(1).save_pretrained(plain)
    assert load_causal_lm(plain, "--teacher_model") == "model"
    assert seen == [True, False] and not (tmp_path / MARKER).exists()


# --- caches of another teacher, dataset, tokenizer or vocabulary -----------------------


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


WORDS = [f"w{i}" for i in range(VOCAB - 2)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_models")
    made = {
        "t": tiny_llama(2, seed=1),
        "other": tiny_llama(2, seed=7),
        "wide": tiny_llama(2, vocab=VOCAB + 16, seed=7),
        "student": tiny_llama(1, seed=3),
    }
    for name, model in made.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in made}


def _dump(data: Path, cache: Path, *specs: str, extra: tuple[str, ...] = ()) -> int:
    argv = ["dump-teacher", "--data", str(data), "--cache", str(cache), "--no-progress"]
    for spec in specs:
        argv += ["--teacher", spec]
    return main([*argv, *extra])


def _from_cache(data: Path, cache: Path, student: Path, out: Path, *extra: str) -> int:
    argv = ["distill-lm", "--data", str(data), "--cache", str(cache)]
    argv += ["--student_model", str(student), "--max_steps", "1", "--output_dir", str(out)]
    return main([*argv, *extra])


CACHE_CASES = [
    ("another-teacher", "dump", 1, "teacher 't' has other weights than the one cached in"),
    ("another-vocabulary", "dump", 1, "holds teachers over {'t': 48} classes, but teacher(s)"),
    ("another-dataset", "distill", 2, "6 cached for other token sequences"),
    ("another-max-length", "distill", 2, "missing from the cache"),
    ("another-teacher-name", "distill", 2, "cache_teacher must be one of the cache's teachers"),
    ("wide-cache-no-tokenizer", "distill", 2, "the cached teacher 't' has 64 output classes"),
]


@pytest.mark.parametrize(
    "case, step, status, message", CACHE_CASES, ids=[c for c, *_ in CACHE_CASES]
)
def test_a_cache_that_does_not_match_is_refused_in_one_line(
    tmp_path, dirs, capsys, one_torch_thread, case, step, status, message
):
    data, cache = _ids(tmp_path, 6), tmp_path / "cache"
    teacher = dirs["wide"] if case == "wide-cache-no-tokenizer" else dirs["t"]
    assert _dump(data, cache, f"t={teacher}") == 0
    before = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    capsys.readouterr()
    out = tmp_path / "out"
    if case == "another-teacher":
        assert _dump(data, cache, f"t={dirs['other']}") == status
    elif case == "another-vocabulary":
        assert _dump(data, cache, f"u={dirs['wide']}") == status
    elif case == "another-dataset":
        other = _data(tmp_path, [{"input_ids": s["input_ids"]} for s in lm_samples(6, seed=5)])
        assert _from_cache(other, cache, dirs["student"], out) == status
    elif case == "another-max-length":
        assert _from_cache(data, cache, dirs["student"], out, "--max_length", "4") == status
    elif case == "another-teacher-name":
        assert _from_cache(data, cache, dirs["student"], out, "--teacher", "zz") == status
    else:
        assert _from_cache(data, cache, dirs["student"], out) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()} == before
    assert not (out / "model.safetensors").exists()


def test_a_cache_of_another_tokenizer_is_refused_even_on_the_same_ids(
    tmp_path, dirs, capsys, one_torch_thread
):
    """Tokenizer B splits this text like A (same ids, so every cache key matches) but
    differs elsewhere: the fingerprint next to the manifest refuses it."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for model, path, words in ((dirs["t"], teacher, WORDS), (dirs["student"], student, None)):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(model).save_pretrained(path)
        swapped = [*WORDS[:-2], WORDS[-1], WORDS[-2]]
        _word_tokenizer(words or swapped).save_pretrained(path)
    data = _data(tmp_path, [{"text": "w1 w2 w3 w4"}, {"text": "w5 w6 w7"}])
    assert _dump(data, tmp_path / "cache", f"t={teacher}") == 0
    capsys.readouterr()
    assert _from_cache(data, tmp_path / "cache", student, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was made with another tokenizer" in err, err


@pytest.mark.parametrize("source", ["live", "cache"])
def test_other_output_sizes_without_a_tokenizer_need_vocab_size(
    tmp_path, dirs, capsys, one_torch_thread, source
):
    """Decision (#22): distill-lm does not guess whether 64 vs 48 rows is padding."""
    data, out = _ids(tmp_path, 6), tmp_path / "out"
    if source == "live":
        argv = ["distill-lm", "--data", str(data), "--teacher_model", str(dirs["wide"])]
        argv += ["--student_model", str(dirs["student"]), "--max_steps", "1"]
        argv += ["--output_dir", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the teacher has 64 output classes and the student" in err
        assert main([*argv, "--vocab_size", str(VOCAB)]) == 0
    else:
        assert _dump(data, tmp_path / "cache", f"t={dirs['wide']}") == 0
        capsys.readouterr()
        assert _from_cache(data, tmp_path / "cache", dirs["student"], out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has 64 output classes and the student 48" in err
        # a dense cache cut to the student's vocabulary with --vocab_size trains
        extra = ("--vocab_size", str(VOCAB))
        assert _from_cache(data, tmp_path / "cache", dirs["student"], out, *extra) == 0
    assert (out / "model.safetensors").is_file()


# --- two runs on one output directory; interrupting and resuming a training run --------


def test_a_second_run_into_a_locked_output_dir_fails_at_once(tmp_path, teacher_dir, capsys):
    from kdkit._lock import directory_lock

    out = tmp_path / "out"
    with directory_lock(out, "distill-lm run"):  # another process's run, as far as flock sees
        assert _distill(_ids(tmp_path), teacher_dir, out) == 1
    err = _one_line(capsys, "kdkit distill-lm: error: ")
    assert f"pid {__import__('os').getpid()}" in err and "in use by another kdkit" in err
    assert not (out / "model.safetensors").exists()


def _train_argv(data: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    argv = ["distill-lm", "--data", str(data), "--teacher_model", str(teacher)]
    argv += ["--student_from_teacher", "2", "--per_device_train_batch_size", "2"]
    argv += ["--max_steps", "24", "--save_steps", "2", "--logging_steps", "50"]
    return [*argv, "--output_dir", str(out), *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, teacher_dir, one_torch_thread, sig
):
    import signal

    from hostile_testing import interrupt_when, kdkit_process

    data = _ids(tmp_path)
    assert main(_train_argv(data, teacher_dir, tmp_path / "whole")) == 0
    out = tmp_path / "cut"
    process = kdkit_process(_train_argv(data, teacher_dir, out))
    ready = lambda: (out / "checkpoint-2" / "trainer_state.json").is_file()  # noqa: E731
    sent, status, err = interrupt_when(process, ready, getattr(signal, sig))
    assert sent, f"the run ended before its first checkpoint: {err[-2000:]}"
    if sig == "SIGINT":
        assert status == 130 and "interrupted; resume with --resume" in err, err[-2000:]
    else:
        assert status == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    assert main(_train_argv(data, teacher_dir, out)) == 2  # checkpoints, no --resume
    if sig == "SIGKILL":  # and one killed while it was written: skipped with a warning
        import shutil

        last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        shutil.copytree(last, out / "checkpoint-1000")
        (out / "checkpoint-1000" / "trainer_state.json").write_text('{"global_st')
        with pytest.warns(UserWarning, match="checkpoint-1000' is incomplete"):
            assert main(_train_argv(data, teacher_dir, out, "--resume")) == 0
    else:
        assert main(_train_argv(data, teacher_dir, out, "--resume")) == 0
    whole, resumed = _weights(tmp_path / "whole"), _weights(out)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


RESUME_BAD = [
    ("no-checkpoint", (), "--resume: no checkpoint in --output_dir"),
    ("other-lr", ("--learning_rate", "1e-3"), "learning_rate: 0.0005 -> 0.001"),
    ("other-kd", ("--temperature", "3"), "kd: "),
    ("edited-data", (), "data_files: {'data': "),
]


@pytest.mark.parametrize("case, extra, message", RESUME_BAD, ids=[c for c, *_ in RESUME_BAD])
def test_resume_refuses_other_settings_and_a_run_without_checkpoints(
    tmp_path, teacher_dir, capsys, one_torch_thread, case, extra, message
):
    data, out = _ids(tmp_path), tmp_path / "out"
    argv = _train_argv(data, teacher_dir, out)
    argv[argv.index("--max_steps") + 1] = "2"
    if case == "no-checkpoint":
        argv[argv.index("--save_steps") + 1] = "0"
    assert main(argv) == 0
    capsys.readouterr()
    if case == "edited-data":  # the same file name, other records
        _data(tmp_path, [{"input_ids": s["input_ids"][::-1]} for s in lm_samples(8)])
    assert main([*argv, "--resume", *extra]) == 2
    err = _one_line(capsys, "kdkit distill-lm: error: --resume: ")
    assert message in err, err


# --- interrupting and resuming dump-teacher --data --------------------------------------


def _journal_chunks(cache: Path) -> int:
    try:
        return len(json.loads((cache / ".partial" / "journal.json").read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def _cache_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_an_interrupted_dump_resumes_to_the_uninterrupted_cache(
    tmp_path, teacher_dir, one_torch_thread, sig
):
    """Killed after its second committed chunk (of 25): the re-run adopts the committed
    chunks and the cache is byte for byte the one of an uninterrupted dump."""
    import signal

    from hostile_testing import interrupt_when, kdkit_process

    data = _ids(tmp_path, 200)
    extra = ("--top_k", "5", "--batch_size", "1", "--checkpoint_rows", "8")
    assert _dump(data, tmp_path / "whole", f"t={teacher_dir}", extra=extra) == 0
    cache = tmp_path / "cut"
    argv = ["dump-teacher", "--data", str(data), "--teacher", f"t={teacher_dir}"]
    process = kdkit_process([*argv, "--cache", str(cache), "--no-progress", *extra])
    sent, status, err = interrupt_when(
        process, lambda: _journal_chunks(cache) >= 2, getattr(signal, sig)
    )
    assert sent, f"the dump ended before its second chunk: {err[-2000:]}"
    if sig == "SIGINT":
        assert status == 130 and "interrupted; run the same command again" in err, err
    else:
        assert status == -signal.SIGKILL
    assert not (cache / "manifest.json").exists() and 2 <= _journal_chunks(cache) < 25
    assert _dump(data, cache, f"t={teacher_dir}", extra=extra) == 0
    assert _cache_files(cache) == _cache_files(tmp_path / "whole")
    assert not (cache / ".partial").exists()
