"""Augmentation (kdkit.augment) and its use in train_student: mixup, consistency, resume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import TEST, TRAIN, tiny, weights

from kdkit.augment import (
    Augmentation,
    Mix,
    gaussian_noise,
    mixed_loss,
    mixup,
    random_shift,
    spec_augment,
)
from kdkit.cli import main
from kdkit.errors import InputError
from kdkit.losses.kd import KDLossConfig, compute_student_loss
from kdkit.train import train_student
from kdkit.train.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KD = {"kd_weighting": "none", "warmup_epochs": 0, "kd_ramp_epochs": 0}
LOSSES = ("total_loss", "ce_loss", "kd_loss", "coverage", "avg_confidence")


# --- user callables (importable as test_augment:NAME) ----------------------------------


def negate(x, generator):
    return -x


def drop_one(x, generator):
    return x[1:]


def make_nan(x, generator):
    return x * float("nan")


# --- the functions ------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(5, 40), (3, 7, 23), (2, 2, 6, 11)])
def test_builtins_keep_the_shape_and_are_reproducible(shape):
    x = torch.randn(shape, generator=gen(9))
    for fn, param in ((gaussian_noise, 0.1), (spec_augment, 0.3), (random_shift, 0.2)):
        a, b = fn(x, param, gen(1)), fn(x, param, gen(1))
        assert a.shape == x.shape and torch.equal(a, b)
        assert not all(torch.equal(a, fn(x, param, gen(s))) for s in range(2, 6))


def test_shift_is_a_per_sample_roll_of_the_time_axis():
    x = torch.arange(2 * 3 * 10, dtype=torch.float32).view(2, 3, 10)
    y = random_shift(x, 0.3, gen(4))
    for i in range(2):
        matches = [k for k in range(-3, 4) if torch.equal(y[i], torch.roll(x[i], k, dims=-1))]
        assert len(matches) == 1


def test_specaugment_zeroes_one_time_and_one_frequency_band():
    x = torch.ones(50, 8, 20)
    y = spec_augment(x, 0.25, gen(0))
    zero_cols = (y == 0).all(dim=1)  # [B, T]: masked time steps
    zero_rows = (y == 0).all(dim=2)  # [B, F]: masked frequencies
    assert zero_cols.sum(dim=1).max() <= 5 and zero_rows.sum(dim=1).max() <= 2
    assert zero_cols.any() and zero_rows.any()
    for cols in zero_cols:  # one contiguous band
        idx = cols.nonzero().flatten()
        assert len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx)
    y1 = spec_augment(torch.ones(50, 20), 0.25, gen(0))  # 1-D: time masking only
    assert ((y1 == 0).sum(dim=1) <= 5).all()


def test_mixup_mixes_inputs_and_values_alike():
    x = torch.randn(6, 4, generator=gen(3))
    y, mix = mixup(x, 0.4, gen(5))
    assert 0.0 <= mix.lam <= 1.0 and sorted(mix.index.tolist()) == list(range(6))
    torch.testing.assert_close(y, mix.lam * x + (1 - mix.lam) * x[mix.index])
    z = torch.randn(6, 3)
    torch.testing.assert_close(mix.mix(z), mix.lam * z + (1 - mix.lam) * z[mix.index])


def test_mixed_loss_is_lambda_weighted_ce_and_kd_unchanged():
    logits, teacher = torch.randn(8, 5, generator=gen(1)), torch.randn(8, 5, generator=gen(2))
    y = torch.arange(8) % 5
    mix = Mix(torch.tensor([3, 2, 1, 0, 7, 6, 5, 4]), 0.3)
    config = KDLossConfig(kd_alpha=0.6, kd_weighting="none")
    loss, stats = mixed_loss(lambda t: compute_student_loss(logits, teacher, t, config, 10), y, mix)
    ce_a, ce_b = F.cross_entropy(logits, y), F.cross_entropy(logits, y[mix.index])
    _, ref = compute_student_loss(logits, teacher, y, config, 10)
    expected = 0.4 * (0.3 * ce_a + 0.7 * ce_b) + 0.6 * ref["kd_loss"]
    torch.testing.assert_close(loss, expected)
    assert stats["ce_loss"] == pytest.approx(float(0.3 * ce_a + 0.7 * ce_b), rel=1e-6)
    assert stats["kd_loss"] == pytest.approx(ref["kd_loss"], rel=1e-6)


def test_spec_parsing_and_errors():
    assert [s.name for s in Augmentation("mixup:0.4,noise,shift:0.2").steps] == [
        "mixup",
        "noise",
        "shift",
    ]
    assert Augmentation(["test_augment:negate"]).has_callable
    for bad, match in (
        ("flip", "unknown augmentation 'flip'"),
        ("noise:abc", "must be a number"),
        ("shift:2", r"fraction must be in \[0, 1\]"),
        ("mixup,mixup", "more than once"),
        ("nomodule_xyz:fn", "cannot import module"),
    ):
        with pytest.raises(ValueError, match=match):
            Augmentation(bad)
    with pytest.raises(ValueError, match="callables are accepted only from the command line"):
        Augmentation("test_augment:negate", trusted=False)


# --- in training --------------------------------------------------------------------------


def linear_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)  # the cache_dir fixture's teacher "a"


def step_losses(result) -> list[list[float]]:
    steps = read_metrics(result.output_dir / "metrics.jsonl", "step")
    return [[r[k] for k in LOSSES] for r in steps]


def test_mixup_of_cached_logits_equals_a_live_affine_teacher(tmp_path, cache_dir):
    # For an affine teacher f(lam x_a + (1 - lam) x_b) = lam f(x_a) + (1 - lam) f(x_b):
    # mixing cached logits is exact, so both runs give the same losses.
    with pytest.warns(UserWarning, match="un-augmented input .*mixed as logits"):
        cached = train_student(
            tiny(tmp_path, "c", cache=cache_dir, teacher=["a"], kd=KD, augment=["mixup:1.0"]),
            train_data=TRAIN,
        )
    live = train_student(
        tiny(tmp_path, "l", kd=KD, augment=["mixup:1.0"]),
        train_data=TRAIN,
        teachers={"a": linear_teacher()},
    )
    np.testing.assert_allclose(step_losses(live), step_losses(cached), rtol=1e-5, atol=1e-6)


def test_consistent_teacher_sees_the_augmented_view(tmp_path, cache_dir):
    augment = ["noise:0.5", "shift:0.3"]
    with pytest.warns(UserWarning, match="un-augmented"):
        cached = train_student(
            tiny(tmp_path, "c", cache=cache_dir, teacher=["a"], kd=KD, augment=augment),
            train_data=TRAIN,
        )
    clean = train_student(  # an inconsistent live teacher sees the clean input: as cached
        tiny(tmp_path, "i", kd=KD, augment=augment, consistent_teacher=False),
        train_data=TRAIN,
        teachers={"a": linear_teacher()},
    )
    consistent = train_student(  # the default with live teachers
        tiny(tmp_path, "l", kd=KD, augment=augment),
        train_data=TRAIN,
        teachers={"a": linear_teacher()},
    )
    np.testing.assert_allclose(step_losses(clean), step_losses(cached), rtol=1e-5, atol=1e-6)
    first = [r[2] for r in step_losses(consistent)]  # the KD losses differ
    assert not np.allclose(first, [r[2] for r in step_losses(cached)])


def test_cached_teacher_with_augmentation_warns_once(tmp_path, cache_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_student(
            tiny(tmp_path, cache=cache_dir, teacher=["a"], augment=["noise"], epochs=2),
            train_data=TRAIN,
        )
    assert len([w for w in caught if "un-augmented" in str(w.message)]) == 1


def test_augmentation_is_seeded_and_resumes_bit_for_bit(tmp_path):
    extra = {"kd": KD, "augment": ["mixup", "noise", "specaugment", "shift", "test_augment:negate"]}
    runs = {}
    for name, more in (("full", {}), ("part", {"stop_after_epoch": 2})):
        runs[name] = train_student(
            tiny(tmp_path, name, epochs=4, **extra, **more),
            train_data=TRAIN,
            eval_data=TEST,
            teachers={"a": linear_teacher()},
        )
    resumed = train_student(
        tiny(tmp_path, "part", epochs=4, resume=True, **extra),
        train_data=TRAIN,
        eval_data=TEST,
        teachers={"a": linear_teacher()},
    )
    wf, wr = weights(runs["full"].model), weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed.history == runs["full"].history
    again = train_student(  # the same seed draws the same augmentations
        tiny(tmp_path, "again", epochs=4, **extra),
        train_data=TRAIN,
        eval_data=TEST,
        teachers={"a": linear_teacher()},
    )
    assert again.history == runs["full"].history
    other = train_student(
        tiny(tmp_path, "other", epochs=1, **extra, seed=1),
        train_data=TRAIN,
        teachers={"a": linear_teacher()},
    )
    assert other.history[0]["total_loss"] != runs["full"].history[0]["total_loss"]


def test_ce_only_run_with_mixup_and_bad_combinations(tmp_path):
    result = train_student(tiny(tmp_path, augment=["mixup"]), train_data=TRAIN)
    assert result.history[-1]["kd_loss"] == 0.0
    with pytest.raises(ValueError, match="kd_on='target'"):
        tiny(tmp_path, augment=["mixup"], kd_on="target")
    with pytest.raises(ValueError, match="consistent_teacher=True needs a live teacher"):
        train_student(
            tiny(tmp_path, "second", augment=["noise"], consistent_teacher=True), train_data=TRAIN
        )


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        ("drop_one", r"changed the batch size: got features \(1, 6\) for a batch of 2"),
        ("make_nan", "returned NaN or infinite features"),
    ],
)
def test_bad_callables_fail_before_training(tmp_path, fn, match):
    with pytest.raises(InputError, match=match):
        train_student(tiny(tmp_path, augment=[f"test_augment:{fn}"]), train_data=TRAIN)
    assert not (tmp_path / "run").exists()


def test_cli_augment_exit_codes_and_the_trust_rule(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    from kdkit.data import ManifestRecord, write_manifest

    (tmp_path / "x").mkdir()
    records = []
    for i in range(20):
        np.save(tmp_path / "x" / f"{i}.npy", np.full(4, i % 2, dtype=np.float32))
        records.append(ManifestRecord(f"x/{i}.npy", i % 2, 0, "train"))
    write_manifest(manifest, records)
    base = ["train-student", "--manifest", str(manifest), "--eval_split", "train"]
    base += ["--epochs", "1", "--no-progress", "--output_dir", str(tmp_path / "out"), "--overwrite"]
    assert main([*base, "--augment", "noise,shift:0.25,test_augment:negate"]) == 0
    capsys.readouterr()
    assert main([*base, "--augment", "test_augment:drop_one"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed the batch size" in err
    assert main([*base, "--augment", "wobble"]) == 2
    assert "unknown augmentation 'wobble'" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text('augment = ["test_augment:negate"]\n')
    assert main([*base, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "run.toml" in err and "only from the command line" in err
    config.write_text('augment = ["noise", "mixup"]\n')  # built-ins in a file are fine
    assert main([*base, "--config", str(config)]) == 0
