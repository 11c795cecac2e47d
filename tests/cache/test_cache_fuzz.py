"""Fuzzing the cache readers: mutated manifests and data files give documented errors only.

Hypothesis mutates a small valid cache -- JSON-level edits of the manifest (delete, replace,
retype or rename keys at any depth; huge, negative, NaN, wrong-type values) and byte-level
edits of the data, keys, key-index and manifest files (bit flips, truncation, extension,
overwrite), optionally re-recording sizes and checksums so the forgery passes the cheap
checks -- then runs every public reader.  The only exceptions allowed out are the documented
ones: :class:`kdkit.cache.CacheError` for every corrupt-cache condition, and ``KeyError``
when a corrupted key index no longer finds a requested key.  No other exception, no crash,
no hang (each reader is bounded by the tiny cache) and no unbounded allocation (the
manifest read is capped, sizes are checked before anything is mapped; the peak traced
allocation of every example stays under 64 MiB).

CI runs ``KDKIT_FUZZ_EXAMPLES`` examples (default 150, about 10 s); a long run:
``KDKIT_FUZZ_EXAMPLES=20000 python -m pytest tests/test_cache_fuzz.py`` (see
``docs/reliability.md``).
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from kdkit.cache import (
    CacheError,
    TeacherLogitsDataset,
    dump_teacher_logits,
    load_cache_index,
    load_cached_logits,
    verify_cache,
)
from kdkit.cli.cache import add_subcommands

EXAMPLES = int(os.environ.get("KDKIT_FUZZ_EXAMPLES", "150"))
N, FEATURES = 10, 3
KEYS = [f"s/{i}" for i in range(N)]
ALLOWED = (CacheError, KeyError)
PEAK_BYTES = 64 << 20  # per example, all readers together


def _items():
    feats = torch.arange(N * FEATURES, dtype=torch.float32).reshape(N, FEATURES) % 5
    return [{"features": feats[i], "path": KEYS[i]} for i in range(N)]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-template")
    torch.manual_seed(0)
    dump_teacher_logits(
        {"a": nn.Linear(FEATURES, 4), "b": nn.Linear(FEATURES, 4)},
        _items(),
        root,
        progress=False,
        dtype="float16",
        ensembles={"ens": {"teachers": ["a", "b"], "strategy": "weighted_mean", "weights": [1, 3]}},
        default_fusion="ens",
    )
    return root


WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 10, 11, 2**31, 2**40, 2**63, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            *("../x.bin", "/etc/passwd", "keys-g1.txt", "logits-a-g1.bin", "keys-index-g1.bin"),
            *("float16", "float32", "float64", "mean", "weighted_mean", "a", "b", "ens", "."),
        ]
    ),
    st.lists(st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b"])), max_size=3),
    st.dictionaries(st.sampled_from(["teacher", "strategy", "teachers", "x"]), st.integers()),
)


def _paths(obj, prefix=()):
    """Every (path, container) in a JSON value."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_json(m, data):
    path = data.draw(st.sampled_from(_paths(m)[1:]), label="json path")
    parent = m
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    op = data.draw(st.sampled_from(["delete", "replace", "rename", "add"]), label="json op")
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = data.draw(WEIRD, label="value")
    elif op == "rename" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8), label="new key")] = parent.pop(last)
    elif op == "add" and isinstance(parent.get(last) if isinstance(parent, dict) else None, dict):
        parent[last][data.draw(st.text(max_size=8), label="extra key")] = data.draw(WEIRD)


def _mutate_bytes(blob, data):
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "overwrite"]), label="byte op")
    blob = bytearray(blob)
    if op == "flip" and blob:
        pos = data.draw(st.integers(0, len(blob) - 1), label="offset")
        blob[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif op == "truncate":
        del blob[data.draw(st.integers(0, len(blob)), label="length") :]
    elif op == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=64), label="tail")
    elif op == "overwrite" and blob:
        pos = data.draw(st.integers(0, len(blob) - 1), label="offset")
        chunk = data.draw(st.binary(min_size=1, max_size=16), label="chunk")
        blob[pos : pos + len(chunk)] = chunk
    return bytes(blob)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kdkit")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return args.func(args)


