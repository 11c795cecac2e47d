"""Optional dependencies (kdkit._extras): one message naming the extra, before any work."""

from __future__ import annotations

import re
import sys

import pytest

from kdkit._extras import missing_message, require, require_installed
from kdkit.cli import main
from kdkit.train import load_config_file


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("json", "train", "x").__name__ == "json"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # simulates "not installed"
    with pytest.raises(ImportError) as info:
        require("matplotlib", "demo", "kdkit demo")
    assert str(info.value) == "kdkit demo needs matplotlib: pip install 'kdkit[demo]'"
    with pytest.raises(ImportError, match=re.escape("f needs no_such_pkg_kdkit: pip install")):
        require("no_such_pkg_kdkit.sub", "demo", "f")  # the package is named, not the module
    with pytest.raises(ImportError, match=re.escape("kdkit demo needs matplotlib: pip install")):
        require_installed("matplotlib", "demo", "kdkit demo")
    require_installed("json", "train", "x")  # installed: no error


def test_distribution_names_differ_from_module_names():
    assert missing_message("yaml", "train", "f") == "f needs pyyaml: pip install 'kdkit[train]'"
    assert (
        missing_message("sklearn", "demo", "f") == "f needs scikit-learn: pip install 'kdkit[demo]'"
    )


def test_yaml_config_without_pyyaml(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("epochs: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match=re.escape("needs pyyaml: pip install 'kdkit[train]'")):
        load_config_file(tmp_path / "c.yaml")


@pytest.mark.parametrize("module", ["matplotlib", "sklearn", "safetensors"])
def test_demo_without_its_extra_fails_before_any_work(tmp_path, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdkit demo needs ") and err.endswith(": pip install 'kdkit[demo]'")
    assert "\n" not in err
    assert not out.exists()  # no work started


def test_train_without_safetensors_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    out = tmp_path / "run"
    argv = ["train-teacher", "--manifest", str(manifest), "--output_dir", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("needs safetensors: pip install 'kdkit[train]'") and "\n" not in err
    assert not out.exists()
