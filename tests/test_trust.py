"""Factory strings from files run only when trusted (kdkit.trust; issue 11, item 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest
from kdkit.train import load_model_from_run
from kdkit.train.checkpoints import save_weights


@pytest.fixture
def data(tmp_path):
    np.save(tmp_path / "a.npy", np.ones(6, dtype=np.float32))
    np.save(tmp_path / "b.npy", np.zeros(6, dtype=np.float32))
    records = [ManifestRecord("a.npy", 0), ManifestRecord("b.npy", 1)]
    return write_manifest(tmp_path / "m.jsonl", records)


def _hostile_run(tmp_path, marker):
    """A run directory whose checkpoint JSON asks kdkit to call os.system."""
    run = tmp_path / "shared-run"
    save_weights(torch.nn.Linear(6, 2), run / "checkpoints", "best", {})
    meta = {"model": "os:system", "model_kwargs": {"command": f"touch {marker}"}}
    (run / "checkpoints" / "best.json").write_text(json.dumps(meta))
    return run


def test_dump_teacher_never_runs_a_factory_from_a_run_directory(tmp_path, data, capsys):
    marker = tmp_path / "MARKER"
    run = _hostile_run(tmp_path, marker)
    argv = ["dump-teacher", "--manifest", str(data), "--teacher", f"e={run}"]
    code = main([*argv, "--cache", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "'os:system'" in err and "--trust_factories" in err
    assert not marker.exists()


def test_train_config_file_factory_needs_trust(tmp_path, data, capsys):
    marker = tmp_path / "MARKER"
    config = tmp_path / "c.toml"
    config.write_text(
        f'model = "os:system"\nmodel_kwargs = {{ command = "touch {marker}" }}\nepochs = 1\n'
    )
    argv = ["train-teacher", "--config", str(config), "--manifest", str(data)]
    code = main([*argv, "--output_dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'os:system'" in err, err
    assert not marker.exists()


def test_trusted_factories_are_honoured(tmp_path):
    from kdkit.trust import UntrustedFactoryError, check_factory_trusted

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    meta = {"model": "torch.nn:Linear", "model_kwargs": {"in_features": 6, "out_features": 2}}
    save_weights(model, tmp_path / "checkpoints", "best", meta)
    with pytest.raises(UntrustedFactoryError, match=r"'torch.nn:Linear'.*--trust_factories"):
        load_model_from_run(tmp_path)
    for trust in (True, ["torch.nn:Linear"]):
        loaded = load_model_from_run(tmp_path, trust_factories=trust)
        assert torch.equal(loaded.weight, model.weight)
    check_factory_trusted("kdkit.models:cnn", "x.json")  # built-ins need no trust
