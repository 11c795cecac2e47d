"""The fast lookup paths (issue 16, item 5): bulk key normalisation, the key -> row memo."""

import hashlib
import os
import pickle
import posixpath
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_testing import expected, make_items, make_teacher, paths
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset

from kdkit.cache import dump_teacher_logits, load_cache_index, load_cached_logits
from kdkit.cache._format import hash_keys, normalize_key, normalize_keys


def reference_normalize(key):
    """The rule as written in the manifest, without any fast path."""
    if isinstance(key, os.PathLike):
        text = os.fsdecode(os.fspath(key))
    elif hasattr(key, "item") and getattr(key, "ndim", None) == 0:
        text = str(key.item())
    else:
        text = str(key)
    return posixpath.normpath(text.replace("\\", "/"))


tricky = st.lists(
    st.sampled_from(["a", "b", ".", "/", "\\", "é", "//", "/./", ".."]), max_size=10
).map("".join)
keys_strategy = st.lists(tricky | st.text(max_size=30) | st.integers(), max_size=20)


@given(keys_strategy)
def test_bulk_normalisation_equals_the_rule(keys):
    want = [reference_normalize(k) for k in keys]
    assert normalize_keys(keys) == want
    assert [normalize_key(k) for k in keys] == want


def test_bulk_normalisation_of_paths_tensors_and_edge_cases():
    keys = [
        Path("a") / "b",
        torch.tensor(3),
        np.int64(4),
        "",
        ".",
        "./a",
        "a/",
        "a//b",
        "a/./b",
        "a/../b",
        "/a",
        "//a",
        "a\\b",
        ".hidden",
        "a/.b",
    ]
    assert normalize_keys(keys) == [reference_normalize(k) for k in keys]


@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"]), max_size=20), max_size=20))
def test_hash_keys_equals_blake2b_128(keys):
    want = [hashlib.blake2b(k.encode(), digest_size=16).digest() for k in keys]
    got = hash_keys(keys)
    assert got.shape == (len(keys), 2)
    assert [row.astype(">u8").tobytes() for row in got] == want


def test_memo_gives_the_same_rows_and_is_bounded(tmp_path):
    items = make_items(40)
    index = dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False)
    index = load_cache_index(tmp_path)
    fresh = load_cache_index(tmp_path)
    fresh.memo_size = 0  # never remembers: always hashes
    keys = [*paths(items), "absent.wav", "./clips/00003.wav"]
    first = index.rows(keys)
    np.testing.assert_array_equal(first, fresh.rows(keys))
    assert fresh._memo == {}
    assert len(index._memo) == 40  # found keys only
    np.testing.assert_array_equal(index.rows(keys[::-1]), first[::-1])  # from the memo
    index.memo_size = 16
    index._memo.clear()
    for start in range(0, 40, 8):
        index.rows(keys[start : start + 8])
        assert len(index._memo) <= 16
    np.testing.assert_array_equal(index.rows(keys), first)
    big = load_cache_index(tmp_path)
    big.memo_size = 4
    np.testing.assert_array_equal(big.rows(keys), first)  # a batch above the bound
    assert big._memo == {}
    got = load_cached_logits(paths(items), index)
    torch.testing.assert_close(got, expected(make_teacher(0), items))


def test_memo_is_per_generation_and_dropped_when_pickled(tmp_path):
    items = make_items(10)
    index = dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False)
    index = load_cache_index(tmp_path)
    index.rows(paths(items))
    assert index._memo
    index._memo["clips/00000.wav"] = 7  # a stale entry is used by its own instance only
    assert index.rows(["clips/00000.wav"])[0] == 7
    clone = pickle.loads(pickle.dumps(index))
    assert clone._memo == {}
    assert clone.rows(["clips/00000.wav"])[0] == 0
    assert index.copy()._memo == {}
    # A later dump writes a new generation: a reopened index starts with an empty memo and
    # reads the new generation's rows, whatever the old instance remembered.
    more = make_items(5, start=10)
    dump_teacher_logits(make_teacher(0), items + more, tmp_path, progress=False)
    reopened = load_cache_index(tmp_path)
    assert reopened._memo == {}
    keys = paths(items + more)
    want = {k: i for i, k in enumerate(reopened.keys())}
    np.testing.assert_array_equal(reopened.rows(keys), [want[k] for k in keys])
    torch.testing.assert_close(
        load_cached_logits(keys, reopened), expected(make_teacher(0), items + more)
    )


def test_missing_key_message_unchanged_with_memo(tmp_path):
    items = make_items(3)
    index = dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False)
    load_cached_logits(paths(items), index)  # fills the memo
    with pytest.raises(KeyError, match=r"1 of 2 keys are not in the cache at .*'nope.wav'"):
        load_cached_logits([paths(items)[0], "nope.wav"], index)


class Unsized(IterableDataset):
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        for s in range(0, len(self.items), 4):
            chunk = self.items[s : s + 4]
            yield {
                "features": torch.stack([it["features"] for it in chunk]),
                "path": [it["path"] for it in chunk],
            }