def _run_readers(d):
    outcomes = []
    for call in (
        lambda: load_cache_index(d),
        lambda: load_cached_logits(KEYS, d),
        lambda: load_cached_logits(KEYS[::-1], d, teacher="a"),
        lambda: load_cached_logits(KEYS, d, teacher=["a", "b"], fusion="prob_mean"),
        lambda: load_cache_index(d).keys(),
        lambda: verify_cache(d),
        lambda: TeacherLogitsDataset(_items(), d).__getitems__(list(range(N))),
    ):
        try:
            call()
            outcomes.append(None)
        except ALLOWED as e:
            outcomes.append(type(e).__name__)
        except ValueError as e:  # a valid cache whose manifest dropped its default fusion
            if "records no default fusion" not in str(e):
                raise
            outcomes.append("ValueError")
    assert _cli(["cache", "info", str(d)]) in (0, 1)
    assert _cli(["cache", "verify", str(d)]) in (0, 1)
    return outcomes


FILES = ["manifest.json", "logits-a-g1.bin", "logits-ens-g1.bin", "keys-g1.txt"]
FILES += ["keys-index-g1.bin"]


def _fuzz_once(template, data, files, run):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cache"
        shutil.copytree(template, d)
        manifest = json.loads((d / "manifest.json").read_text())
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            if data.draw(st.booleans(), label="json or bytes"):
                if isinstance(manifest, (dict, list)) and len(_paths(manifest)) > 1:
                    _mutate_json(manifest, data)
            else:
                name = data.draw(st.sampled_from(files), label="file")
                if name == "manifest.json":  # bytes of the manifest as it stands
                    blob = (
                        manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
                    )
                    text = _mutate_bytes(blob, data)
                    try:
                        manifest = json.loads(text)
                    except ValueError:
                        manifest = text  # written raw below
                    continue
                path = d / name
                path.write_bytes(_mutate_bytes(path.read_bytes(), data))
                if data.draw(st.booleans(), label="forge checksum") and isinstance(manifest, dict):
                    with contextlib.suppress(Exception):
                        blob = path.read_bytes()
                        manifest["files"][name] = {
                            "bytes": len(blob),
                            "blake2b": hashlib.blake2b(blob).hexdigest(),
                        }
        raw = manifest if isinstance(manifest, bytes) else None
        if raw is None:
            try:
                raw = json.dumps(manifest).encode()
            except (ValueError, TypeError):  # e.g. a dict key hypothesis made unencodable
                raw = b"{"
        (d / "manifest.json").write_bytes(raw)
        tracemalloc.start()
        try:
            run(d)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < PEAK_BYTES, f"peak allocation {peak} bytes"


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],  # report unshrunk
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_cache_gives_documented_errors_only(template, data):
    _fuzz_once(template, data, FILES, _run_readers)


# -- sequences and a sparse top-k teacher (issue 12) -------------------------------------


class _TokenLM(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.embed(x)


def _sequence_items():
    return [
        {
            "ids": torch.arange(5) * (i + 1) % 30,
            "lengths": i % 5 + 1,
            "path": KEYS[i],
        }
        for i in range(N)
    ]


@pytest.fixture(scope="module")
def sparse_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-sparse-template")
    torch.manual_seed(0)
    dump_teacher_logits(
        {"big": _TokenLM(30), "small": _TokenLM(30)},
        _sequence_items(),
        root,
        input_key="ids",
        top_k={"big": 3},
        capture_temperature=2.0,
        progress=False,
        dtype="float16",
        default_fusion="big",
    )
    return root


def _run_sparse_readers(d):
    outcomes = []
    for call in (
        lambda: load_cache_index(d),
        lambda: load_cached_logits(KEYS, d),
        lambda: load_cached_logits(KEYS[::-1], d, teacher="small"),
        lambda: load_cache_index(d).lengths(KEYS),
        lambda: verify_cache(d),
        lambda: TeacherLogitsDataset(_sequence_items(), d).__getitems__(list(range(N))),
    ):
        try:
            call()
            outcomes.append(None)
        except ALLOWED as e:
            outcomes.append(type(e).__name__)
        except ValueError as e:  # a valid cache whose manifest dropped its default fusion
            if "records no default fusion" not in str(e) and "cannot be fused" not in str(e):
                raise
            outcomes.append("ValueError")
    assert _cli(["cache", "info", str(d)]) in (0, 1)
    assert _cli(["cache", "verify", str(d)]) in (0, 1)
    return outcomes


SPARSE_FILES = ["manifest.json", "topk-big-g1.bin", "logits-small-g1.bin", "offsets-g1.bin"]


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_sparse_cache_gives_documented_errors_only(sparse_template, data):
    _fuzz_once(sparse_template, data, SPARSE_FILES, _run_sparse_readers)


def test_unmutated_sparse_template_reads_cleanly(sparse_template):
    assert _run_sparse_readers(sparse_template) == [None] * 6


def test_unmutated_template_reads_cleanly(template):
    assert _run_readers(template) == [None] * 7
