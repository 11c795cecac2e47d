"""Crashes and full disks during a dump lose nothing: the old cache or the new one, then resume.

* ``test_sigkill_at_random_points``: a subprocess runs :func:`dump_teacher_logits` (append
  48 samples and add a teacher to a 24-sample cache, ``checkpoint_rows=8``) and announces
  every teacher call, chunk write, journal commit, fsync and cleanup on stdout; the test
  SIGKILLs it right after a seeded-random one of those events (plus up to 20 ms), so kills
  land in the teacher loop, mid-chunk, mid-merge, around the manifest and during cleanup.
  After each kill the cache verifies and is exactly the previous state or exactly the new
  one; re-running the dump then gives a cache bitwise equal to an uninterrupted dump.
* ``test_disk_full_*``: ``ENOSPC`` injected part-way through the byte stream the dump
  writes, and at the fsync of the merged logits: a clear ``OSError`` naming the file, the
  previous cache intact (verify passes, same content), no temporary file left, and the
  next dump resumes to the uninterrupted result.

Teachers are integer-weight linear maps on small-integer features, so logits are exact in
float32 whatever the batch composition: "bitwise equal" is a fair requirement.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdkit.cache._format as fmt
import kdkit.cache.ensembles as ensembles_mod
import kdkit.cache.journal as journal_mod
import kdkit.cache.writer as writer_mod
from kdkit.cache import dump_teacher_logits, load_cached_logits, verify_cache

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent.parent / "src")

# The durable steps of a dump, announced (or counted) by wrapping them where they are called.
EVENTS = [
    (journal_mod, "write_bytes_durably"),
    (journal_mod, "write_json_durably"),
    (writer_mod, "write_bytes_durably"),
    (writer_mod, "write_json_durably"),
    (writer_mod, "fsync_file"),
    (ensembles_mod, "fsync_file"),
    (writer_mod, "_cleanup"),
]
KILLS = 6
CHILD_TIMEOUT = 60

FEATURES, CLASSES = 4, 6
BASE_N, FULL_N = 24, 72
DUMP_ARGS = dict(batch_size=4, checkpoint_rows=8, progress=False)


def make_items(n):
    feats = (torch.arange(n * FEATURES, dtype=torch.float32).reshape(n, FEATURES) * 7) % 11 - 5
    return [{"features": feats[i], "path": f"clips/{i:03d}.wav"} for i in range(n)]


def make_teacher(seed):
    t = nn.Linear(FEATURES, CLASSES)
    with torch.no_grad():
        w = torch.arange(CLASSES * FEATURES, dtype=torch.float32).reshape(CLASSES, FEATURES)
        t.weight.copy_((w * (seed + 3)) % 9 - 4)
        t.bias.copy_(torch.arange(CLASSES, dtype=torch.float32) - seed)
    return t


class Wrapped(nn.Module):
    """A teacher inside a wrapper (state_dict keys ``inner.*``); ``announce`` prints calls."""

    def __init__(self, inner, announce=False):
        super().__init__()
        self.inner = inner
        self.announce = announce

    def forward(self, x):
        if self.announce:
            print("forward", flush=True)
            time.sleep(0.005)
        return self.inner(x)


def _teachers(announce=False):
    return {"a": Wrapped(make_teacher(0), announce), "b": Wrapped(make_teacher(1), announce)}


# The child imports this module (tests/ is on its path) to build the same teachers and data.
CHILD = """
import sys, time
from kdkit.cache import dump_teacher_logits
from test_crash_dump import DUMP_ARGS, EVENTS, FULL_N, _teachers, make_items


def announced(name, fn):
    def wrapper(*args, **kwargs):
        print(name, flush=True)
        time.sleep(0.005)
        return fn(*args, **kwargs)
    return wrapper


for module, name in EVENTS:
    setattr(module, name, announced(name, getattr(module, name)))
