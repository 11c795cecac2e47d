"""Tests of the cache's writer side: CacheWriter fed records directly, the resume journal,
the one-way module graph, and the shared low-level helpers (kdkit._io, kdkit._modes)."""

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdkit._io import atomic_write, blake2b_hex, file_blocks
from kdkit._modes import eval_mode
from kdkit.cache import dump_teacher_logits, load_cached_logits
from kdkit.cache._format import hash_keys
from kdkit.cache.journal import Journal
from kdkit.cache.writer import CacheWriter, LogitsRecord

CACHE_SRC = Path(__file__).resolve().parents[2] / "src" / "kdkit" / "cache"
KEYS = [f"k/{i}" for i in range(10)]


def _config(**overrides):
    return {
        "base_generation": 0,
        "base_num_samples": 0,
        "dtype": "float32",
        "teachers": {"a": "sha256:x"},
        **overrides,
    }


def _writer(root, **kwargs):
    options = dict(dtype="float32", checkpoint_rows=4, ensembles={}, default=None)
    return CacheWriter(root, None, {"a": "sha256:x"}, **{**options, **kwargs})


def _records(writer, keys, logits):
    for start in range(0, len(keys), 3):
        plan = writer.plan(keys[start : start + 3])
        if plan is not None:
            rows = plan.positions + start
            yield LogitsRecord(plan, {"a": logits[torch.from_numpy(rows)]})


def test_writer_fed_records_directly_commits_a_readable_cache(tmp_path):
    logits = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    writer = _writer(tmp_path)
    writer.consume(_records(writer, KEYS, logits))
    # records of 3 rows; a chunk is committed once >= checkpoint_rows=4 rows are pending
    assert [c["rows"] for c in writer.journal.chunks] == [6, 4]
    index = writer.commit()
    assert index.keys() == KEYS and index.teachers == ("a",)
    assert torch.equal(load_cached_logits(KEYS[::-1], index), logits.flip(0))
    assert not (tmp_path / ".partial").exists()


def test_writer_plan_skips_cached_keys_and_refuses_duplicates(tmp_path):
    logits = torch.randn(10, 3)
    first = _writer(tmp_path)
    first.consume(_records(first, KEYS[:6], logits))
    old = first.commit()
    writer = CacheWriter(
        tmp_path,
        old,
        {"a": "sha256:x"},
        dtype="float32",
        checkpoint_rows=4,
        ensembles={},
        default=None,
    )
    assert writer.plan(KEYS[:3]) is None  # all cached: nothing to compute
    plan = writer.plan(KEYS[5:8])
    assert plan.keys == KEYS[6:8] and plan.positions.tolist() == [1, 2]
    assert plan.old_rows.tolist() == [-1, -1] and plan.teacher_rows["a"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"duplicate sample keys in data: 'k/5'"):
        writer.plan(["k/5"])  # a cached key seen twice in one run
    with pytest.raises(ValueError, match=r"duplicate sample keys in data: 'k/9'"):
        writer.plan(["k/9", "k/9"])


def test_writer_checks_classes_and_values(tmp_path):
    writer = _writer(tmp_path, dtype="float16")
    plan = writer.plan(KEYS[:2])
    writer.add(LogitsRecord(plan, {"a": torch.zeros(2, 3)}))
    with pytest.raises(ValueError, match=r"returned 4 classes, but 3 were stored"):
        writer.add(LogitsRecord(writer.plan(KEYS[2:4]), {"a": torch.zeros(2, 4)}))
    with pytest.raises(ValueError, match=r"beyond the float16 range .* 'k/5'"):
        y = torch.tensor([[0.0, 0, 0], [1e5, 0, 0]])
        writer.add(LogitsRecord(writer.plan(KEYS[4:6]), {"a": y}))


def test_consume_keeps_the_rows_before_an_interruption(tmp_path):
    writer = _writer(tmp_path, checkpoint_rows=100)
    logits = torch.randn(10, 3)

    def interrupted():
        yield from _records(writer, KEYS[:6], logits)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        writer.consume(interrupted())
    journal = Journal(tmp_path / ".partial", _config(), 100)
    assert [journal.chunk_keys(c) for c in journal.chunks] == [KEYS[:6]]
    positions = journal.prior_positions(hash_keys(["k/4", "k/9", "k/0"]))
    assert positions.tolist() == [4, -1, 0]


def test_journal_of_other_teachers_is_discarded(tmp_path):
    journal = Journal(tmp_path, _config(), 2)
    journal.add(KEYS[:2], np.full(2, -1), {"a": np.zeros((2, 3), dtype="<f4")})
    assert len(journal.chunks) == 1
    with pytest.warns(UserWarning, match="made with other teachers"):
        again = Journal(tmp_path, _config(teachers={"a": "sha256:y"}), 2)
    assert again.chunks == [] and sorted(os.listdir(tmp_path)) == []


def test_data_flows_one_way():
    """No cache module below dump.py imports it; the writer never imports a producer."""

    def imports(name):
        tree = ast.parse((CACHE_SRC / f"{name}.py").read_text(encoding="utf-8"))
        return {
            n.module
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("kdkit")
        }

    for name in ("writer", "journal", "ensembles", "producers", "sharded", "dump_checks"):
        assert "kdkit.cache.dump" not in imports(name), name
    assert not imports("writer") & {"kdkit.cache.producers", "kdkit.cache.sharded"}
    assert "kdkit.cache.producers" not in imports("sharded")
    text = (CACHE_SRC / "sharded.py").read_text(encoding="utf-8")
    assert "__kdkit" not in text and "PRECOMPUTED" not in text  # no sentinel batch field


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "f.bin"
    atomic_write(final, lambda tmp: tmp.write_bytes(b"old"))

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(final, failing)
    assert info.value.errno == 28
    assert final.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_streamed_blake2b_equals_one_shot(tmp_path):
    import hashlib

    data = os.urandom(10_000)
    (tmp_path / "x").write_bytes(data)
    assert blake2b_hex(file_blocks(tmp_path / "x", size=999)) == hashlib.blake2b(data).hexdigest()


def test_eval_mode_restores_mixed_modes_even_on_error():
    net = nn.Sequential(nn.Dropout(), nn.Linear(2, 2))
    net[1].eval()
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError
    assert net.training and net[0].training and not net[1].training


def test_dump_matches_a_writer_fed_by_hand(tmp_path):
    teacher = nn.Linear(3, 4)
    data = [{"features": torch.randn(3), "path": k} for k in KEYS]
    index = dump_teacher_logits({"a": teacher}, data, tmp_path / "dump", progress=False)
    with torch.no_grad():
        logits = teacher(torch.stack([d["features"] for d in data]))
    fingerprint = index.manifest["teachers"]["a"]["fingerprint"]
    writer = CacheWriter(
        tmp_path / "hand",
        None,
        {"a": fingerprint},
        dtype="float32",
        checkpoint_rows=65536,
        ensembles={},
        default=None,
    )
    writer.consume(_records(writer, KEYS, logits))
    by_hand = writer.commit()
    for name in by_hand.manifest["files"]:
        assert (tmp_path / "hand" / name).read_bytes() == (tmp_path / "dump" / name).read_bytes()
