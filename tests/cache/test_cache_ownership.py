"""A dump deletes only files kdkit wrote and refuses a foreign directory (issue 11, item 2)."""

from __future__ import annotations

import os

import pytest
from cache_testing import make_items, make_teacher

from kdkit.cache import dump_teacher_logits, load_cache_index, verify_cache


def _user_files(root):
    files = {"keys-mine.txt": b"my keys\n", "backup.tmp": b"backup", "logits-notes.bin": b"x"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def test_cleanup_keeps_user_files_that_look_like_cache_files(tmp_path):
    dump_teacher_logits(make_teacher(0), make_items(8), tmp_path, progress=False)
    files = _user_files(tmp_path)
    # Adding samples commits a new generation: the old generation's files go, the user's stay.
    dump_teacher_logits(make_teacher(0), make_items(12), tmp_path, progress=False)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
    assert verify_cache(tmp_path).num_samples == 12
    assert not list(tmp_path.glob("*-g1.*"))


def test_refuses_a_non_empty_directory_that_is_not_a_cache(tmp_path):
    files = _user_files(tmp_path)
    with pytest.raises(ValueError, match=r"not a kdkit cache.*backup\.tmp.*allow_other_files"):
        dump_teacher_logits(make_teacher(0), make_items(8), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    # Told to: the cache is created next to the files, which survive.
    dump_teacher_logits(
        make_teacher(0), make_items(8), tmp_path, progress=False, allow_other_files=True
    )
    dump_teacher_logits(make_teacher(0), make_items(10), tmp_path, progress=False)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
    assert verify_cache(tmp_path).num_samples == 10


def test_dump_into_a_locked_cache_fails_and_readers_stay_allowed(holder, tmp_path):
    directory, proc = holder
    cache = tmp_path / "cache"
    dump_teacher_logits(make_teacher(0), make_items(4), cache, progress=False)
    (directory / "manifest.json").unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match=rf"kdkit cache dump \(pid {proc.pid}\)"):
        dump_teacher_logits(make_teacher(0), make_items(4), directory, progress=False)
    # A reader of a cache whose directory is locked by a dump still opens it.
    os.replace(directory / ".kdkit.lock", cache / ".kdkit.lock")
    assert load_cache_index(cache).num_samples == 4
