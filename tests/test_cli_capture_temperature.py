"""``--capture_temperature`` is taken as given and checked (#26 item 6)."""

from __future__ import annotations

import numpy as np
import pytest

from kdkit.cli import main
from kdkit.cli.common import capture_temperature_option
from kdkit.data import ManifestRecord, write_manifest
from kdkit.models import mlp
from kdkit.train.checkpoints import save_weights


def test_capture_temperature_option():
    assert capture_temperature_option(None, None) == 1.0
    assert capture_temperature_option(0.5, 4) == 0.5
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^--capture_temperature must be a finite number > 0"):
            capture_temperature_option(bad, 4)
    with pytest.raises(ValueError, match="pass --top_k too"):
        capture_temperature_option(2.0, None)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_dump_teacher_refuses_a_non_positive_capture_temperature(tmp_path, capsys, value):
    np.save(tmp_path / "a.npy", np.ones(6, dtype=np.float32))
    np.save(tmp_path / "b.npy", np.zeros(6, dtype=np.float32))
    data = write_manifest(
        tmp_path / "m.jsonl", [ManifestRecord("a.npy", 0), ManifestRecord("b.npy", 1)]
    )
    meta = {"model": "kdkit.models:mlp", "model_kwargs": {"input_shape": [6], "num_classes": 2}}
    save_weights(mlp(input_shape=(6,), num_classes=2), tmp_path / "t" / "checkpoints", "best", meta)
    argv = ["dump-teacher", "--manifest", str(data), "--teacher", f"e={tmp_path / 't'}"]
    argv += ["--top_k", "1", "--capture_temperature", value, "--cache", str(tmp_path / "c")]
    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--capture_temperature must be a finite number > 0" in err, err
    assert not (tmp_path / "c").exists()
