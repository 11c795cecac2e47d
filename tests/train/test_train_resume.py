"""Resume honours a setting exactly or refuses it; config.json records what ran (issue 11, item 4)."""

from __future__ import annotations

import json
import math

import pytest
from train_support import TRAIN, tiny

from kdkit.train import train_student, train_teacher
from kdkit.train.checkpoints import load_training_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _epoch_of_state(tmp_path) -> int:
    return int(load_training_state(tmp_path / "run" / "checkpoints" / "last_state.pt")["epoch"])


def test_changed_teacher_is_refused_and_nothing_is_mixed(tmp_path, cache_dir):
    extra = {"cache": cache_dir, "eval_split": None, "epochs": 3}
    train_student(tiny(tmp_path, teacher=["a"], stop_after_epoch=1, **extra), train_data=TRAIN)
    with pytest.raises(ValueError, match=r"teacher \['a'\] -> \['b'\]") as info:
        train_student(tiny(tmp_path, teacher=["b"], resume=True, **extra), train_data=TRAIN)
    assert "\n" not in str(info.value)
    assert _epoch_of_state(tmp_path) == 0


def test_several_differences_are_listed_in_one_line(tmp_path):
    train_teacher(tiny(tmp_path, epochs=3, stop_after_epoch=1, eval_split=None), train_data=TRAIN)
    changed = {"lr": 0.1, "seed": 5, "batch_size": 8, "eval_split": None, "resume": True}
    with pytest.raises(ValueError, match=r"batch_size 16 -> 8, lr 0.01 -> 0.1, seed 0 -> 5"):
        train_teacher(tiny(tmp_path, epochs=3, **changed), train_data=TRAIN)


def test_extending_epochs_rebuilds_the_cosine_schedule(tmp_path):
    """A finished 3-epoch run extended to 5: epochs 4 and 5 follow cos over 5, never lr 0."""
    base = {"eval_split": None, "lr": 0.01}
    train_teacher(tiny(tmp_path, epochs=3, **base), train_data=TRAIN)
    result = train_teacher(tiny(tmp_path, epochs=5, resume=True, **base), train_data=TRAIN)
    lrs = [h["lr"] for h in result.history]
    planned = [0.01 * (1 + math.cos(math.pi * e / 5)) / 2 for e in (3, 4)]
    assert lrs[3:] == pytest.approx(planned, rel=1e-9) and min(lrs[3:]) > 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["epochs"] == 5
    assert saved["segments"] == [{"start_epoch": 0, "epochs": 3}, {"start_epoch": 3, "epochs": 5}]
    # Fewer epochs than already run cannot be honoured.
    with pytest.raises(ValueError, match=r"epochs 5 -> 2.*already run 5 epochs"):
        train_teacher(tiny(tmp_path, epochs=2, resume=True, **base), train_data=TRAIN)


def test_free_settings_may_change_and_are_recorded(tmp_path):
    base = {"eval_split": None, "epochs": 2}
    train_teacher(tiny(tmp_path, stop_after_epoch=1, **base), train_data=TRAIN)
    train_teacher(tiny(tmp_path, resume=True, log_every=2, **base), train_data=TRAIN)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["segments"][1] == {
        "start_epoch": 1,
        "epochs": 2,
        "changed": {"log_every": [1, 2], "stop_after_epoch": [1, None]},
    }