print("ready", flush=True)
dump_teacher_logits(_teachers(announce=True), make_items(FULL_N), sys.argv[1], **DUMP_ARGS)
print("done", flush=True)
"""


def _snapshot(d):
    """Everything a reader can see: keys, teachers, fingerprints and logits (bitwise)."""
    index = verify_cache(d)
    keys = index.keys()
    return {
        "keys": keys,
        "teachers": {
            n: (t["fingerprint"], t["num_classes"], t["dtype"])
            for n, t in index.manifest["teachers"].items()
        },
        "logits": {n: load_cached_logits(keys, index, teacher=n).numpy() for n in index.teachers},
    }


def _same(a, b):
    return (
        a["keys"] == b["keys"]
        and a["teachers"] == b["teachers"]
        and all(np.array_equal(a["logits"][n], b["logits"][n]) for n in a["logits"])
    )


def _clean(d):
    """Only the files the manifest names are left (no .partial, no temporary files)."""
    names = set(json.loads((d / "manifest.json").read_text())["files"]) | {"manifest.json"}
    return {p.name for p in d.iterdir()} == names


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    base = root / "base"
    dump_teacher_logits({"a": _teachers()["a"]}, make_items(BASE_N), base, **DUMP_ARGS)
    full = root / "full"
    shutil.copytree(base, full)
    dump_teacher_logits(_teachers(), make_items(FULL_N), full, **DUMP_ARGS)
    return base, _snapshot(base), _snapshot(full)


def _count_events(base, tmp_path, monkeypatch):
    """How many announced events an uninterrupted run produces (same code path, in-process)."""
    d = tmp_path / "count"
    shutil.copytree(base, d)
    count = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        for module, name in EVENTS:
            m.setattr(module, name, counted(getattr(module, name)))
        teachers = _teachers()
        for t in teachers.values():
            t.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        dump_teacher_logits(teachers, make_items(FULL_N), d, **DUMP_ARGS)
    return count[0]


def _run_and_kill(cache_dir, kill_after, jitter):
    """Run the child; SIGKILL it after its ``kill_after``-th event. Returns events seen."""
    path = os.pathsep.join([SRC, str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(CHILD_TIMEOUT, proc.kill)
    watchdog.start()
    seen = 0
    try:
        for line in proc.stdout:
            if line.strip() in ("ready", "done"):
                continue
            seen += 1
            if seen == kill_after:
                threading.Event().wait(jitter)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=CHILD_TIMEOUT)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return seen


# A kill after the manifest commit leaves .partial behind: the resume says it removes it.
@pytest.mark.filterwarnings("ignore:removing the leftovers of a dump")
def test_sigkill_at_random_points(states, tmp_path, monkeypatch):
    base, before, after = states
    total = _count_events(base, tmp_path, monkeypatch)
    rng = random.Random(20261128)
    # Stratified random points over the teacher loop, chunk commits and the merge, then the
    # last two events: the manifest replacement and the cleanup after it.
    points = [1 + int((run + rng.random()) / (KILLS - 2) * (total - 2)) for run in range(KILLS - 2)]
    points += [total - 1, total]
    outcomes = []
    for run, kill_after in enumerate(points):
        d = tmp_path / f"run{run}"
        shutil.copytree(base, d)
        seen = _run_and_kill(d, kill_after, rng.uniform(0, 0.02))
        assert seen == kill_after, f"run {run}: the child stopped after {seen} events"
        state = _snapshot(d)  # verify_cache passes
        assert _same(state, before) or _same(state, after), f"run {run}: a mixed state"
        outcomes.append("new" if _same(state, after) else "old")
        dump_teacher_logits(_teachers(), make_items(FULL_N), d, **DUMP_ARGS)  # resume
        assert _same(_snapshot(d), after), f"run {run}: the resumed cache differs"
        assert _clean(d)
    assert outcomes[0] == "old" and outcomes[-1] == "new", (points, outcomes)


# -- disk full ---------------------------------------------------------------------------------


class _FullDisk:
    """``open`` for kdkit.cache._format whose files raise ENOSPC after ``budget`` bytes."""

    def __init__(self, budget):
        self.left = budget
        self.written = 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 -- closed by the caller's with
        if "w" not in mode and "a" not in mode:
            return f
        disk = self
        real_write = f.write

        class Writer:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                n = len(data)
                if n > disk.left:
                    real_write(bytes(data[: disk.left]))
                    disk.left = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.left -= n
                disk.written += n
                return real_write(data)

        return Writer()


def _bytes_written(base, tmp_path, monkeypatch):
    d = tmp_path / "measure"
    shutil.copytree(base, d)
    disk = _FullDisk(1 << 40)
    with monkeypatch.context() as m:
        m.setattr(fmt, "open", disk, raising=False)
        dump_teacher_logits(_teachers(), make_items(FULL_N), d, **DUMP_ARGS)
    return disk.written


def _no_temporary_files(d):
    return not [p for p in d.rglob("*.tmp")]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.35, 0.6, 0.85, 0.99])
def test_disk_full_while_writing(fraction, states, tmp_path, monkeypatch):
    base, before, after = states
    total = _bytes_written(base, tmp_path, monkeypatch)
    d = tmp_path / "cache"
    shutil.copytree(base, d)
    with monkeypatch.context() as m:
        m.setattr(fmt, "open", _FullDisk(int(fraction * total)), raising=False)
        with pytest.raises(OSError, match=r"No space left on device: could not write /") as info:
            dump_teacher_logits(_teachers(), make_items(FULL_N), d, **DUMP_ARGS)
    assert info.value.errno == errno.ENOSPC
    assert "run the dump again to resume" in str(info.value)
    assert _same(_snapshot(d), before)  # the previous cache, intact and verified
    assert _no_temporary_files(d)
    dump_teacher_logits(_teachers(), make_items(FULL_N), d, **DUMP_ARGS)  # space freed: resume
    assert _same(_snapshot(d), after) and _clean(d)


def test_disk_full_at_fsync_of_merged_logits(states, tmp_path, monkeypatch):
    base, before, after = states
    d = tmp_path / "cache"
    shutil.copytree(base, d)

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as m:
        m.setattr(writer_mod, "fsync_file", full)
        with pytest.raises(OSError, match=r"No space left on device: '.*logits-.-g2\.bin'"):
            dump_teacher_logits(_teachers(), make_items(FULL_N), d, **DUMP_ARGS)
    assert _same(_snapshot(d), before)
    dump_teacher_logits(_teachers(), make_items(FULL_N), d, **DUMP_ARGS)
    assert _same(_snapshot(d), after) and _clean(d)
