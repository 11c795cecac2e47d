"""Readers during a concurrent dump see one committed state, never a mix.

A writer subprocess grows a cache step by step (appends samples, then adds a teacher, then
appends again).  Meanwhile the test process opens the cache over and over
(:func:`load_cache_index`, :func:`load_cached_logits` for every key and teacher,
:meth:`CacheIndex.verify`, :func:`verify_cache`) and checks that what it read is exactly one
of the writer's committed states: the key list is a known prefix, the teacher set a known
one, and every logit bitwise equal to that state's.

What makes this hold (see ``docs/reliability.md``): files are generation-named and never
modified in place, the manifest is replaced atomically, :func:`load_cache_index` maps every
file of the generation it read (the maps stay readable after a later dump deletes the
files) and retries with the new manifest when a dump deleted a file between its reading
the manifest and mapping the file.
"""

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdkit.cache.index as index_mod
from kdkit.cache import (
    CacheError,
    dump_teacher_logits,
    load_cache_index,
    load_cached_logits,
    verify_cache,
)

TESTS = Path(__file__).resolve().parent
FEATURES, CLASSES = 3, 4
# (number of samples, teachers) of each committed state, in order.
STEPS = [(n, ("a",)) for n in range(8, 97, 16)] + [(n, ("a", "b")) for n in range(96, 161, 16)]
READ_SECONDS = 30  # upper bound on the reader loop; it ends when the writer is done


def make_items(n):
    feats = (torch.arange(n * FEATURES, dtype=torch.float32).reshape(n, FEATURES) * 5) % 13 - 6
    return [{"features": feats[i], "path": f"s{i:04d}"} for i in range(n)]


def make_teacher(name):
    t = nn.Linear(FEATURES, CLASSES)
    seed = {"a": 1, "b": 2}[name]
    with torch.no_grad():
        w = torch.arange(CLASSES * FEATURES, dtype=torch.float32).reshape(CLASSES, FEATURES)
        t.weight.copy_((w * seed) % 7 - 3)
        t.bias.copy_(torch.arange(CLASSES, dtype=torch.float32) * seed)
    return t


def dump_step(cache_dir, step):
    n, names = STEPS[step]
    teachers = {name: make_teacher(name) for name in names}
    dump_teacher_logits(teachers, make_items(n), cache_dir, batch_size=16, progress=False)


WRITER = """
import sys
from test_cache_concurrency import STEPS, dump_step
for step in range(1, len(STEPS)):
    dump_step(sys.argv[1], step)
"""


def _expected():
    feats = torch.stack([item["features"] for item in make_items(STEPS[-1][0])])
    with torch.no_grad():
        return {name: make_teacher(name)(feats).numpy() for name in ("a", "b")}


ALL_KEYS = [item["path"] for item in make_items(STEPS[-1][0])]
EXPECTED = _expected()


def check_consistent(index):
    """The state ``index`` shows is exactly one committed step; return its number."""
    keys = index.keys()
    state = (len(keys), index.teachers)
    assert state in STEPS, f"a state the writer never committed: {state}"
    assert keys == ALL_KEYS[: len(keys)]
    for name in index.teachers:
        got = load_cached_logits(keys, index, teacher=name).numpy()
        assert np.array_equal(got, EXPECTED[name][: len(keys)]), f"teacher {name}: mixed data"
    index.verify()
    return STEPS.index(state)


def test_readers_see_old_or_new_never_a_mix(tmp_path):
    d = tmp_path / "cache"
    dump_step(d, 0)
    path = os.pathsep.join(
        [str(TESTS.parent.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(d)],
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(READ_SECONDS + 60, writer.kill)
    watchdog.start()
    seen, reads = set(), 0
    try:
        stop = time.monotonic() + READ_SECONDS
        while writer.poll() is None and time.monotonic() < stop:
            seen.add(check_consistent(load_cache_index(d)))
            verify_cache(d)
            reads += 1
        _, err = writer.communicate(timeout=READ_SECONDS + 60)
    finally:
        watchdog.cancel()
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, err
    seen.add(check_consistent(load_cache_index(d)))
    assert reads > 0 and {0, len(STEPS) - 1} <= seen


def test_an_open_index_keeps_reading_its_generation(tmp_path):
    d = tmp_path / "cache"
    dump_step(d, 0)
    old = load_cache_index(d)
    old_copy = pickle.loads(pickle.dumps(old))  # maps nothing until first used
    for step in (1, 2, 3):  # three later commits: generation 1's files are deleted
        dump_step(d, step)
    assert not (d / old.manifest["teachers"]["a"]["file"]).exists()
    assert check_consistent(old) == 0  # the pinned generation, bitwise, and it verifies
    with pytest.raises(CacheError, match=r"is missing.*open the cache again with load_cache_index"):
        load_cached_logits(ALL_KEYS[:8], old_copy)
    assert check_consistent(load_cache_index(d)) == 3


def test_open_retries_when_a_dump_replaced_the_manifest_it_read(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    dump_step(d, 0)
    stale = load_cache_index(d).manifest
    dump_step(d, 1)
    dump_step(d, 2)  # the files named by `stale` are gone
    real = index_mod.read_manifest
    calls = []

    def racing(path):  # the first read sees the manifest of before the dumps
        calls.append(path)
        return stale if len(calls) == 1 else real(path)

    monkeypatch.setattr(index_mod, "read_manifest", racing)
    assert check_consistent(load_cache_index(d)) == 2
    assert len(calls) == 2
