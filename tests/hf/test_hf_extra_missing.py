"""kdkit.hf without transformers: one line naming the extra; the core package unaffected."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_import_without_transformers_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "kdkit.hf" or m.startswith("kdkit.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # simulates "not installed"
    hf = importlib.import_module("kdkit.hf")  # the CLI builds its parser from here
    with pytest.raises(ImportError) as info:
        hf.DistillationTrainer  # noqa: B018
    assert str(info.value) == "kdkit.hf needs transformers: pip install 'kdkit[hf]'"
    import kdkit

    assert "hf" not in kdkit.__all__  # the core package does not import it
