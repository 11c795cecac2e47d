"""Every factory field of a --config file needs trust (#26 item 1)."""

from __future__ import annotations

import dataclasses

import pytest

from kdkit.train.config import FACTORY_FIELDS, TrainConfig, load_config_file
from kdkit.trust import UntrustedFactoryError


def _factory_like(name: str) -> bool:
    return name == "model" or (name.endswith("factory") and not name.endswith("_kwargs"))


def test_factory_fields_table_covers_every_factory_field_of_the_config():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FACTORY_FIELDS) <= names
    assert {n for n in names if _factory_like(n)} <= set(FACTORY_FIELDS)


@pytest.mark.parametrize("name", FACTORY_FIELDS)
def test_every_factory_field_from_a_file_needs_trust(tmp_path, name):
    config = tmp_path / "c.toml"
    config.write_text(f'{name} = "os:system"\n{name}_kwargs = {{ command = "true" }}\n')
    with pytest.raises(UntrustedFactoryError, match=rf"c.toml \({name}\).*'os:system'"):
        load_config_file(config)
    assert load_config_file(config, trust_factories=True)[name] == "os:system"
    assert load_config_file(config, trust_factories=["os:system"])[name] == "os:system"
    assert load_config_file(config, replaced=[name])[name] == "os:system"


def test_cli_refuses_a_config_teacher_factory_even_with_model_given(tmp_path, capsys):
    from kdkit.cli import main

    marker = tmp_path / "MARKER"
    config = tmp_path / "c.toml"
    config.write_text(
        f'teacher_factory = "os:system"\nteacher_factory_kwargs = {{ command = "touch {marker}" }}\n'
    )
    argv = ["train-student", "--config", str(config), "--model", "kdkit.models:mlp"]
    code = main([*argv, "--manifest", str(tmp_path / "none.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'os:system'" in err, err
    assert not marker.exists()