def test_dump_of_an_unsized_iterable_dataloader(tmp_path):
    items = make_items(10)
    loader = DataLoader(Unsized(items), batch_size=None)
    for progress in (False, True):
        out = tmp_path / str(progress)
        index = dump_teacher_logits(make_teacher(0), loader, out, progress=progress)
        torch.testing.assert_close(
            load_cached_logits(paths(items), index), expected(make_teacher(0), items)
        )


class Fixed(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.out[: x.shape[0]].clone()


def test_finite_check_fast_path_is_exact(tmp_path):
    items = make_items(4)
    huge = torch.full((4, 3), 3e38)  # finite, but the sum overflows to inf: the exact test decides
    index = dump_teacher_logits(Fixed(huge), items, tmp_path / "a", progress=False)
    torch.testing.assert_close(load_cached_logits(paths(items), index), huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        out = torch.zeros(4, 3)
        out[2, 1] = bad
        with pytest.raises(
            ValueError, match=r"produced NaN or Inf logits for 1 sample\(s\): 'clips/00002.wav'"
        ):
            dump_teacher_logits(Fixed(out), items, tmp_path / str(bad), progress=False)
    wide = torch.full((4, 3), 1e300, dtype=torch.float64)  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="NaN or Inf"):
        dump_teacher_logits(Fixed(wide), items, tmp_path / "w", progress=False)


def test_memo_fast_path_equals_the_normalised_lookup(tmp_path):
    """A list of remembered keys skips normalisation; anything else takes the full path."""
    from kdkit.cache.lookup import rows_and_keys

    items = make_items(12)
    dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False)
    index, fresh = load_cache_index(tmp_path), load_cache_index(tmp_path)
    fresh.memo_size = 0  # never remembers: always normalises and hashes
    keys = paths(items)
    index.rows(keys)  # fills the memo
    assert len(index._memo) == 12
    odd = [
        "./clips/00003.wav",
        "clips\\00004.wav",
        "clips//00005.wav",
        Path("clips/00006.wav"),
        "clips/../clips/00007.wav",
        np.str_("clips/00008.wav"),
    ]
    for batch in (keys[::-1], keys[:3] * 4, odd, [*odd, *keys], tuple(keys)):
        rows, norm = rows_and_keys(index, batch)
        want_rows, want_norm = rows_and_keys(fresh, batch)
        np.testing.assert_array_equal(rows, want_rows)
        assert list(norm) == want_norm
        assert all(type(k) in (str, np.str_) for k in norm)
    import kdkit.cache.lookup as lookup

    with pytest.MonkeyPatch.context() as patch:  # a remembered batch is not normalised
        patch.setattr(lookup, "normalize_keys", lambda keys: pytest.fail("normalised"))
        np.testing.assert_array_equal(rows_and_keys(index, keys[::-1])[0], np.arange(12)[::-1])
    with pytest.raises(KeyError, match=r"1 of 3 keys are not in the cache at .*'nope.wav'"):
        rows_and_keys(index, [keys[0], "nope.wav", keys[1]])
    with pytest.raises(KeyError, match=r"1 of 1 keys"):
        rows_and_keys(index, [["clips/00000.wav"]])  # unhashable: normalised to its str
    with pytest.raises(TypeError, match="single string"):
        rows_and_keys(index, "clips/00000.wav")
    assert rows_and_keys(index, [])[0].shape == (0,)
    got = load_cached_logits(keys[::-1], index)
    torch.testing.assert_close(got, expected(make_teacher(0), items[::-1]))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("small", [True, False])
def test_small_and_sorted_reads_give_the_same_rows(tmp_path, monkeypatch, dtype, small):
    """Both branches of ``read``: the rows in the order asked, repeats and all, as float32."""
    import kdkit.cache.reads as reads

    items = make_items(30)
    index = dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False, dtype=dtype)
    monkeypatch.setattr(reads, "SMALL_READ_BYTES", 1 << 30 if small else 0)
    name = index.teachers[0]
    stored = np.asarray(index._teacher_map(name))
    rows = np.array([7, 3, 3, 29, 0, 7, 15], dtype=np.int64)
    got = index.read(name, rows)
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, stored[rows].astype(np.float32))
    got[:] = 0  # a copy: the map is untouched
    assert np.asarray(index._teacher_map(name))[rows].any()
    assert index.read(name, rows[:0]).shape == (0, stored.shape[1])


@pytest.mark.parametrize("small", [True, False])
def test_non_finite_stored_row_is_named_by_both_reads(tmp_path, monkeypatch, small):
    import kdkit.cache.reads as reads
    from kdkit.cache._format import CacheError

    items = make_items(10)
    index = dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False)
    name = index.teachers[0]
    info = index.manifest["teachers"][name]
    data = np.memmap(tmp_path / info["file"], dtype=np.float32, mode="r+")
    data.reshape(10, -1)[6, 2] = np.nan
    data.flush()
    del data
    index = load_cache_index(tmp_path)
    monkeypatch.setattr(reads, "SMALL_READ_BYTES", 1 << 30 if small else 0)
    with pytest.raises(CacheError, match=rf"{info['file']!r}.*NaN/Inf at row\(s\) \[6\]"):
        index.read(name, np.array([6, 1, 6], dtype=np.int64))
    assert np.isfinite(index.read(name, np.array([1, 5], dtype=np.int64))).all()
