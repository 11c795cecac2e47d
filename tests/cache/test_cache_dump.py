"""Tests of dump_teacher_logits: round trips, keys, resume, adding samples/teachers, ensembles, refusals."""

import json
import posixpath
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_testing import FEATURES, Counting, Failing, expected, make_items, make_teacher, paths
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

from kdkit import fuse_teacher_logits
from kdkit.cache import (
    CacheIndex,
    dump_teacher_logits,
    load_cache_index,
    load_cached_logits,
    normalize_key,
    verify_cache,
)


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float16", 2e-3)])
def test_round_trip_several_teachers(tmp_path, dtype, tol):
    items = make_items(37)
    teachers = {"a": make_teacher(0), "b": make_teacher(1)}
    index = dump_teacher_logits(
        teachers, items, tmp_path, dtype=dtype, batch_size=8, progress=False
    )
    assert isinstance(index, CacheIndex)
    assert index.teachers == ("a", "b") and index.num_samples == 37 and index.num_classes == 5
    order = [items[i] for i in [5, 0, 36, 5, 12]]  # any order, repeats allowed
    for name, teacher in teachers.items():
        got = load_cached_logits(paths(order), index, teacher=name)
        assert got.dtype == torch.float32 and got.shape == (5, 5)
        torch.testing.assert_close(got, expected(teacher, order), rtol=tol, atol=tol)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["teachers"]["a"]["dtype"] == dtype
    assert manifest["teachers"]["a"]["fingerprint"].startswith("sha256:")
    assert "posixpath.normpath" in manifest["key_normalization"]["rule"]
    data_file = tmp_path / manifest["teachers"]["a"]["file"]
    itemsize = 2 if dtype == "float16" else 4
    assert data_file.stat().st_size == 37 * 5 * itemsize
    raw = np.memmap(
        data_file, dtype="<f2" if dtype == "float16" else "<f4", mode="r", shape=(37, 5)
    )
    np.testing.assert_array_equal(raw[3], load_cached_logits([items[3]["path"]], index, "a")[0])
    assert not (tmp_path / ".partial").exists()


def test_single_teacher_defaults_and_path_argument(tmp_path):
    items = make_items(10)
    teacher = make_teacher(3)
    dump_teacher_logits(teacher, items, tmp_path, progress=False)
    got = load_cached_logits(paths(items), str(tmp_path))
    torch.testing.assert_close(got, expected(teacher, items))
    assert load_cache_index(tmp_path).teachers == ("teacher",)


def test_key_normalisation(tmp_path):
    items = make_items(3)
    items[0]["path"] = "data\\clips\\x.wav"
    items[1]["path"] = Path("data") / "clips" / "y.wav"
    items[2]["path"] = "./data//clips/z.wav"
    index = dump_teacher_logits(make_teacher(0), items, tmp_path, progress=False)
    assert index.keys() == ["data/clips/x.wav", "data/clips/y.wav", "data/clips/z.wav"]
    a = load_cached_logits(["data/clips/./x.wav", "data\\clips\\y.wav", "data/clips/z.wav"], index)
    torch.testing.assert_close(a, expected(make_teacher(0), items))
    assert "data/./clips/x.wav" in index and "data/clips/w.wav" not in index
    assert index.missing_keys(["data/clips/x.wav", "nope.wav"]) == ["nope.wav"]


@given(st.text(alphabet=st.sampled_from("ab./\\é"), max_size=12) | st.text(max_size=30))
def test_normalize_key_is_idempotent_and_follows_the_rule(key):
    once = normalize_key(key)
    assert once == posixpath.normpath(key.replace("\\", "/"))  # the fast path is exact
    assert normalize_key(once) == once
    assert "\\" not in once


