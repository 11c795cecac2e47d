"""Host syncs per training step: the number is pinned, so adding one fails here.

On CPU nothing "syncs", so the test counts what would on a GPU: every conversion of a
tensor to Python (``.item()``, ``.tolist()``, ``.numpy()``, ``float()``, ``int()``,
``bool()`` on a tensor) made while ``kdkit.train.epoch._train_step`` runs.  The
expected counts are those of docs/performance.md: **one** per optimiser step (the
stats transfer), whatever the options, plus one inside GradScaler.step under fp16.
The optimiser is SGD: Adam's step reads its CPU step counter with ``.item()`` (a host
tensor even on CUDA, so no device sync), which would be counted here too.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from train_support import TRAIN, tiny

import kdkit.train.config as config_module
import kdkit.train.epoch as epoch_module
from kdkit.train import train_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_CONVERSIONS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__")


class SyncCounter:
    """Counts tensor-to-Python conversions inside ``_train_step``, per step."""

    def __init__(self, monkeypatch) -> None:
        self.per_step: list[int] = []
        self.sites: list[str] = []
        self._inside = False
        for name in _CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))
        real_step = epoch_module._train_step

        def step(*args, **kwargs):
            self.per_step.append(0)
            self._inside = True
            try:
                return real_step(*args, **kwargs)
            finally:
                self._inside = False

        monkeypatch.setattr(epoch_module, "_train_step", step)

    def _counting(self, method):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter._inside:
                counter._inside = False  # nested conversions (tolist -> item) count once
                try:
                    counter.per_step[-1] += 1
                    counter.sites.append("".join(traceback.format_stack(limit=4)[:-1]))
                    return method(tensor, *args, **kwargs)
                finally:
                    counter._inside = True
            return method(tensor, *args, **kwargs)

        return wrapper


SGD = {"optimizer": "sgd", "batch_size": 8, "epochs": 1}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"grad_accum": 3},
        {"clip_grad_norm": 0.5},
        {"ema_decay": 0.9},
        {"lr_warmup_epochs": 1.0},
        {"precision": "bf16"},
        {"grad_accum": 2, "clip_grad_norm": 1.0, "ema_decay": 0.99, "precision": "bf16"},
    ],
    ids=lambda o: ",".join(o) or "plain",
)
@pytest.mark.parametrize("kd_on", [None, "all", "target"])
def test_one_host_sync_per_step(tmp_path, monkeypatch, cache_dir, options, kd_on):
    kd = {} if kd_on is None else {"cache": cache_dir, "teacher": ["a"], "kd_on": kd_on}
    counter = SyncCounter(monkeypatch)
    train_student(tiny(tmp_path, **SGD, **kd, **options), train_data=TRAIN)
    assert counter.per_step and counter.per_step == [1] * len(counter.per_step), counter.sites


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_feature_kd_step_keeps_the_one_host_sync(tmp_path, monkeypatch, grad_accum):
    """Feature KD's stats join the step's one transfer (with and without accumulation)."""
    torch.manual_seed(7)
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    counter = SyncCounter(monkeypatch)
    config = tiny(tmp_path, **SGD, feature_kd=["1:0:0.5"], grad_accum=grad_accum)
    train_student(config, train_data=TRAIN, teachers={"t": teacher})
    assert counter.per_step and counter.per_step == [1] * len(counter.per_step), counter.sites


def test_fp16_adds_the_grad_scaler_check(tmp_path, monkeypatch, cache_dir):
    real = config_module.check_precision
    monkeypatch.setattr(config_module, "check_precision", lambda p, d, c: real(p, "cuda", c))
    counter = SyncCounter(monkeypatch)
    config = tiny(
        tmp_path, precision="fp16", clip_grad_norm=1.0, cache=cache_dir, teacher=["a"], **SGD
    )
    train_student(config, train_data=TRAIN)
    assert counter.per_step == [2] * 6, counter.sites
    assert sum("grad_scaler" in site for site in counter.sites) == 6


def test_the_counter_sees_an_added_sync(tmp_path, monkeypatch):
    """The assertion above is real: one extra .item() in the step is counted."""
    counter = SyncCounter(monkeypatch)
    real_to_device = epoch_module.to_device

    def syncing(tensor, device):
        tensor.sum().item()
        return real_to_device(tensor, device)

    monkeypatch.setattr(epoch_module, "to_device", syncing)
    train_student(tiny(tmp_path, **SGD), train_data=TRAIN)
    assert counter.per_step == [3] * 6  # features and labels: two more


def test_to_device_on_cpu_is_a_plain_move():
    from kdkit.train.transfer import to_device

    x = torch.randn(3)
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_pins_and_copies_asynchronously():  # untested here: no GPU in CI
    from kdkit.train.transfer import to_device

    x = torch.randn(4, 3)
    y = to_device(x, torch.device("cuda"))
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x)
    pinned = torch.randn(4, 3).pin_memory()
    assert to_device(pinned, torch.device("cuda")).device.type == "cuda"
