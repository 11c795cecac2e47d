"""Gradient accumulation (kdkit.train.accumulation): one update of the accumulated batch.

``batch_size=B * k, grad_accum=1`` and ``batch_size=B, grad_accum=k`` must give the same
update, also when ``kd_on='target'`` gives the micro-batches different KD counts, and
under DDP with 2 gloo ranks.  The 48 training samples are one optimiser step per epoch
in every configuration compared, so the sample order (RandomSampler or DistributedSampler)
does not matter.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from train_support import TRAIN, tiny, weights

from kdkit.losses.kd import KDLossConfig, compute_student_loss
from kdkit.models import mlp
from kdkit.train import train_student
from kdkit.train.accumulation import (
    MicroBatch,
    StepTotals,
    micro_batch_groups,
    optimizer_steps,
    step_normaliser,
)
from kdkit.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KD = {"kd_weighting": "pmax", "warmup_epochs": 0, "kd_ramp_epochs": 0, "kd_alpha": 0.7}


def _config(tmp_path, name, **overrides):
    values = {
        "optimizer": "sgd",
        "momentum": 0.0,
        "lr": 0.5,
        "lr_schedule": "constant",
        "model_kwargs": {"hidden": [8], "dropout": 0.0},
        "epochs": 2,
        **overrides,
    }
    return tiny(tmp_path, name, **values)


def _assert_same_weights(a, b, atol=1e-6):
    for k, v in weights(a).items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-5, atol=atol, msg=k)


def test_groups_and_step_count():
    assert [len(g) for g in micro_batch_groups(range(7), 3)] == [3, 3, 1]
    assert [len(g) for g in micro_batch_groups(range(6), 1)] == [1] * 6
    assert optimizer_steps(7, 3) == 3 and optimizer_steps(6, 3) == 2


@pytest.mark.parametrize(
    ("kd_on", "source"),
    [("all", [0]), ("target", [0]), ("target", [0, 1])],  # 2/3 or 1/3 of samples get KD
)
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(16, 3), (12, 4), (20, 3)])
def test_accumulated_update_equals_one_batch(
    tmp_path, cache_dir, kd_on, source, batch_size, grad_accum
):
    """(20, 3): micro-batches of 20, 20 and 8 samples -- uneven sizes and KD counts."""
    common = {
        "cache": cache_dir,
        "teacher": ["a"],
        "kd": KD,
        "kd_on": kd_on,
        "source_domain": source,
    }
    one = train_student(_config(tmp_path, "one", batch_size=48, **common), train_data=TRAIN)
    acc = train_student(
        _config(tmp_path, "acc", batch_size=batch_size, grad_accum=grad_accum, **common),
        train_data=TRAIN,
    )
    _assert_same_weights(one.model, acc.model)
    steps_one = read_metrics(one.output_dir / "metrics.jsonl", "step")
    steps_acc = read_metrics(acc.output_dir / "metrics.jsonl", "step")
    assert len(steps_one) == len(steps_acc) == 2  # one optimiser step per epoch
    for a, b in zip(steps_one, steps_acc):  # the stats are of the accumulated batch
        for key in ("total_loss", "ce_loss", "kd_loss", "coverage", "avg_confidence", "train_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_accumulated_ce_baseline_equals_one_batch(tmp_path):
    one = train_student(_config(tmp_path, "one", batch_size=48), train_data=TRAIN)
    acc = train_student(_config(tmp_path, "acc", batch_size=20, grad_accum=3), train_data=TRAIN)
    _assert_same_weights(one.model, acc.model)


def _micro(model_input, targets, teacher, mask):
    return MicroBatch(model_input, targets, teacher, mask)


def test_gradient_is_the_global_batch_not_a_mean_of_micro_batches():
    """The accumulated gradient is compute_student_loss's on the concatenated batch; the
    mean of per-micro-batch losses (what a naive loop does) is measurably different."""
    torch.manual_seed(0)
    config = KDLossConfig(temperature=2.0, kd_alpha=0.7, kd_weighting="pmax")
    x, t = torch.randn(12, 5), torch.randn(12, 4) * 3
    y = torch.randint(0, 4, (12,))
    mask = torch.tensor([True] * 5 + [False, False, True] + [False] * 4)  # KD 5, 1, 0
    model = mlp((5,), 4, hidden=(6,))
    sizes = (5, 3, 4)

    loss, _ = compute_student_loss(model(x), t, y, config, domain_mask=mask)
    reference = torch.autograd.grad(loss, list(model.parameters()))

    micro = [_micro(x[s], y[s], t[s], mask[s]) for s in (slice(0, 5), slice(5, 8), slice(8, 12))]
    totals = StepTotals(step_normaliser(micro, config, torch.float32), config, 0.0)
    model.zero_grad()
    for mb in micro:
        totals.loss(model(mb.features), mb).backward()
    for g, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    stats, acc, _ = totals.finish()
    expected = compute_student_loss(model(x), t, y, config, domain_mask=mask)[1]
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6), key

    model.zero_grad()
    start = 0
    for size in sizes:  # the naive loop: mean of the micro-batch losses
        s = slice(start, start + size)
        start += size
        naive, _ = compute_student_loss(model(x[s]), t[s], y[s], config, domain_mask=mask[s])
        (naive / len(sizes)).backward()
    diff = max((p.grad - g).abs().max().item() for g, p in zip(reference, model.parameters()))
    assert diff > 1e-3


def test_one_micro_batch_is_bit_for_bit_compute_student_loss():
    torch.manual_seed(1)
    config = KDLossConfig(temperature=4.0, kd_alpha=0.6, kd_weighting="threshold")
    s = torch.randn(9, 7, requires_grad=True)
    t, y = torch.randn(9, 7), torch.randint(0, 7, (9,))
    mb = _micro(None, y, t, None)
    totals = StepTotals(step_normaliser([mb], config, torch.float32), config, 3.0)
    mine = totals.loss(s, mb)
    theirs, stats = compute_student_loss(s, t, y, config, current_epoch=3.0)
    assert torch.equal(mine, theirs)
    assert totals.finish()[0] == stats


def test_bad_input_in_a_micro_batch_raises_before_the_update():
    config = KDLossConfig(kd_alpha=0.5)
    good = _micro(None, torch.tensor([0, 1]), torch.randn(2, 3), None)
    bad = _micro(None, torch.tensor([0, 5]), torch.randn(2, 3), None)
    totals = StepTotals(step_normaliser([good, bad], config, torch.float32), config, 0.0)
    for mb in (good, bad):
        totals.loss(torch.randn(2, 3, requires_grad=True), mb)
    with pytest.raises(ValueError, match="targets"):
        totals.finish()


# --- DDP: 2 gloo ranks x grad_accum 3 x batch 8 = one step of 48 ---------------------

SPAWN_TIMEOUT = 120.0


def _ddp_worker(rank: int, store: str, cache: str, out: str, kd_on: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        from pathlib import Path

        config = _config(
            Path(out),
            "ddp",
            batch_size=8,
            grad_accum=3,
            cache=cache,
            teacher=["a"],
            kd=KD,
            kd_on=kd_on,
            clip_grad_norm=0.5,
        )
        result = train_student(config, train_data=TRAIN)
        torch.save(weights(result.model), f"{out}/weights.{rank}")
        del result  # nothing of the run outlives the process group
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kd_on", ["target"])
def test_ddp_two_ranks_with_accumulation_equal_one_batch(tmp_path, cache_dir, kd_on):
    context = mp.start_processes(
        _ddp_worker,
        args=(str(tmp_path / "store"), cache_dir, str(tmp_path), kd_on),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP workers did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
    common = {"cache": cache_dir, "teacher": ["a"], "kd": KD, "kd_on": kd_on, "clip_grad_norm": 0.5}
    one = train_student(_config(tmp_path, "one", batch_size=48, **common), train_data=TRAIN)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"weights.{rank}", weights_only=True)
        for k, v in weights(one.model).items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)


class _PoisonGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradient_in_an_accumulated_step_stops_before_the_update(tmp_path):
    from kdkit.train.guards import NonFiniteError

    class Poisoned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 3)

        def forward(self, x):
            return _PoisonGrad.apply(self.linear(x))

    model = Poisoned()
    before = weights(model)
    config = _config(tmp_path, "nan", batch_size=8, grad_accum=2)
    with pytest.raises(NonFiniteError, match="epoch 1 step 1: non-finite loss or gradient"):
        train_student(config, model=model, train_data=TRAIN)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --- mixup and feature KD: terms of the same step-normalised loss ---------------------


def _live_teacher() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _block_mixup(x, alpha, generator):
    """A fixed mixup (lam 0.3) whose partners stay within blocks of 4 samples: the same
    pairs whether the 12 samples are one batch or three micro-batches of 4."""
    from kdkit.augment import Mix

    index = torch.cat([block.flip(0) for block in torch.arange(x.shape[0]).split(4)])
    mix = Mix(index, 0.3)
    return mix.mix(x), mix


def _projections(result):
    from kdkit.train.checkpoints import load_training_state

    state = load_training_state(result.output_dir / "checkpoints" / "last_state.pt")
    return state["feature_kd"]


@pytest.mark.parametrize(
    "options",
    [
        {"feature_kd": ["1:0:0.5"]},
        {"feature_kd": ["1:0:2.0"], "feature_kd_loss": "cosine", "clip_grad_norm": 0.5},
        {"augment": ["mixup"]},
        {"augment": ["mixup"], "feature_kd": ["1:0:0.5"]},
    ],
    ids=["feature_kd", "feature_kd-cosine-clip", "mixup", "mixup+feature_kd"],
)
def test_mixup_and_feature_kd_accumulate_as_one_batch(tmp_path, monkeypatch, options):
    """grad_accum=1 on batches of 12 and grad_accum=3 on micro-batches of 4 (the same
    samples: the shuffle does not depend on the batch size) give the same update of the
    student and the projections, and the same stats (feature loss: a mean over the 12)."""
    import kdkit.augment as augment

    monkeypatch.setattr(augment, "mixup", _block_mixup)  # Augmentation looks it up here
    common = {"kd": KD, "epochs": 1, "lr": 0.2, **options}
    runs = [
        train_student(
            _config(tmp_path, f"b{bs}", batch_size=bs, grad_accum=k, **common),
            train_data=TRAIN,
            teachers={"t": _live_teacher()},
        )
        for bs, k in ((12, 1), (4, 3))
    ]
    one, acc = runs
    _assert_same_weights(one.model, acc.model)
    if "feature_kd" in options:
        for k, v in _projections(one).items():
            torch.testing.assert_close(_projections(acc)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    steps_one = read_metrics(one.output_dir / "metrics.jsonl", "step")
    steps_acc = read_metrics(acc.output_dir / "metrics.jsonl", "step")
    assert len(steps_one) == len(steps_acc) == 4
    keys = ["total_loss", "ce_loss", "kd_loss", "coverage", "train_acc"]
    keys += [k for k in steps_one[0] if k.startswith("feature_loss")]
    for a, b in zip(steps_one, steps_acc):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_accumulated_mixup_and_feature_loss_are_the_global_batch_formula():
    """StepTotals on 3 micro-batches of 4 backpropagates the hand-computed loss of the 12:
    (1-a) * mean(lam CE(y) + (1-lam) CE(y[i])) + a * sum(w l) / sum(w) + mean of the
    feature loss over the 12 samples -- and the mixup partners of each micro-batch are
    drawn within it."""
    from kdkit.augment import Mix, mixed_loss

    torch.manual_seed(0)
    config = KDLossConfig(temperature=2.0, kd_alpha=0.7, kd_weighting="pmax")
    x, t, feat_t = torch.randn(12, 5), torch.randn(12, 4) * 3, torch.randn(12, 6)
    y = torch.randint(0, 4, (12,))
    model = mlp((5,), 4, hidden=(6,))
    bounds = ((0, 4), (4, 10), (10, 12))  # uneven: a mean of means would be wrong
    lam, weight = 0.3, 0.5
    index = torch.cat([torch.arange(a, b).flip(0) for a, b in bounds])  # within micro-batches

    def feature(inputs, targets):  # mean over the given samples (as FeatureDistiller's)
        value = F.mse_loss(model[1](inputs), targets)
        return weight * value, torch.stack([weight * value.detach(), value.detach()])

    logits = model(x)
    loss, _ = mixed_loss(
        lambda labels: compute_student_loss(logits, t, labels, config), y, Mix(index, lam)
    )
    loss = loss + feature(x, feat_t)[0]
    reference = torch.autograd.grad(loss, list(model.parameters()))

    micro = [_micro(x[a:b], y[a:b], t[a:b], None) for a, b in bounds]
    names = ("feature_loss", "feature_loss/0")
    totals = StepTotals(step_normaliser(micro, config, torch.float32), config, 0.0, names)
    model.zero_grad()
    for (a, b), mb in zip(bounds, micro):
        mix = Mix(torch.arange(b - a).flip(0), lam)
        totals.loss(model(mb.features), mb, mix, feature(mb.features, feat_t[a:b])).backward()
    for g, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    stats, _, _ = totals.finish()
    assert stats["total_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert stats["feature_loss"] == pytest.approx(float(feature(x, feat_t)[1][0]), rel=1e-5)
    assert stats["feature_loss/0"] == pytest.approx(2 * stats["feature_loss"], rel=1e-5)


def test_augmented_view_with_accumulation_trains(tmp_path):
    """Augmentation without mixup runs per micro-batch under accumulation."""
    result = train_student(
        _config(tmp_path, "aug", batch_size=8, grad_accum=2, augment=["noise"]), train_data=TRAIN
    )
    assert result.history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {"kd_alpha": 0.6, "kd_weighting": "threshold", "confidence_threshold": 0.3},
        {"kd_alpha": 0.7, "kd_weighting": "pmax", "loss_type": "jsd"},
        {"kd_alpha": 1.0, "kd_weighting": "none"},
        {"kd_alpha": 0.0, "kd_weighting": "pmax"},
        {"kd_alpha": 0.5, "kd_weighting": "pmax", "mask": True},
    ],
)
def test_one_micro_batch_stats_of_the_small_batch_pass_equal_the_tensor_finish(
    monkeypatch, options, dtype
):
    """A step of one micro-batch by the small-batch pass reports the pass's own means
    (no tensor arithmetic in ``finish``): bit for bit the stats, accuracy and extra values
    that ``finish``'s tensor arithmetic gives on the same sums, and
    ``compute_student_loss``'s stats; the torch path (``KDKIT_KERNEL=torch``, its sums
    added in another order) to rounding."""
    options = dict(options)
    masked = options.pop("mask", False)
    config = KDLossConfig(temperature=3.0, **options)
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(11, 6, dtype=dtype, generator=gen)
    t = torch.randn(11, 6, dtype=dtype, generator=gen)
    y = torch.randint(0, 6, (11,), generator=gen)
    y[3] = -100  # an ignored sample
    mask = torch.rand(11, generator=gen) > 0.4 if masked else None
    extra = [torch.tensor(True), torch.tensor(2.5, dtype=torch.float64)]
    results = []
    for kernel, known in (("auto", True), ("auto", False), ("torch", False)):
        monkeypatch.setenv("KDKIT_KERNEL", kernel)
        totals = StepTotals(None, config, 3.0)
        loss = totals.loss(s.clone().requires_grad_(), _micro(None, y, t, mask))
        assert (totals._known is not None) == (kernel == "auto")
        if not known:
            totals._known = None  # finish's tensor arithmetic on the same sums
        results.append((loss.detach(), *totals.finish(extra)))
    fast, tensors, slow = results
    assert fast == tensors  # loss, stats, accuracy, extra values
    torch.testing.assert_close(fast[0], slow[0])
    assert fast[1].keys() == slow[1].keys() and fast[3] == slow[3]
    for key, value in fast[1].items():
        assert value == pytest.approx(slow[1][key], rel=1e-5, abs=1e-6), key
    assert fast[2] == slow[2]  # the accuracy: integer counts
    monkeypatch.setenv("KDKIT_KERNEL", "auto")
    _, stats = compute_student_loss(s, t, y, config, current_epoch=3.0, domain_mask=mask)
    assert fast[1] == stats


def test_a_second_micro_batch_or_feature_stats_take_the_tensor_finish():
    config = KDLossConfig(temperature=2.0, kd_alpha=0.5)
    gen = torch.Generator().manual_seed(6)
    micro = [
        _micro(
            None, torch.randint(0, 4, (5,), generator=gen), torch.randn(5, 4, generator=gen), None
        )
        for _ in range(2)
    ]
    totals = StepTotals(step_normaliser(micro, config, torch.float32), config, 0.0)
    for mb in micro:
        totals.loss(torch.randn(5, 4, generator=gen, requires_grad=True), mb)
    assert totals._known is None  # a given normaliser: the step's counts, not the batch's
    totals = StepTotals(None, config, 0.0)  # a second micro-batch after a batch of its own
    totals.loss(torch.randn(5, 4, generator=gen, requires_grad=True), micro[0])
    assert totals._known is not None
    totals.loss(torch.randn(5, 4, generator=gen, requires_grad=True), micro[1])
    assert totals._known is None  # the tensor finish sums both
    totals = StepTotals(None, config, 0.0, ("feature_loss",))
    feature = (torch.tensor(0.25), torch.tensor([0.25]))
    totals.loss(torch.randn(5, 4, generator=gen, requires_grad=True), micro[0], feature=feature)
    stats, _, _ = totals.finish()
    assert stats["feature_loss"] == pytest.approx(0.25)