@settings(max_examples=10)
@given(
    st.lists(
        st.text(
            st.characters(blacklist_characters="\n\r", blacklist_categories=["Cs"]), max_size=12
        ),
        min_size=1,
        max_size=12,
        unique_by=normalize_key,
    ),
    st.sampled_from(["float16", "float32"]),
    st.randoms(use_true_random=False),
)
def test_round_trip_any_keys(tmp_path_factory, keys, dtype, rnd):
    root = tmp_path_factory.mktemp("any")
    items = [{"features": torch.full((FEATURES,), float(i)), "path": k} for i, k in enumerate(keys)]
    teacher = make_teacher(0)
    index = dump_teacher_logits(teacher, items, root, dtype=dtype, batch_size=5, progress=False)
    order = list(range(len(keys)))
    rnd.shuffle(order)
    got = load_cached_logits([keys[i] for i in order], index)
    want = expected(teacher, [items[i] for i in order])
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_dataloader_input_and_key_fn(tmp_path):
    items = make_items(9)
    loader = DataLoader(items, batch_size=4)
    index = dump_teacher_logits(
        make_teacher(0),
        loader,
        tmp_path,
        key_fn=lambda b: [f"id-{p}" for p in b["path"]],
        progress=False,
    )
    assert index.keys()[0] == "id-clips/00000.wav"


def test_resume_after_interruption(tmp_path):
    items = make_items(30)
    data = Failing(items, fail_at=17)
    teacher = Counting(make_teacher(0))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        dump_teacher_logits(
            {"t": teacher}, data, tmp_path, batch_size=4, checkpoint_rows=4, progress=False
        )
    assert not (tmp_path / "manifest.json").exists()
    journal = json.loads((tmp_path / ".partial" / "journal.json").read_text())
    done = sum(c["rows"] for c in journal["chunks"])
    assert done == 16  # every full batch before the failing one was committed
    data.armed = False
    teacher.rows = 0
    index = dump_teacher_logits(
        {"t": teacher}, data, tmp_path, batch_size=4, checkpoint_rows=4, progress=False
    )
    assert teacher.rows == 30 - done
    assert index.keys() == paths(items)
    torch.testing.assert_close(
        load_cached_logits(paths(items), index, "t"), expected(teacher, items)
    )
    verify_cache(tmp_path)


def test_resume_with_other_weights_discards_partial_work(tmp_path):
    items = make_items(12)
    data = Failing(items, fail_at=9)
    with pytest.raises(RuntimeError):
        dump_teacher_logits(
            {"t": make_teacher(0)}, data, tmp_path, batch_size=4, checkpoint_rows=4, progress=False
        )
    data.armed = False
    other = make_teacher(1)
    with pytest.warns(UserWarning, match="discarding the unfinished dump"):
        index = dump_teacher_logits({"t": other}, data, tmp_path, batch_size=4, progress=False)
    torch.testing.assert_close(load_cached_logits(paths(items), index), expected(other, items))


def test_adding_samples(tmp_path):
    items = make_items(25)
    teacher = Counting(make_teacher(0))
    dump_teacher_logits({"t": teacher}, items[:10], tmp_path, batch_size=4, progress=False)
    teacher.rows = 0
    index = dump_teacher_logits({"t": teacher}, items, tmp_path, batch_size=4, progress=False)
    assert teacher.rows == 15
    assert index.num_samples == 25 and index.keys() == paths(items)
    torch.testing.assert_close(load_cached_logits(paths(items), index), expected(teacher, items))
    verify_cache(tmp_path)
    assert len(list(tmp_path.glob("logits-*.bin"))) == 1  # the old generation was removed
    teacher.rows = 0
    dump_teacher_logits({"t": teacher}, items, tmp_path, progress=False)  # nothing new
    assert teacher.rows == 0


def test_adding_teachers(tmp_path):
    items = make_items(20)
    a, b = Counting(make_teacher(0)), Counting(make_teacher(1))
    dump_teacher_logits({"a": a}, items, tmp_path, batch_size=8, progress=False)
    a.rows = 0
    index = dump_teacher_logits({"a": a, "b": b}, items, tmp_path, batch_size=8, progress=False)
    assert (a.rows, b.rows) == (0, 20)
    assert index.teachers == ("a", "b")
    torch.testing.assert_close(load_cached_logits(paths(items), index, "b"), expected(b, items))
    torch.testing.assert_close(load_cached_logits(paths(items), index, "a"), expected(a, items))
    # a third teacher alone is fine too (no new samples), but it must see every cached sample
    with pytest.raises(ValueError, match=r"must see every cached sample, but 5 cached key\(s\)"):
        dump_teacher_logits({"c": make_teacher(2)}, items[:15], tmp_path, progress=False)
    # new samples while a cached teacher is not passed
    with (
        pytest.raises(ValueError, match=r"cached teacher\(s\) \['b'\] were not passed"),
        pytest.warns(UserWarning, match="discarding the unfinished dump"),  # the failed 'c' run
    ):
        dump_teacher_logits({"a": a}, make_items(3, start=20), tmp_path, progress=False)


