"""Batch augmentation on the training device: built-ins, user callables, and mixup's targets.

Features are ``[B, L]`` (1-D: time last) or ``[B, F, T]`` / ``[B, C, F, T]`` (2-D:
frequency second to last, time last).  Every function draws its randomness from the
``generator`` it is given (on the features' device), so a run seeded per epoch is
reproducible and ``--resume`` stays bit-for-bit.  Built-ins, with their parameter
(``name:value`` in a spec, e.g. ``noise:0.05``) and its default:

* ``mixup:ALPHA`` (0.2) -- :func:`mixup`: ``x = lam * x_a + (1 - lam) * x_b`` with
  ``lam ~ Beta(ALPHA, ALPHA)`` per batch and ``b`` a random permutation of the batch; the
  hard CE becomes ``lam * CE(y_a) + (1 - lam) * CE(y_b)`` (:func:`mixed_loss`).
* ``noise:SIGMA`` (0.1) -- :func:`gaussian_noise`: ``x + SIGMA * N(0, 1)``.
* ``specaugment:FRACTION`` (0.2) -- :func:`spec_augment`: per sample, one time band and
  (for 2-D features) one frequency band of random width up to ``FRACTION`` of the axis
  set to zero.
* ``shift:FRACTION`` (0.1) -- :func:`random_shift`: per sample, a circular roll of the
  time axis by up to ``FRACTION`` of its length, either way.

A spec entry of the form ``package.module:function`` is a user callable
``function(features, generator) -> features`` (it may change every dimension but the
batch's).  Entries are applied in the order given: ``--augment noise,shift``.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> augment = Augmentation("noise:0.1,shift")
    >>> x = torch.zeros(4, 16)
    >>> y, mix = augment(x, g)
    >>> y.shape, mix is None
    (torch.Size([4, 16]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdkit.errors import InputError

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "Mix",
    "check_file_augment",
    "gaussian_noise",
    "mixed_loss",
    "mixup",
    "random_shift",
    "spec_augment",
]

AUGMENTATIONS: dict[str, float] = {"mixup": 0.2, "noise": 0.1, "specaugment": 0.2, "shift": 0.1}
"""The built-in augmentations and the default of their one parameter."""


@dataclass
class Mix:
    """Mixup of a batch: sample ``i`` is ``lam * x_i + (1 - lam) * x_{index[i]}``."""

    index: torch.Tensor
    lam: float

    def mix(self, values: torch.Tensor) -> torch.Tensor:
        """The same mixture of per-sample ``values`` (e.g. teacher logits ``[B, C]``)."""
        return self.lam * values + (1.0 - self.lam) * values[self.index]


def _uniform(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=generator.device)


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``x + sigma * N(0, 1)`` (independent noise per element)."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return x + sigma * noise.to(x.device)


def _band_mask(
    length: int, batch: int, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """``[B, length]`` booleans: one band per sample, width uniform in 0..fraction*length."""
    max_width = int(fraction * length)
    width = (_uniform([batch], generator) * (max_width + 1)).long()
    start = (_uniform([batch], generator) * (length - width + 1)).long()
    positions = torch.arange(length, device=generator.device)
    return (positions >= start[:, None]) & (positions < (start + width)[:, None])


def spec_augment(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Zero one random time band (last axis) and, for 2-D features, one frequency band."""
    batch = x.shape[0]
    time = _band_mask(x.shape[-1], batch, fraction, generator).to(x.device)
    view = [batch] + [1] * (x.dim() - 2) + [x.shape[-1]]
    keep = ~time.view(view)
    if x.dim() >= 3:
        freq = _band_mask(x.shape[-2], batch, fraction, generator).to(x.device)
        view = [batch] + [1] * (x.dim() - 3) + [x.shape[-2], 1]
        keep = keep & ~freq.view(view)
    return x * keep.to(x.dtype)


def random_shift(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Roll each sample's time axis (last) by a random ``k`` in ``-m..m``, ``m = fraction * L``."""
    length = x.shape[-1]
    m = int(fraction * length)
    k = (_uniform([x.shape[0]], generator) * (2 * m + 1)).long() - m
    index = (torch.arange(length, device=generator.device) - k[:, None]) % length
    index = index.to(x.device).view([x.shape[0]] + [1] * (x.dim() - 2) + [length])
    return torch.gather(x, -1, index.expand(x.shape))


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, Mix]:
    """Mix the batch with a random permutation of itself, ``lam ~ Beta(alpha, alpha)``."""
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
    lam = float(np.random.default_rng(int(seed.item())).beta(alpha, alpha))
    index = torch.randperm(x.shape[0], generator=generator, device=generator.device)
    mix = Mix(index.to(x.device), lam)
    return mix.mix(x), mix


@dataclass
class _Step:
    name: str
    fn: Callable[..., Any]
    param: float | None  # None: a user callable


