"""Tests of reading a cache: load_cache_index, load_cached_logits, key lookup, no unpickling."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from cache_testing import _dumped, make_items, make_teacher, paths
from hypothesis import given
from hypothesis import strategies as st

from kdkit.cache import (
    CacheError,
    CacheIndex,
    dump_teacher_logits,
    load_cache_index,
    load_cached_logits,
    verify_cache,
)


def test_missing_keys_error(tmp_path):
    index = dump_teacher_logits(make_teacher(0), make_items(5), tmp_path, progress=False)
    with pytest.raises(KeyError, match=r"2 of 3 keys are not in the cache.*'a.wav', 'b.wav'"):
        load_cached_logits(["a.wav", "clips/00001.wav", "b.wav"], index)
    with pytest.raises(CacheError, match=r"manifest\.json is missing"):
        load_cache_index(tmp_path / "nowhere")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    index, fname = _dumped(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-PWNED"
    payload = pickle.dumps(_Payload(str(marker)))
    size = (tmp_path / fname).stat().st_size
    assert len(payload) < size
    (tmp_path / fname).write_bytes(payload.ljust(size, b"\0"))  # right size: loads proceed
    index = load_cache_index(tmp_path)
    out = load_cached_logits(paths(make_items(12)), index)  # raw numbers, nothing executed
    assert out.shape == (12, 5)
    with pytest.raises(CacheError, match=fname):
        verify_cache(tmp_path)
    (tmp_path / index.manifest["keys"]["index"]).write_bytes(payload)
    with pytest.raises(CacheError):
        verify_cache(tmp_path)
    (tmp_path / "manifest.json").write_bytes(payload)
    with pytest.raises(CacheError, match="not valid UTF-8 JSON"):
        load_cache_index(tmp_path)
    assert not marker.exists()


def test_no_pickle_or_unsafe_loading_in_the_package():
    root = Path(__file__).resolve().parents[2] / "src" / "kdkit" / "cache"
    text = "\n".join(p.read_text() for p in root.glob("*.py"))
    assert "import pickle" not in text and "allow_pickle=True" not in text
    assert "torch.load(" not in text


def test_lookup_when_keys_share_the_high_hash_word():
    index = CacheIndex("/nonexistent", {"num_samples": 4, "teachers": {}, "keys": {}})
    # columns: (high word sorted, low word, row)
    index._index = np.array([[1, 5, 5, 9], [7, 2, 8, 1], [3, 0, 2, 1]], dtype=np.uint64)
    queries = np.array([[5, 8], [5, 2], [5, 3], [9, 1], [1, 7], [0, 0], [10, 1]], dtype=np.uint64)
    assert index._rows_of_hashes(queries).tolist() == [2, 0, -1, 1, 3, -1, -1]


def test_manifest_cannot_point_outside_the_cache(tmp_path):
    _dumped(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["files"].pop(manifest["teachers"]["a"]["file"])
    manifest["teachers"]["a"]["file"] = "../outside.bin"
    manifest["files"]["../outside.bin"] = entry
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"invalid data file '\.\./outside\.bin'"):
        load_cache_index(tmp_path)


@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 3)), min_size=1, max_size=80, unique=True
    ),
    st.lists(st.tuples(st.integers(0, 41), st.integers(0, 4)), min_size=1, max_size=30),
)
def test_index_search_matches_brute_force(entries, queries):
    # Small ranges force runs of equal high words across the fence windows.
    entries = sorted(entries)
    index = CacheIndex("/nonexistent", {"num_samples": len(entries), "teachers": {}, "keys": {}})
    rows = np.random.default_rng(0).permutation(len(entries))
    index._index = np.array(
        [[h for h, _ in entries], [lo for _, lo in entries], rows.tolist()], dtype=np.uint64
    )
    want = [next((int(rows[i]) for i, e in enumerate(entries) if e == q), -1) for q in queries]
    assert index._rows_of_hashes(np.array(queries, dtype=np.uint64)).tolist() == want