def test_fusion_at_load_and_dump(tmp_path):
    items = make_items(16)
    a, b = make_teacher(0), make_teacher(1)
    index = dump_teacher_logits(
        {"a": a, "b": b},
        items,
        tmp_path,
        ensembles={"ens": {"teachers": ["a", "b"], "strategy": "prob_mean"}},
        progress=False,
    )
    la, lb = expected(a, items), expected(b, items)
    keys = paths(items)
    with pytest.raises(ValueError, match=r"several teachers \['a', 'b', 'ens'\].*teacher="):
        load_cached_logits(keys, index)
    torch.testing.assert_close(
        load_cached_logits(keys, index, teacher=["a", "b"], fusion="mean"), (la + lb) / 2
    )
    torch.testing.assert_close(
        load_cached_logits(keys, index, teacher=["a", "b"], fusion="weighted_mean", weights=[3, 1]),
        0.75 * la + 0.25 * lb,
    )
    torch.testing.assert_close(
        load_cached_logits(keys, index, teacher="ens"), fuse_teacher_logits([la, lb], "prob_mean")
    )
    with pytest.raises(ValueError, match="pass fusion="):
        load_cached_logits(keys, index, teacher=["a", "b"])
    with pytest.raises(ValueError, match="need fusion='weighted_mean'"):
        load_cached_logits(keys, index, teacher=["a", "b"], weights=[1, 2])
    with pytest.raises(KeyError, match="teacher 'c' is not in the cache"):
        load_cached_logits(keys, index, teacher="c")
    # record a default fusion (no teacher re-run: only the manifest changes)
    index = dump_teacher_logits(
        {"a": a, "b": b}, items, tmp_path, default_fusion="mean", progress=False
    )
    torch.testing.assert_close(load_cached_logits(keys, index), (la + lb) / 2)
    index = dump_teacher_logits(
        {"a": a, "b": b}, items, tmp_path, default_fusion="ens", progress=False
    )
    torch.testing.assert_close(
        load_cached_logits(keys, index), fuse_teacher_logits([la, lb], "prob_mean")
    )
    # adding samples recomputes the ensemble teacher
    more = make_items(4, start=16)
    index = dump_teacher_logits({"a": a, "b": b}, items + more, tmp_path, progress=False)
    torch.testing.assert_close(
        load_cached_logits(paths(more), index, "ens"),
        fuse_teacher_logits([expected(a, more), expected(b, more)], "prob_mean"),
    )


def test_ensemble_unknown_member_refused_before_running(tmp_path):
    teacher = Counting(make_teacher(0))
    with pytest.raises(ValueError, match=r"ensembles\['ens'\] uses \['b'\]"):
        dump_teacher_logits(
            {"a": teacher}, make_items(4), tmp_path, ensembles={"ens": {"teachers": ["a", "b"]}}
        )
    assert teacher.rows == 0


def test_fused_is_a_deprecated_alias_of_ensembles(tmp_path):
    items = make_items(6)
    a, b = make_teacher(0), make_teacher(1)
    spec = {"ens": {"teachers": ["a", "b"], "strategy": "prob_mean"}}
    new = dump_teacher_logits(
        {"a": a, "b": b}, items, tmp_path / "new", ensembles=spec, progress=False
    )
    with pytest.warns(DeprecationWarning, match=r"fused=.*deprecated; pass ensembles="):
        old = dump_teacher_logits(
            {"a": a, "b": b}, items, tmp_path / "old", fused=spec, progress=False
        )
    assert old.teachers == new.teachers == ("a", "b", "ens")
    for name in ("manifest.json", new.manifest["teachers"]["ens"]["file"]):
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()
    with pytest.raises(TypeError, match="ensembles= only"):
        dump_teacher_logits(
            {"a": a, "b": b}, items, tmp_path / "both", ensembles=spec, fused=spec, progress=False
        )
    assert not (tmp_path / "both").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused=None (what the CLI passes without --fused) is silent
        index = dump_teacher_logits(
            {"a": a, "b": b}, items, tmp_path / "new", fused=None, progress=False
        )
    assert index.teachers == ("a", "b", "ens")


