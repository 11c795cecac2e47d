"""TrainConfig: defaults, validation, round trips and config files (kdkit.train.config)."""

from __future__ import annotations

import json

import pytest

from kdkit.losses.kd import KDLossConfig
from kdkit.train import TrainConfig, load_config_file

# Training tests run on one torch thread (faster and less noisy on the shared 2 cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_config_defaults_are_the_spec_recommendation():
    kd = TrainConfig().kd
    # A partial kd dict keeps the recommended values for the fields it does not set.
    assert TrainConfig(kd={"temperature": 4.0}).kd == kd
    assert TrainConfig.from_dict({"kd": {}}).kd == kd
    assert kd == KDLossConfig(
        temperature=4.0, kd_alpha=0.7, kd_weighting="pmax", warmup_epochs=5, kd_ramp_epochs=10
    )


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number > 0"),
        ({"kd_on": "source"}, ValueError, "kd_on must be one of"),
        ({"fusion": "median"}, ValueError, "fusion must be one of"),
        ({"kd": {"kd_alpha": 2}}, ValueError, "kd_alpha must be in"),
        ({"kd": {"alpha": 2}}, KeyError, "unknown kd field"),
        ({"epoch": 3}, KeyError, "did you mean 'epochs'"),
        ({"batch_size": "8"}, TypeError, "batch_size must be an integer"),
        ({"fusion_weights": [1.0]}, ValueError, "one weight per teacher"),
        ({"source_domain": "a"}, ValueError, "source_domain"),
    ],
)
def test_config_validation(values, error, message):
    with pytest.raises(error, match=message):
        TrainConfig.from_dict(values)


def test_config_round_trip_and_normalisation(tmp_path):
    config = TrainConfig.from_dict({"teacher": "a,b", "source_domain": 1, "kd": {"temperature": 2}})
    assert config.teacher == ["a", "b"] and config.source_domain == [1]
    path = config.save(tmp_path / "c.json")
    assert TrainConfig.from_dict(json.loads(path.read_text())) == config


def test_config_files_toml_and_yaml(tmp_path):
    (tmp_path / "c.toml").write_text('epochs = 3\nteacher = ["a"]\n[kd]\ntemperature = 2.5\n')
    (tmp_path / "c.yaml").write_text("epochs: 3\nteacher: [a]\nkd:\n  temperature: 2.5\n")
    a = TrainConfig.from_dict(load_config_file(tmp_path / "c.toml"))
    b = TrainConfig.from_dict(load_config_file(tmp_path / "c.yaml"))
    assert a == b and a.kd.temperature == 2.5 and a.kd.kd_alpha == 0.7
    (tmp_path / "bad.toml").write_text("epochs = [\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ValueError, match="must end in"):
        load_config_file(tmp_path / "c.ini")
