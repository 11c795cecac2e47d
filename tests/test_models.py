"""Built-in model factories and import strings (kdkit.models)."""

from __future__ import annotations

import pytest
import torch

from kdkit.models import build_model, cnn, load_factory, mlp, resolve_model_kwargs


@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (40,)])
def test_builtin_factories(shape):
    x = torch.randn(2, *shape)
    assert mlp(shape, 5, hidden=(4,), dropout=0.1)(x).shape == (2, 5)
    assert cnn(shape, 5, channels=(4,))(x).shape == (2, 5)


def test_load_factory_errors():
    assert load_factory("kdkit.models:cnn") is cnn
    for bad, message in [
        ("kdkit.models.mlp", "import string"),
        ("no_such_module_xyz:f", "cannot import"),
        ("kdkit.models:nope", "no attribute"),
        ("kdkit.models:__doc__", "not callable"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_factory(bad)


def test_resolve_and_build_model():
    kwargs = resolve_model_kwargs(mlp, {"hidden": [3]}, input_shape=(4,), num_classes=2)
    assert kwargs == {"hidden": [3], "input_shape": [4], "num_classes": 2}
    # Explicit values win; factories that do not take the arguments do not get them.
    assert (
        resolve_model_kwargs(mlp, {"num_classes": 7}, input_shape=(4,), num_classes=2)[
            "num_classes"
        ]
        == 7
    )
    assert resolve_model_kwargs(torch.nn.Linear, {}, input_shape=(4,), num_classes=2) == {}
    assert isinstance(build_model("kdkit.models:mlp", kwargs), torch.nn.Module)
    with pytest.raises(ValueError, match="rejected model_kwargs"):
        build_model("kdkit.models:mlp", {"widths": 3})
    with pytest.raises(TypeError, match=r"must return an nn\.Module"):
        build_model("json:dumps", {"obj": 1})


def test_mlp_layers_and_parameter_count():
    model = mlp((8, 8), 10, hidden=(32,), dropout=0.5)
    assert sum(p.numel() for p in model.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in mlp((4,), 2).modules())


def test_build_model_is_deterministic_under_a_seed():
    kwargs = {"input_shape": [6], "num_classes": 3, "hidden": [5]}
    torch.manual_seed(0)
    a = build_model("kdkit.models:mlp", kwargs)
    torch.manual_seed(0)
    b = build_model("kdkit.models:mlp", kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
