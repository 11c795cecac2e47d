"""Mixed precision (kdkit.train.precision): bf16 on CPU, fp16 + GradScaler mechanics.

fp16 is refused on CPU by the config (CUDA only); the GradScaler mechanics -- skipped
steps, the stop after too many, the bit-for-bit scaler state on resume -- are the same
code on every device, so these tests lift the refusal (``allow_cpu_fp16``) and run them
on CPU with ``torch.amp.GradScaler('cpu')``.  The CUDA path itself is untested here.
"""

from __future__ import annotations

import pytest
import torch
from train_support import TEST, TRAIN, tiny, weights

from kdkit.cli import main
from kdkit.losses.kd import KDLossConfig, compute_student_loss
from kdkit.train import TrainConfig, train_student
from kdkit.train.accumulation import MicroBatch, StepTotals, step_normaliser
from kdkit.train.checkpoints import load_training_state
from kdkit.train.precision import Precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def allow_cpu_fp16(monkeypatch):
    import kdkit.train.config as config_module

    real = config_module.check_precision
    monkeypatch.setattr(config_module, "check_precision", lambda p, d, c: real(p, "cuda", c))


class _Recorder(torch.nn.Module):
    """An MLP that records the dtype of its logits (autocast on or off)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )
        self.dtypes: list[torch.dtype] = []

    def forward(self, x):
        y = self.net(x)
        self.dtypes.append(y.dtype)
        return y


@pytest.mark.parametrize(("precision", "dtype"), [("32", torch.float32), ("bf16", torch.bfloat16)])
def test_forward_runs_under_autocast_and_evaluation_does_not(tmp_path, cache_dir, precision, dtype):
    model = _Recorder()
    config = tiny(tmp_path, precision=precision, cache=cache_dir, teacher=["a"], epochs=1)
    result = train_student(config, model=model, train_data=TRAIN, eval_data=TEST)
    assert model.dtypes[0] == dtype and set(model.dtypes[:3]) == {dtype}
    assert model.dtypes[-1] == torch.float32  # the evaluation: plain float32
    assert next(result.model.parameters()).dtype == torch.float32  # float32 master weights


def test_losses_are_float32_for_half_logits():
    config = KDLossConfig(temperature=4.0, kd_alpha=0.7)
    s = torch.randn(6, 5).to(torch.bfloat16).requires_grad_()
    t, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    mb = MicroBatch(None, y, t, None)
    totals = StepTotals(step_normaliser([mb], config, torch.float32), config, 10.0)
    loss = totals.loss(s, mb)
    assert loss.dtype == torch.float32
    reference, _ = compute_student_loss(s.float(), t, y, config, current_epoch=10.0)
    torch.testing.assert_close(loss, reference)


def test_bf16_run_trains_close_to_float32(tmp_path):
    a = train_student(tiny(tmp_path, "a", epochs=2), train_data=TRAIN, eval_data=TEST)
    b = train_student(
        tiny(tmp_path, "b", epochs=2, precision="bf16"), train_data=TRAIN, eval_data=TEST
    )
    wa, wb = weights(a.model), weights(b.model)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # bf16 did change the forward
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0.05, atol=0.02)


def test_fp16_on_cpu_is_refused_with_one_line(capsys, tmp_path):
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        TrainConfig(precision="fp16")
    TrainConfig(precision="fp16", device="cuda")  # validated without touching a GPU
    assert main(["train-student", "--manifest", "m.jsonl", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "precision 'fp16' needs a CUDA device" in err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--grad_accum", "0", "grad_accum must be >= 1"),
        ("--ema_decay", "1.0", "ema_decay must be in the open interval (0, 1)"),
        ("--ema_decay", "0", "ema_decay must be in the open interval (0, 1)"),
        ("--clip_grad_norm", "0", "clip_grad_norm must be a finite number > 0"),
        ("--clip_grad_norm", "-1", "clip_grad_norm must be a finite number > 0"),
        ("--lr_warmup_epochs", "-1", "lr_warmup_epochs must be a finite number >= 0"),
        ("--precision", "16", "precision"),
        ("--best_on", "ema", "best_on 'ema' needs an EMA"),
        ("--max_skipped_steps", "0", "max_skipped_steps must be >= 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, flag, value, message):
    assert main(["train-student", "--manifest", "m.jsonl", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


@pytest.mark.usefixtures("allow_cpu_fp16")
def test_fp16_resume_keeps_the_scaler_state_bit_for_bit(tmp_path, cache_dir):
    extra = {
        "precision": "fp16",
        "epochs": 3,
        "cache": cache_dir,
        "teacher": ["a"],
        "batch_size": 8,
    }
    full = train_student(tiny(tmp_path, "full", **extra), train_data=TRAIN, eval_data=TEST)
    train_student(
        tiny(tmp_path, "part", stop_after_epoch=2, **extra), train_data=TRAIN, eval_data=TEST
    )
    part_state = load_training_state(tmp_path / "part" / "checkpoints" / "last_state.pt")
    scaler = part_state["precision"]
    assert set(scaler) >= {"scale", "_growth_tracker", "skipped_in_a_row"}
    assert scaler["_growth_tracker"] == 12  # 12 unskipped steps so far
    resumed = train_student(
        tiny(tmp_path, "part", resume=True, **extra), train_data=TRAIN, eval_data=TEST
    )
    wf, wr = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed.history == full.history
    a = load_training_state(full.output_dir / "checkpoints" / "last_state.pt")["precision"]
    b = load_training_state(resumed.output_dir / "checkpoints" / "last_state.pt")["precision"]
    assert a == b


class _PoisonGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _Overflowing(torch.nn.Module):
    """Finite outputs, non-finite gradients at every loss scale."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, x):
        return _PoisonGrad.apply(self.linear(x))


@pytest.mark.usefixtures("allow_cpu_fp16")
def test_too_many_skipped_fp16_steps_stop_the_run(tmp_path):
    model = _Overflowing()
    before = weights(model)
    config = tiny(tmp_path, precision="fp16", batch_size=8, max_skipped_steps=3)
    with pytest.raises(FloatingPointError, match=r"last 4 optimiser steps were all skipped"):
        train_student(config, model=model, train_data=TRAIN)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no update


def test_skipped_steps_are_counted_on_the_device_and_reset():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = Precision("fp16", torch.device("cpu"), max_skipped_steps=5)
    for value in (float("inf"), float("nan"), 1.0, float("inf")):
        opt.zero_grad()
        policy.backward(model(torch.tensor([[value, 1.0]])).sum())
        policy.step(opt)
        policy.check_skipped(float(policy.skipped_in_a_row))
    assert float(policy.skipped_in_a_row) == 1.0  # reset by the good step
    state = policy.state_dict()
    other = Precision("fp16", torch.device("cpu"))
    other.load_state_dict(state)
    assert other.state_dict() == state


@cuda
def test_fp16_on_cuda_trains(tmp_path):  # untested here: no GPU in CI
    config = tiny(tmp_path, precision="fp16", device="cuda", epochs=1)
    result = train_student(config, train_data=TRAIN, eval_data=TEST)
    assert result.completed
