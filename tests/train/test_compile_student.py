"""compile=True (kdkit.train.compiled): checkpoints of a compiled student load without it.

The fast tests replace torch.compile by a stand-in with the same ``_orig_mod`` layout
(its ``state_dict`` keys carry the ``_orig_mod.`` prefix), so saving the wrong module
would show; the real torch.compile run is slow and runs in CI (``CI`` set) or with
``KDKIT_SLOW_TESTS=1``, like tests/losses/test_compile.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from train_support import TEST, TRAIN, tiny, weights

import kdkit.train.setup as train_setup
from kdkit.train import load_model_from_run, train_student
from kdkit.train.checkpoints import load_training_state
from kdkit.train.compiled import unwrap_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

slow = pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("KDKIT_SLOW_TESTS")),
    reason="slow torch.compile tests: set CI=1 or KDKIT_SLOW_TESTS=1",
)


class _StandIn(nn.Module):
    """What torch.compile returns, structurally: the module under ``_orig_mod``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self._orig_mod(x)


def test_unwrap_model():
    plain = nn.Linear(3, 2)
    compiled = torch.compile(plain)  # lazy: nothing is compiled until the first call
    assert unwrap_model(compiled) is plain
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(_StandIn(_StandIn(plain))) is plain
    assert unwrap_model(plain) is plain


def _check_plain_checkpoints(result):
    ckpt = result.output_dir / "checkpoints"
    state = load_training_state(ckpt / "last_state.pt")
    keys = list(state["model"]) + list(state.get("ema", {}))
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    for which in ("best", "last"):
        plain = load_model_from_run(result.output_dir, which)  # an un-compiled model
        assert type(plain) is type(result.model)
    loaded = load_model_from_run(result.output_dir, "last")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in weights(result.model).items())


def test_compiled_student_saves_plain_checkpoints(tmp_path, monkeypatch):
    wrappers = []

    def stand_in(module):
        wrappers.append(_StandIn(module))
        return wrappers[-1]

    monkeypatch.setattr(train_setup, "compile_student", stand_in)
    config = tiny(tmp_path, compile=True, ema_decay=0.9, epochs=2)
    result = train_student(config, train_data=TRAIN, eval_data=TEST)
    assert wrappers and wrappers[0].calls == 6  # the steps ran through the wrapper
    assert not isinstance(result.model, _StandIn)
    _check_plain_checkpoints(result)


def test_resume_may_switch_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(train_setup, "compile_student", _StandIn)
    plain = train_student(tiny(tmp_path, "plain", epochs=2), train_data=TRAIN)
    train_student(tiny(tmp_path, "part", epochs=2, stop_after_epoch=1), train_data=TRAIN)
    resumed = train_student(
        tiny(tmp_path, "part", epochs=2, resume=True, compile=True), train_data=TRAIN
    )  # no "changed setting" warning: compile does not change the result
    wp = weights(plain.model)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in wp.items())


@slow
def test_torch_compile_run(tmp_path):
    torch._dynamo.reset()
    try:
        no_dropout = {"model_kwargs": {"hidden": [8], "dropout": 0.0}, "epochs": 1}
        config = tiny(tmp_path, compile=True, **no_dropout)  # compiled dropout: other RNG
        result = train_student(config, train_data=TRAIN, eval_data=TEST)
        _check_plain_checkpoints(result)
        eager = train_student(
            tiny(tmp_path, "eager", **no_dropout), train_data=TRAIN, eval_data=TEST
        )
        for k, v in weights(eager.model).items():
            torch.testing.assert_close(result.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()
