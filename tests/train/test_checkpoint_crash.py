"""Crashes and full disks while ``train_student`` writes its checkpoints lose nothing.

* ``test_checkpoint_*``: ``train_student``'s ``checkpoints/last`` interrupted at each of
  its three file replacements (before and after), and ENOSPC while writing its weights or
  its optimiser state; the resumed run must equal the uninterrupted one bitwise, and no
  temporary file may be left behind (``last_state.pt`` is the single commit point).

(The crash tests of the teacher dump are in ``tests/cache/test_crash_dump.py``.)
"""

import errno
import os

import numpy as np
import pytest
import torch

# -- train-student checkpoints -----------------------------------------------------------------
#
# ``checkpoints/last`` is three files replaced one after the other (weights, metadata,
# optimiser/RNG state).  A crash is simulated by raising at the n-th replacement (before or
# after it happens): what a SIGKILL at that instant leaves on disk.  Resuming must then give
# the uninterrupted run's weights bitwise.


class _Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even ``except Exception``)."""


def _train_setup():
    pytest.importorskip("safetensors")
    from kdkit.data import ArrayDataset
    from kdkit.train import TrainConfig, train_student

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    data = ArrayDataset(x, y, np.arange(32) % 3, [f"s{i}" for i in range(32)])

    def run(out, **overrides):
        values = {
            "epochs": 3,
            "batch_size": 16,
            "lr": 1e-2,
            "output_dir": str(out),
            "model_kwargs": {"hidden": [8], "dropout": 0.2},
            "progress": False,
            "num_classes": 3,
            **overrides,
        }
        return train_student(TrainConfig.from_dict(values), train_data=data, eval_data=data)

    return run


def _state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = _train_setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _state_dict(run(tmp_path_factory.mktemp("train") / "full").model)
    finally:
        torch.set_num_threads(threads)


# Replacements per epoch: best weights, best json (when the metric improves), last weights,
# last json, last state.  Crash points are in the second epoch's checkpoint.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "target, after",
    [
        ("last.safetensors", False),
        ("last.safetensors", True),
        ("last.json", False),
        ("last.json", True),
        ("last_state.pt", False),
        ("last_state.pt", True),
    ],
    ids=[
        "before-weights",
        "after-weights",
        "before-json",
        "after-json",
        "before-state",
        "after-state",
    ],
)
def test_checkpoint_crash_then_resume(target, after, uninterrupted, tmp_path, monkeypatch):
    import kdkit._io as io

    run = _train_setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real = io._replace
    seen = {}

    def crashing(tmp, final):
        seen[final.name] = seen.get(final.name, 0) + 1
        crash = final.name == target and seen[final.name] == 2  # the second epoch's
        if crash and not after:
            raise _Crash
        out = real(tmp, final)
        if crash:
            raise _Crash
        return out

    try:
        with monkeypatch.context() as m:
            m.setattr(io, "_replace", crashing)
            with pytest.raises(_Crash):
                run(tmp_path / "run")
        resumed = run(tmp_path / "run", resume=True)
    finally:
        torch.set_num_threads(threads)
    got = _state_dict(resumed.model)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got), "resume is not bitwise"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "target",
    [
        "safetensors",
        "state",
    ],
)
def test_checkpoint_disk_full_keeps_the_previous_one(target, uninterrupted, tmp_path, monkeypatch):
    import kdkit.train.checkpoints as ckpt

    run = _train_setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calls = [0]
    real_st, real_save = ckpt._safetensors(), torch.save

    def full(path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # a part, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    class FullSafetensors:
        load_model = staticmethod(real_st.load_model)

        @staticmethod
        def save_model(model, path):
            calls[0] += 1
            if calls[0] == 4:  # epoch 2's last weights (best, last, best, last)
                full(path)
            real_st.save_model(model, path)

    def full_save(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # epoch 2's state
            full(path)
        return real_save(obj, path, *args, **kwargs)

    try:
        with monkeypatch.context() as m:
            if target == "safetensors":
                m.setattr(ckpt, "_safetensors", lambda: FullSafetensors)
            else:
                m.setattr(ckpt.torch, "save", full_save)
            with pytest.raises(OSError) as info:
                run(tmp_path / "run")
        assert info.value.errno == errno.ENOSPC and "No space left" in str(info.value)
        leftovers = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.tmp"))
        resumed = run(tmp_path / "run", resume=True)
    finally:
        torch.set_num_threads(threads)
    got = _state_dict(resumed.model)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got), "resume is not bitwise"
    assert not leftovers, f"temporary files left behind: {leftovers}"
