"""``kdkit dump-teacher --data``: Hugging Face causal-LM teachers cached from the command line.

The CLI cache is byte for byte the one of :func:`kdkit.hf.dump_lm_teacher` on the same
samples, is read by ``distill-lm --cache`` on the same data, cuts padded vocabularies
before capture, resumes and extends, and is the same under torchrun (2 ranks).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.cli import main
from torchrun_testing import run_torchrun

pytest.importorskip("transformers")

from hf_testing import VOCAB, lm_samples, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
PADDED = 64  # output rows of a padded teacher; its real vocabulary is VOCAB (48)


def _data(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ids(tmp_path, n=8, name="train.jsonl"):
    return _data(tmp_path, [{"input_ids": s["input_ids"]} for s in lm_samples(n)], name)


def _save(model, path):
    model.save_pretrained(path)
    return path


def _files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def _word_tokenizer(size=VOCAB):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", *(f"w{i}" for i in range(size - 2))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def _dump(data, cache, *teachers, extra=()):
    argv = ["dump-teacher", "--data", str(data), "--cache", str(cache), "--no-progress"]
    for spec in teachers:
        argv += ["--teacher", spec]
    return main([*argv, *extra])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "a": _save(tiny_llama(2, seed=1), root / "a"),
        "b": _save(tiny_llama(1, seed=4), root / "b"),
        "padded": _save(tiny_llama(2, vocab=PADDED, seed=5), root / "padded"),
    }


@pytest.mark.parametrize("case", ["dense", "top_k", "two_teachers"])
def test_cli_dump_is_the_python_dump(tmp_path, dirs, case, capsys, one_torch_thread):
    from kdkit.cache import load_cached_logits
    from kdkit.hf import dump_lm_teacher, lm_cache_key, load_lm_data

    data = _ids(tmp_path)
    samples = load_lm_data(data, max_length=512)
    if case == "dense":
        specs, extra, teachers, top_k = [f"a={dirs['a']}"], [], _load(dirs["a"]), None
    elif case == "top_k":
        specs, extra, teachers, top_k = [f"a={dirs['a']}"], ["--top_k", "6"], _load(dirs["a"]), 6
    else:
        specs = [f"a={dirs['a']}", f"b={dirs['b']}"]
        extra, top_k = ["--top_k", "b=5"], {"b": 5}
        teachers = {"a": _load(dirs["a"]), "b": _load(dirs["b"])}
    assert _dump(data, tmp_path / "cli", *specs, extra=extra) == 0
    assert "cached 8 sequences" in capsys.readouterr().out
    dump_lm_teacher(teachers, samples, tmp_path / "py", name="a", top_k=top_k)
    assert _files(tmp_path / "cli") == _files(tmp_path / "py")
    # and the values are the teacher's (not merely the same in both)
    keys = [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples]
    with torch.no_grad():
        want = _load(dirs["a"])(input_ids=torch.tensor([samples[3]["input_ids"]])).logits[0]
    got = load_cached_logits(keys[3:4], tmp_path / "cli", "a")
    n = len(samples[3]["input_ids"])
    if case == "top_k":
        top = torch.log_softmax(want, -1).topk(6, -1)
        assert torch.equal(got.indices[0, :n].sort(-1).values, top.indices.sort(-1).values)
    else:
        torch.testing.assert_close(got[0, :n], want, rtol=1e-3, atol=2e-3)  # float16 storage
    if case == "two_teachers":
        b = load_cached_logits(keys[:2], tmp_path / "cli", "b")
        assert b.indices.shape[-1] == 5


def test_cli_cache_is_read_by_distill_lm_on_the_same_data(tmp_path, dirs, capsys, one_torch_thread):
    data = _ids(tmp_path)
    assert _dump(data, tmp_path / "cache", f"t={dirs['a']}", extra=["--top_k", "8"]) == 0
    config_json = tmp_path / "student.json"
    config_json.write_text(json.dumps(tiny_llama(1).config.to_dict()))
    argv = ["distill-lm", "--data", str(data), "--cache", str(tmp_path / "cache")]
    argv += ["--student_config", str(config_json), "--max_steps", "2", "--temperature", "1"]
    capsys.readouterr()
    assert main([*argv, "--output_dir", str(tmp_path / "s")]) == 0
    assert "train_loss" in capsys.readouterr().out
    assert (tmp_path / "s" / "model.safetensors").is_file()
    # another --max_length splits the sequences into other blocks: refused before training
    from kdkit.hf import load_lm_data

    blocks = load_lm_data(data, max_length=4)
    new = sum(1 for s in blocks if "#" in s["sample_id"])
    assert main([*argv, "--max_length", "4", "--output_dir", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"does not match the training data: of {len(blocks)} " in err
    assert f"{new} missing from the cache" in err and "same --max_length" in err
    assert not (tmp_path / "s2" / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["vocab_size_dense", "vocab_size_top_k", "tokenizer_top_k"])
def test_padded_teacher_is_cut_to_the_real_vocabulary(
    tmp_path, dirs, case, caplog, one_torch_thread
):
    from kdkit.cache import load_cache_index, load_cached_logits
    from kdkit.hf import lm_cache_key, load_lm_data

    teacher = tmp_path / "teacher"
    _save(_load(dirs["padded"]), teacher)
    extra = [] if case.endswith("dense") else ["--top_k", "5"]
    if case.startswith("tokenizer"):
        _word_tokenizer().save_pretrained(teacher)  # 48 tokens, 64 output rows
    else:
        extra += ["--vocab_size", str(VOCAB)]
    data = _ids(tmp_path)
    with caplog.at_level(logging.INFO, logger="kdkit.hf"):
        assert _dump(data, tmp_path / "cache", f"t={teacher}", extra=extra) == 0
    cut = [r for r in caplog.records if "padded vocabulary" in r.getMessage()]
    assert len(cut) == 1 and f"real vocabulary {VOCAB}" in cut[0].getMessage()
    index = load_cache_index(tmp_path / "cache")
    assert index.teacher_num_classes == {"t": VOCAB}
    samples = load_lm_data(data, max_length=512)
    keys = [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples]
    got = load_cached_logits(keys, index)
    model = _load(dirs["padded"])
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
        assert logits.shape[-1] == PADDED
        real = torch.log_softmax(logits[:, :VOCAB], -1)  # the reference, by hand
        if case.endswith("dense"):
            torch.testing.assert_close(got[i, :n], logits[:, :VOCAB], rtol=1e-3, atol=2e-3)
            continue
        assert int(got.indices[i, :n].max()) < VOCAB
        top = real.topk(5, -1)
        order = got.indices[i, :n].argsort(-1)
        indices = got.indices[i, :n].gather(-1, order)
        logprobs = got.logprobs[i, :n].float().gather(-1, order)
        want_order = top.indices.argsort(-1)
        assert torch.equal(indices, top.indices.gather(-1, want_order))
        torch.testing.assert_close(
            logprobs, top.values.gather(-1, want_order), rtol=2e-3, atol=2e-3
        )
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
        torch.testing.assert_close(got.tail_logprob[i, :n].float(), tail, rtol=2e-3, atol=2e-3)
        mass = got.logprobs[i, :n].float().exp().sum(-1) + got.tail_logprob[i, :n].float().exp()
        torch.testing.assert_close(mass, torch.ones(n), rtol=0, atol=3e-3)


def test_rerun_resumes_unchanged_and_extends_when_the_data_grows(
    tmp_path, dirs, capsys, one_torch_thread
):
    from kdkit.hf import dump_lm_teacher, load_lm_data

    spec, extra = f"t={dirs['a']}", ["--top_k", "4", "--batch_size", "3"]
    small, full = _ids(tmp_path, 5, "small.jsonl"), _ids(tmp_path, 8, "full.jsonl")
    assert _dump(small, tmp_path / "cache", spec, extra=extra) == 0
    before = _files(tmp_path / "cache")
    assert _dump(small, tmp_path / "cache", spec, extra=extra) == 0
    after = _files(tmp_path / "cache")
    manifests = [json.loads(f.pop("manifest.json")) for f in (before, after)]
    assert after == before  # no data file rewritten
    assert manifests[1].pop("generation") == manifests[0].pop("generation") + 1  # see report
    assert manifests[1] == manifests[0]
    assert _dump(full, tmp_path / "cache", spec, extra=extra) == 0
    assert "cached 8 sequences" in capsys.readouterr().out.splitlines()[-1]
    # byte for byte the Python dumps of the same three steps
    model = _load(dirs["a"])
    for path in (small, small, full):
        dump_lm_teacher(model, load_lm_data(path), tmp_path / "py", name="t", top_k=4, batch_size=3)
    grown = _files(tmp_path / "cache")
    assert grown == _files(tmp_path / "py")
    assert json.loads(grown["manifest.json"])["generation"] == 3


def test_text_records_use_the_first_teachers_tokenizer(tmp_path, dirs, one_torch_thread):
    from kdkit.hf import dump_lm_teacher

    teacher = _save(_load(dirs["a"]), tmp_path / "teacher")
    tokenizer = _word_tokenizer()
    tokenizer.save_pretrained(teacher)
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9", "w40 w2"]
    data = _data(tmp_path, [{"text": t} for t in texts])
    assert _dump(data, tmp_path / "cli", f"t={teacher}", extra=["--max_length", "4"]) == 0
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert ids[0] == [3, 4, 5, 6, 7, 8]  # w<i> is id i + 2
    samples = [
        {"input_ids": [3, 4, 5, 6], "sample_id": "1#0"},
        {"input_ids": [7, 8], "sample_id": "1#1"},
        {"input_ids": ids[1], "sample_id": "2"},
        {"input_ids": ids[2], "sample_id": "3"},
    ]
    dump_lm_teacher(_load(dirs["a"]), samples, tmp_path / "py", name="t", tokenizer=tokenizer)
    assert _files(tmp_path / "cli") == _files(tmp_path / "py")


BAD = [
    ("missing_dir", "--teacher t: '{tmp}/nope' is not a directory (no such path)"),
    ("hub_id", "--teacher t: 'meta-llama/Llama-3.2-1B' is not a local directory; it looks"),
    ("not_a_model", "--teacher t='{tmp}/empty' is not a loadable causal LM directory"),
    ("no_input_ids", "bad.jsonl:1: a record needs 'input_ids' (token ids) or 'text'"),
    ("text_without_tokenizer", "text.jsonl:1: a 'text' record needs a tokenizer (--tokenizer"),
    ("missing_data", "--data '{tmp}/none.jsonl' is not a file"),
    ("missing_tokenizer", "--tokenizer '{tmp}/tok' is not a directory (no such path)"),
    ("both_modes", "give exactly one data source: --manifest FILE"),
    ("model_with_data", "--model, --split cannot be used with --data"),
    ("fused_with_data", "--checkpoint, --fused cannot be used with --data"),
    ("lm_flags_with_manifest", "--max_length, --vocab_size cannot be used with --manifest"),
    ("vocab_too_large", "vocab_size 49 is larger than the output rows of teacher(s) {{'t': 48}}"),
    ("different_vocabularies", "the teachers have different vocabularies (output classes"),
    ("temperature_without_top_k", "--capture_temperature applies to sparse teachers"),
    ("top_k_above_vocab", "top_k for teacher 't' must be <= its 48 classes, got 49"),  # #26 low
    ("top_k_unknown_teacher", "--top_k names teachers that are not given: ['zz']"),
]


@pytest.mark.parametrize("case, message", BAD, ids=[c for c, _ in BAD])
def test_bad_input_one_line_exit_2(tmp_path, dirs, capsys, case, message):
    data, teachers, extra = _ids(tmp_path), [f"t={dirs['a']}"], []
    if case == "missing_dir":
        teachers = [f"t={tmp_path / 'nope'}"]
    elif case == "hub_id":
        teachers = ["t=meta-llama/Llama-3.2-1B"]
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        teachers = [f"t={tmp_path / 'empty'}"]
    elif case == "no_input_ids":
        data = _data(tmp_path, [{"tokens": [1, 2]}], "bad.jsonl")
    elif case == "text_without_tokenizer":
        data = _data(tmp_path, [{"text": "w1 w2"}], "text.jsonl")
    elif case == "missing_data":
        data = tmp_path / "none.jsonl"
    elif case == "missing_tokenizer":
        extra = ["--tokenizer", str(tmp_path / "tok")]
    elif case == "both_modes":
        extra = ["--manifest", str(data)]
    elif case == "model_with_data":
        extra = ["--model", "kdkit.models:mlp", "--split", "train"]
    elif case == "fused_with_data":
        extra = ["--fused", "f=t,t", "--checkpoint", "last"]
    elif case == "vocab_too_large":
        extra = ["--vocab_size", str(VOCAB + 1)]
    elif case == "different_vocabularies":
        teachers.append(f"p={dirs['padded']}")
    elif case == "temperature_without_top_k":
        extra = ["--capture_temperature", "2"]
    elif case == "top_k_above_vocab":
        extra = ["--top_k", str(VOCAB + 1)]
    elif case == "top_k_unknown_teacher":
        extra = ["--top_k", "zz=2"]
    if case == "lm_flags_with_manifest":
        argv = ["dump-teacher", "--manifest", str(data), "--teacher", teachers[0]]
        argv += ["--cache", str(tmp_path / "cache"), "--max_length", "4", "--vocab_size", "9"]
        assert main(argv) == 2
    else:
        assert _dump(data, tmp_path / "cache", *teachers, extra=extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdkit dump-teacher: error: "), err
    assert message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "cache").exists()


def test_missing_extra_is_said_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # simulates "not installed"
    argv = ["dump-teacher", "--data", "x.jsonl", "--teacher", f"t={tmp_path}"]
    assert main([*argv, "--cache", str(tmp_path / "cache")]) == 1
    assert capsys.readouterr().err == (
        "kdkit dump-teacher --data needs transformers: pip install 'kdkit[hf]'\n"
    )
    assert not (tmp_path / "cache").exists()


TORCHRUN_TIMEOUT = 180.0


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m kdkit ARGS`` (gloo, CPU)."""
    return run_torchrun(["-m", "kdkit", *args], TORCHRUN_TIMEOUT)


def test_torchrun_two_ranks_dump_equals_one_process(tmp_path, dirs, one_torch_thread):
    data = _ids(tmp_path)
    specs = ["--teacher", f"a={dirs['a']}", "--teacher", f"b={dirs['b']}"]
    argv = ["dump-teacher", "--data", str(data), *specs, "--top_k", "b=4", "--batch_size", "2"]
    result = _torchrun([*argv, "--cache", str(tmp_path / "sharded"), "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cached 8 sequences") == 1  # rank 0 reports
    assert main([*argv, "--cache", str(tmp_path / "single"), "--no-progress"]) == 0
    single = _files(tmp_path / "single")
    assert len(single) > 1 and _files(tmp_path / "sharded") == single