def _parse(entry: str, trusted: bool) -> _Step:
    head, sep, tail = entry.partition(":")
    if head in AUGMENTATIONS:
        try:
            param = float(tail) if sep else AUGMENTATIONS[head]
        except ValueError:
            raise ValueError(f"augment {entry!r}: the parameter must be a number") from None
        if not np.isfinite(param) or param < 0 or (head == "mixup" and param == 0):
            raise ValueError(f"augment {entry!r}: the parameter must be finite and > 0")
        if head in ("specaugment", "shift") and param > 1:
            raise ValueError(f"augment {entry!r}: the fraction must be in [0, 1]")
        fns = {"mixup": mixup, "noise": gaussian_noise, "specaugment": spec_augment}
        return _Step(head, fns.get(head, random_shift), param)
    if not sep or not head or not tail:
        raise ValueError(
            f"unknown augmentation {entry!r}: expected one of {sorted(AUGMENTATIONS)} "
            "(optionally NAME:VALUE) or a callable 'package.module:function'"
        )
    if not trusted:
        raise ValueError(
            f"augment callable {entry!r} comes from a file; callables are accepted only from "
            "the command line or the Python API (pass --augment on the command line)"
        )
    from kdkit.models import load_factory

    try:
        fn = load_factory(entry)
    except ValueError as exc:
        raise ValueError(f"augment {entry!r}: {exc}") from None
    return _Step(entry, fn, None)


class Augmentation:
    """A pipeline of augmentations parsed from a spec (see the module docstring).

    ``Augmentation(spec)(x, generator)`` returns ``(x_augmented, mix)`` where ``mix`` is
    the batch's :class:`Mix` if the spec has ``mixup`` (at most once), else ``None``.
    ``trusted=False`` refuses user callables (a spec read from a file).

    Raises:
        ValueError: unknown names, bad parameters, ``mixup`` twice, an unimportable callable.
        InputError: a callable that returns no tensor or changes the batch size (on call).
    """

    def __init__(self, spec: str | Sequence[str], *, trusted: bool = True) -> None:
        entries = [e.strip() for e in spec.split(",")] if isinstance(spec, str) else list(spec)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ValueError(f"augment must name at least one augmentation, got {spec!r}")
        self.steps = [_parse(e, trusted) for e in entries]
        if sum(s.name == "mixup" for s in self.steps) > 1:
            raise ValueError(f"augment names mixup more than once: {spec!r}")
        self.spec = entries

    @property
    def has_mixup(self) -> bool:
        return any(s.name == "mixup" for s in self.steps)

    @property
    def has_callable(self) -> bool:
        return any(s.param is None for s in self.steps)

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, *, check_values: bool = False
    ) -> tuple[torch.Tensor, Mix | None]:
        mix = None
        for step in self.steps:
            if step.param is None:  # a user callable
                x = _checked(step.name, step.fn(x, generator), x.shape[0], check_values)
            elif step.name == "mixup":
                x, mix = mixup(x, step.param, generator)
            else:
                x = step.fn(x, step.param, generator)
        return x, mix

    def __repr__(self) -> str:
        return f"Augmentation({','.join(self.spec)!r})"


def _checked(name: str, out: object, batch: int, check_values: bool) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise InputError(
            f"augment callable {name!r} must return a tensor, got {type(out).__name__}"
        )
    if out.dim() == 0 or out.shape[0] != batch:
        raise InputError(
            f"augment callable {name!r} changed the batch size: got features "
            f"{tuple(out.shape)} for a batch of {batch}"
        )
    if check_values and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise InputError(f"augment callable {name!r} returned NaN or infinite features")
    return out


def mixed_loss(
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    targets: torch.Tensor,
    mix: Mix | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss_fn(targets)``, or under mixup ``lam * loss_fn(y_a) + (1 - lam) * loss_fn(y_b)``.

    ``loss_fn`` returns ``(loss, stats)``; the stats are mixed with the same weights (the
    KD term and its stats do not depend on the targets, so only CE changes:
    ``(1 - alpha) * (lam * CE(y_a) + (1 - lam) * CE(y_b)) + alpha * KD``).
    """
    if mix is None:
        return loss_fn(targets)
    loss_a, stats_a = loss_fn(targets)
    loss_b, stats_b = loss_fn(targets[mix.index])
    lam = mix.lam
    stats = {k: lam * float(v) + (1.0 - lam) * float(stats_b[k]) for k, v in stats_a.items()}
    return lam * loss_a + (1.0 - lam) * loss_b, stats


def check_file_augment(values: dict[str, Any], source: str) -> None:
    """Refuse user callables in the ``augment`` of a config file (the trust rule)."""
    spec = values.get("augment")
    if spec is None:
        return
    try:
        Augmentation(spec, trusted=False)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
