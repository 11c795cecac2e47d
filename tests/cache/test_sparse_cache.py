"""Sequences and sparse top-k teachers in the cache (issue 12): dump, read, resume, bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdkit import KDLossConfig, SparseLogits, compute_student_loss, kd_loss
from kdkit.cache import (
    TeacherLogitsDataset,
    dump_teacher_logits,
    load_cached_logits,
    verify_cache,
)
from kdkit.cli import main as cli_main
from kdkit.sparse import sparse_topk

L, V = 7, 40
KEYS = [f"docs/{i}.txt" for i in range(9)]


class TokenLM(nn.Module):
    def __init__(self, seed, vocab=V):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, vocab, generator=g) * 3)

    def forward(self, x):
        return self.embed(x)


def items(n=9, start=0, field="attention_mask"):
    out = []
    for i in range(start, start + n):
        ids = (torch.arange(L) * (i + 3)) % V
        length = i % L + 1
        item = {"input_ids": ids, "path": f"docs/{i}.txt"}
        if field == "attention_mask":
            item[field] = (torch.arange(L) < length).long()
        elif field == "lengths":
            item[field] = length
        out.append(item)
    return out


def _dump(d, teachers=None, data=None, **kw):
    teachers = teachers or {"big": TokenLM(0), "small": TokenLM(1)}
    kw.setdefault("top_k", {"big": 5})
    return dump_teacher_logits(
        teachers, data or items(), d, input_key="input_ids", progress=False, batch_size=4, **kw
    )


def test_sequence_dense_and_sparse_round_trip(tmp_path):
    teachers = {"big": TokenLM(0), "small": TokenLM(1)}
    index = _dump(tmp_path, teachers, capture_temperature=2.0)
    m = index.manifest
    assert m["format_version"] == 2 and index.is_sequence
    lengths = [i % L + 1 for i in range(9)]
    assert m["positions"]["num_positions"] == sum(lengths)
    assert index.lengths(KEYS).tolist() == lengths
    big = m["teachers"]["big"]
    assert (big["kind"], big["top_k"], big["index_dtype"], big["capture_temperature"]) == (
        "sparse",
        5,
        "uint16",
        2.0,
    )
    assert "kind" not in m["teachers"]["small"]  # dense entries keep the version 1 fields
    keys = ["docs/4.txt", "docs/0.txt", "docs/8.txt"]
    sp = load_cached_logits(keys, index, teacher="big")
    assert isinstance(sp, SparseLogits) and sp.keys == tuple(keys)
    assert sp.indices.shape == (3, 5, 5) and sp.indices.dtype == torch.int64
    assert sp.mask.sum(-1).tolist() == [5, 1, 2]
    assert (sp.vocab_size, sp.temperature) == (V, 2.0)
    dense = load_cached_logits(keys, index, teacher="small")
    assert dense.shape == (3, 5, V)
    for row, key in enumerate(keys):
        i = int(key.split("/")[1].split(".")[0])
        n = lengths[i]
        with torch.no_grad():
            y = teachers["big"](items()[i]["input_ids"])[:n]
            ref = sparse_topk(y, 5, 2.0)
            assert torch.equal(sp.indices[row, :n], ref.indices)
            torch.testing.assert_close(sp.logprobs[row, :n], ref.logprobs)
            torch.testing.assert_close(sp.tail_logprob[row, :n], ref.tail_logprob)
            # normalised over the full vocabulary, not over the kept K
            full = F.log_softmax(y / 2.0, -1).gather(-1, ref.indices)
            torch.testing.assert_close(sp.logprobs[row, :n], full)
            torch.testing.assert_close(
                dense[row, :n], teachers["small"](items()[i]["input_ids"])[:n]
            )
        assert not dense[row, n:].any()
    verify_cache(tmp_path)


def test_lengths_field_and_unmasked_sequences(tmp_path):
    a = _dump(tmp_path / "a", data=items(field="lengths"))
    b = _dump(tmp_path / "b", data=items())
    assert a.lengths(KEYS).tolist() == b.lengths(KEYS).tolist()
    c = _dump(tmp_path / "c", data=items(field=None))
    assert c.lengths(KEYS).tolist() == [L] * 9


def test_classification_sparse_has_no_position_axis(tmp_path):
    data = [{"features": torch.randn(4), "path": f"c{i}"} for i in range(6)]
    index = dump_teacher_logits(nn.Linear(4, 30), data, tmp_path, top_k=3, progress=False)
    assert index.manifest["format_version"] == 2 and not index.is_sequence
    sp = load_cached_logits(["c2", "c0"], index)
    assert sp.indices.shape == (2, 3) and sp.mask.shape == (2,) and sp.mask.all()


def test_dense_classification_cache_stays_version_1(tmp_path):
    data = [{"features": torch.randn(4), "path": f"c{i}"} for i in range(6)]
    index = dump_teacher_logits(nn.Linear(4, 3), data, tmp_path, progress=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format_version"] == 1 and "positions" not in m
    assert set(m["teachers"]["teacher"]) == {"file", "num_classes", "dtype", "fingerprint", "fused"}
    assert load_cached_logits(["c1"], index).shape == (1, 3)


def test_index_dtype_and_value_dtype_chosen_to_fit(tmp_path):
    big_v = 70000
    data = [{"features": torch.randn(3), "path": f"c{i}"} for i in range(4)]
    index = dump_teacher_logits(
        nn.Linear(3, big_v), data, tmp_path, top_k=2, dtype="float16", progress=False
    )
    info = index.manifest["teachers"]["teacher"]
    assert (info["index_dtype"], info["dtype"]) == ("int32", "float16")
    size = index.manifest["files"][info["file"]]["bytes"]
    assert size == 4 * (2 * 4 + 2 * 2 + 4)
    sp = load_cached_logits(["c3"], index)
    assert sp.indices.dtype == torch.int64 and sp.logprobs.dtype == torch.float32
    assert int(sp.indices.max()) < big_v


def test_dataset_and_dataloader_workers(tmp_path):
    _dump(tmp_path)
    ds = TeacherLogitsDataset(items(), tmp_path, teacher="big")
    item = ds[3]
    assert isinstance(item["teacher_logits"], SparseLogits)
    assert item["teacher_logits"].indices.shape == (4, 5)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate_fn)
    seen = 0
    for batch in loader:
        t = batch["teacher_logits"]
        assert torch.equal(t.mask.sum(-1), batch["attention_mask"].sum(-1))
        direct = load_cached_logits(batch["path"], tmp_path, teacher="big")
        assert torch.equal(t.indices[t.mask], direct.indices[direct.mask])
        seen += len(batch["path"])
    assert seen == 9
    dense = TeacherLogitsDataset(items(), tmp_path, teacher="small")
    batch = next(iter(DataLoader(dense, batch_size=3, collate_fn=dense.collate_fn)))
    assert batch["teacher_logits"].shape == (3, 3, V)


def test_training_step_on_a_sparse_cache(tmp_path):
    _dump(tmp_path)
    student = TokenLM(5)
    ds = TeacherLogitsDataset(items(), tmp_path, teacher="big")
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn)))
    x, mask = batch["input_ids"], batch["attention_mask"].bool()
    t = batch["teacher_logits"]
    logits = student(x)[:, : t.mask.shape[1]]
    targets = torch.where(mask, x, -100)[:, : t.mask.shape[1]]
    loss, stats = compute_student_loss(logits, t, targets, KDLossConfig(temperature=1.0))
    loss.backward()
    assert student.embed.weight.grad is not None and math.isfinite(stats["kd_loss"])


def test_resume_append_and_new_teacher(tmp_path):
    teachers = {"big": TokenLM(0), "small": TokenLM(1)}
    full = _dump(tmp_path / "full", teachers, data=items(12))
    part = tmp_path / "part"
    _dump(part, teachers, data=items(5))
    grown = _dump(part, teachers, data=items(12))
    assert grown.num_samples == 12 and grown.manifest["generation"] == 2
    keys = [f"docs/{i}.txt" for i in range(12)]
    for name in ("big", "small"):
        a = load_cached_logits(keys, full, teacher=name)
        b = load_cached_logits(keys, grown, teacher=name)
        if name == "big":
            assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)
        else:
            assert torch.equal(a, b)
    verify_cache(part)
    more = _dump(
        part, {"extra": TokenLM(3)}, data=items(12), top_k={"extra": 2}, capture_temperature=1.0
    )
    more = _dump(
        part, {**teachers, "extra": TokenLM(3)}, data=items(12), top_k={"big": 5, "extra": 2}
    )
    assert set(more.teachers) == {"big", "small", "extra"}
    assert load_cached_logits(keys, more, teacher="extra").top_k == 2
    verify_cache(part)


def test_interrupted_sparse_dump_resumes(tmp_path):
    class Failing(torch.utils.data.Dataset):
        def __init__(self, data, fail_at):
            self.data, self.fail_at = data, fail_at

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            if i == self.fail_at:
                raise RuntimeError("boom")
            return self.data[i]

    teachers = {"big": TokenLM(0), "small": TokenLM(1)}
    with pytest.raises(RuntimeError, match="boom"):
        _dump(tmp_path, teachers, data=Failing(items(), 6), checkpoint_rows=2)
    assert (tmp_path / ".partial" / "journal.json").is_file()
    calls = []
    teachers["big"].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    index = _dump(tmp_path, teachers, checkpoint_rows=2)
    assert sum(calls) < 9  # the committed chunks were not recomputed
    ref = _dump(tmp_path / "ref", {"big": TokenLM(0), "small": TokenLM(1)})
    a, b = (
        load_cached_logits(KEYS, index, teacher="big"),
        load_cached_logits(KEYS, ref, teacher="big"),
    )
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tail_logprob, b.tail_logprob)
    verify_cache(tmp_path)


def test_bad_input(tmp_path):
    with pytest.raises(
        ValueError, match=r"top_k for teacher 'big' must be an integer in \[1, 65536\], got 0"
    ):
        _dump(tmp_path / "a", top_k={"big": 0})
    with pytest.raises(
        ValueError, match=r"top_k for teacher 'big' must be <= its 40 classes, got 41"
    ):
        _dump(tmp_path / "b", top_k={"big": 41})
    with pytest.raises(ValueError, match=r"top_k names teachers \['nope'\]"):
        _dump(tmp_path / "c", top_k={"nope": 3})
    with pytest.raises(ValueError, match="capture_temperature must be a finite number > 0"):
        _dump(tmp_path / "d", capture_temperature=0.0)

    class NaNLM(TokenLM):
        def forward(self, x):
            y = super().forward(x).clone()
            y[1, 2, 3] = float("nan")
            return y

    # row 1, position 2: padding for docs/1 (length 2, ignored), real for docs/5 (batch 2)
    with pytest.raises(ValueError, match=r"'big' produced NaN or Inf logits for 1 .*'docs/5\.txt'"):
        _dump(tmp_path / "e", {"big": NaNLM(0)})
    holes = items()
    holes[2]["attention_mask"] = torch.tensor([1, 0, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"prefix of each row .*'docs/2\.txt'"):
        _dump(tmp_path / "f", data=holes)
    _dump(tmp_path / "g")
    with pytest.raises(
        ValueError, match=r"\(top_k, capture_temperature\) = \(5, 1\.0\), got \(8, 1\.0\)"
    ):
        _dump(tmp_path / "g", top_k={"big": 8})
    longer = items()
    longer[0]["attention_mask"] = torch.ones(L, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"'docs/0\.txt' has 7 positions in this batch but 1 in the cache"
    ):
        _dump(
            tmp_path / "g", {"big": TokenLM(0), "small": TokenLM(1), "new": TokenLM(2)}, data=longer
        )
    classification = [{"input_ids": torch.tensor(3), "path": "docs/new.txt"}]
    with pytest.raises(ValueError, match=r"\[B, C\] logits but the cache holds sequences"):
        dump_teacher_logits(
            {"big": TokenLM(0), "small": TokenLM(1)},
            classification,
            tmp_path / "g",
            input_key="input_ids",
            top_k={"big": 5},
            progress=False,
        )
    with pytest.raises(
        ValueError, match=r"'docs/3\.txt' has 6 positions in the student batch but 4"
    ):
        load_cached_logits(KEYS[:4], tmp_path / "g", teacher="big", lengths=[1, 2, 3, 6])
    with pytest.raises(KeyError):
        load_cached_logits(["docs/99.txt"], tmp_path / "g", teacher="big")


def test_fusion_rules(tmp_path):
    """Sparse teachers are never fused (load-time fusion, ensembles, default_fusion);
    dense sequence teachers fuse per position."""
    teachers = {"big": TokenLM(0), "small": TokenLM(1), "other": TokenLM(2)}
    index = _dump(tmp_path, teachers)
    with pytest.raises(ValueError, match=r"sparse teachers \['big'\] cannot be fused"):
        load_cached_logits(KEYS, index, teacher=["big", "small"], fusion="mean")
    with pytest.raises(ValueError, match="cannot be fused"):
        load_cached_logits(KEYS, index, fusion="mean")
    fused = load_cached_logits(KEYS, index, teacher=["small", "other"], fusion="prob_mean")
    a = load_cached_logits(KEYS, index, teacher="small")
    b = load_cached_logits(KEYS, index, teacher="other")
    mask = torch.arange(fused.shape[1]) < torch.from_numpy(index.lengths(KEYS))[:, None]
    want = torch.logsumexp(torch.stack([a.log_softmax(-1), b.log_softmax(-1)]), 0) - math.log(2)
    torch.testing.assert_close(fused[mask], want[mask])
    with pytest.raises(ValueError, match=r"sparse teacher 'big': sparse teachers cannot be fused"):
        _dump(tmp_path, teachers, ensembles={"ens": {"teachers": ["big", "small"]}})
    with pytest.raises(ValueError, match=r"default_fusion='mean' would fuse the sparse teacher"):
        _dump(tmp_path, teachers, default_fusion="mean")
    index = _dump(
        tmp_path,
        teachers,
        ensembles={"ens": {"teachers": ["small", "other"]}},
        default_fusion="big",
    )
    assert isinstance(load_cached_logits(KEYS, index), SparseLogits)
    ens = load_cached_logits(KEYS, index, teacher="ens")
    torch.testing.assert_close(ens[mask], ((a + b) / 2)[mask])


def test_cli_dump_and_info(tmp_path, capsys, monkeypatch):
    from kdkit.cli import common as dump_cli

    assert dump_cli.top_k_spec("8") == (None, 8)
    assert dump_cli.top_k_spec("big=4") == ("big", 4)
    argv = ["dump-teacher", "--manifest", "m", "--cache", "c", "--teacher", "a=b", "--top_k", "0"]
    assert cli_main(argv) == 2
    assert "expected K or NAME=K" in capsys.readouterr().err
    _dump(tmp_path, dtype="float16")
    capsys.readouterr()
    assert cli_main(["cache", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "positions:   31" in out
    assert "big: sparse top_k=5 of 40 classes, uint16 indices, float16 log-probs" in out
    assert "(24 bytes/position)" in out and "small: 40 classes, float16, dense" in out
    assert cli_main(["cache", "verify", str(tmp_path)]) == 0


def test_loss_on_cached_k_equal_v_matches_dense(tmp_path):
    teachers = {"big": TokenLM(0), "small": TokenLM(0)}  # same weights: big sparse with K = V
    index = _dump(tmp_path, teachers, top_k={"big": V})
    sp = load_cached_logits(KEYS, index, teacher="big")
    dense = load_cached_logits(KEYS, index, teacher="small")
    s = torch.randn(dense.shape, generator=torch.Generator().manual_seed(0))
    for tail in ("bucket", "renormalize"):
        got = kd_loss(s, sp, 1.0, reduction="mean", sparse_tail=tail)
        want = kd_loss(s, dense, 1.0, reduction="mean", mask=sp.mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(index.lengths(KEYS)).all()


def test_readme_sparse_example_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Sparse top-k teachers", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert "['avg_confidence', 'ce_loss']" in capsys.readouterr().out
