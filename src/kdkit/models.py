"""Built-in model factories and ``package.module:factory`` import strings.

A *factory* is any callable returning an ``nn.Module`` that maps a batch of features
``[B, *input_shape]`` to logits ``[B, num_classes]``.  kdkit calls it with the keyword
arguments of the configuration (``model_kwargs``) plus ``input_shape`` and
``num_classes`` taken from the data when the factory accepts them and the configuration
does not set them.  Point the CLI at your own with ``--model mypkg.nets:build``.

Built-in factories: ``kdkit.models:mlp`` and ``kdkit.models:cnn`` (1-D or 2-D).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["build_model", "cnn", "load_factory", "mlp", "resolve_model_kwargs"]


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (128,),
    dropout: float = 0.0,
) -> nn.Module:
    """A multilayer perceptron on flattened features: ``[Linear -> ReLU -> Dropout]* -> Linear``.

    Example:
        >>> import torch
        >>> mlp((8, 8), 10, hidden=(32,))(torch.zeros(2, 8, 8)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 3,
    dropout: float = 0.0,
) -> nn.Module:
    """A small conv net: ``[Conv -> BatchNorm -> ReLU]*`` then global average pooling.

    ``input_shape`` selects the dimensionality: ``(L,)`` or ``(C, L)`` gives a 1-D net,
    ``(H, W)`` or ``(C, H, W)`` a 2-D net.  A 2-element shape is always read as ``(H, W)``
    (one channel); store multi-channel 1-D features as ``(C, 1, L)``.  Inputs without a
    channel dimension get one.

    Example:
        >>> import torch
        >>> cnn((8, 8), 10)(torch.zeros(2, 8, 8)).shape
        torch.Size([2, 10])
        >>> cnn((40,), 3, channels=(4,))(torch.zeros(2, 40)).shape
        torch.Size([2, 3])
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 2, 3):
        raise ValueError(f"cnn input_shape must have 1 to 3 dimensions, got {shape}")
    dims = 1 if len(shape) == 1 else 2
    in_channels = shape[0] if len(shape) == 3 else 1
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    layers: list[nn.Module] = []
    if len(shape) < 3:
        layers.append(nn.Unflatten(1, (1, shape[0])))
    width = in_channels
    for size in channels:
        layers += [conv(width, int(size), kernel_size, padding=kernel_size // 2)]
        layers += [norm(int(size)), nn.ReLU()]
        width = int(size)
    layers += [pool, nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:factory"`` and return the callable.

    Raises:
        ValueError: ``spec`` is not of the form ``module:attribute``, the module cannot be
            imported, or the attribute is missing or not callable.

    Example:
        >>> load_factory("kdkit.models:mlp") is mlp
        True
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"model must be an import string 'package.module:factory', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of model {spec!r}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
    if not callable(factory):
        raise ValueError(f"model {spec!r} is not callable")
    return factory


def resolve_model_kwargs(
    factory: Callable[..., nn.Module],
    model_kwargs: Mapping[str, Any],
    *,
    input_shape: Sequence[int],
    num_classes: int | None,
) -> dict[str, Any]:
    """``model_kwargs`` plus ``input_shape``/``num_classes`` when the factory takes them."""
    kwargs = dict(model_kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return kwargs
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in (("input_shape", list(input_shape)), ("num_classes", num_classes)):
        if name not in kwargs and (name in params or accepts_any):
            kwargs[name] = value
    return kwargs


def build_model(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call the factory named by ``spec`` with ``kwargs``; check it returns an ``nn.Module``.

    Raises:
        ValueError: see :func:`load_factory`; bad keyword arguments (named).
        TypeError: the factory does not return an ``nn.Module``.
    """
    factory = load_factory(spec)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {spec!r} rejected model_kwargs {dict(kwargs)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec!r} must return an nn.Module, got {type(model).__name__}")
    return model