def test_ensemble_class_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"teacher 'a' has 5 classes but 'b' has 7"):
        dump_teacher_logits(
            {"a": make_teacher(0, 5), "b": make_teacher(1, 7)},
            make_items(4),
            tmp_path,
            ensembles={"ens": {"teachers": ["a", "b"]}},
            progress=False,
        )


class Constant(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, x):
        return self.values.expand(x.shape[0], -1).clone()


def test_refuses_duplicates_nan_and_float16_overflow(tmp_path):
    items = make_items(6)
    items[4]["path"] = "clips/./00001.wav"
    with pytest.raises(ValueError, match=r"duplicate sample keys in data: 'clips/00001.wav'"):
        dump_teacher_logits(make_teacher(0), items, tmp_path / "dup", batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"duplicate sample keys in data: 'clips/00001.wav'"):
        dump_teacher_logits(
            make_teacher(0), items, tmp_path / "dup2", batch_size=16, progress=False
        )

    class NanAt(nn.Module):
        def forward(self, x):
            y = x[:, :3].clone()
            y[x[:, 0] > 0.5] = float("nan")
            return y

    items = make_items(20)
    bad = [it["path"] for it in items if float(it["features"][0]) > 0.5]
    with pytest.raises(
        ValueError, match=rf"NaN or Inf logits for {len(bad)} sample\(s\): {bad[0]!r}"
    ):
        dump_teacher_logits(NanAt(), items, tmp_path / "nan", progress=False)
    big = Constant(torch.tensor([[1e5, 0.0]]))
    with pytest.raises(ValueError, match=r"beyond the float16 range.*'clips/00000.wav'"):
        dump_teacher_logits(big, items, tmp_path / "f16", dtype="float16", progress=False)
    dump_teacher_logits(big, items, tmp_path / "f32", dtype="float32", progress=False)


def test_refuses_changed_teacher_and_dtype(tmp_path):
    items = make_items(4)
    dump_teacher_logits({"a": make_teacher(0)}, items, tmp_path, progress=False)
    with pytest.raises(ValueError, match="teacher 'a' has other weights"):
        dump_teacher_logits({"a": make_teacher(9)}, items, tmp_path, progress=False)
    with pytest.raises(ValueError, match="stores float32; dump with dtype='float32'"):
        dump_teacher_logits(
            {"a": make_teacher(0)}, items, tmp_path, dtype="float16", progress=False
        )
    with pytest.raises(KeyError, match="sample key in 'name'"):
        dump_teacher_logits(
            {"b": make_teacher(0)}, items, tmp_path / "x", key_field="name", progress=False
        )
    with pytest.raises(ValueError, match="dtype must be one of"):
        dump_teacher_logits(make_teacher(0), items, tmp_path / "x", dtype="bfloat16")
    with pytest.raises(ValueError, match="teacher names must be"):
        dump_teacher_logits({"../evil": make_teacher(0)}, items, tmp_path / "x")


def test_training_mode_restored(tmp_path):
    teacher = make_teacher(0)
    teacher.train()
    teacher[1].eval()  # a submodule in another mode must come back as it was

    seen = []
    teacher.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    dump_teacher_logits(teacher, make_items(3), tmp_path, progress=False)
    assert seen == [False]
    assert teacher.training and teacher[0].training and not teacher[1].training


def test_readme_cache_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Teacher-logit cache", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([32, 4])" in capsys.readouterr().out


def test_teacher_on_another_device_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"teacher 'teacher' is on cpu but device='meta'"):
        dump_teacher_logits(make_teacher(0), make_items(2), tmp_path, device="meta")
