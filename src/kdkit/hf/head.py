r"""How a causal LM turns its final hidden states into logits: the output transform.

The trainer never asks the student for its ``[B, L, V]`` logits: kdkit's linear path
computes them chunk by chunk from the final hidden states ``h`` and the output layer,

.. math:: z = \mathrm{softcap}(\text{logit\_scale} \cdot (h W^\top + b)), \qquad
   \mathrm{softcap}(u) = c \tanh(u / c),

so it must apply whatever the model's own forward applies after its output layer --
otherwise it would silently optimise another objective (peers' most common bug: the
soft-capping of Gemma 2/3 ignored).  :func:`output_transform` reads the known
configuration fields:

* ``final_logit_softcapping`` (Gemma 2, Gemma 3, ...) -> ``softcap``;
* ``logit_scale`` (Cohere, Cohere 2) -> ``logit_scale``;
* ``logits_scaling`` (Granite: logits are *divided* by it) -> ``logit_scale = 1 / s``;
* ``output_multiplier`` -> ``logit_scale``.

Any other transform a model's forward may apply is caught by
:func:`check_output_transform`: the trainer compares, at its first training step, the
model's own logits (the last position, which it computes anyway) with the transform of
``head(h)``; a mismatch is a ``ValueError`` naming the model type and the difference,
never a silently different loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import torch
from torch import nn

__all__ = ["OutputTransform", "check_output_transform", "output_transform"]


@dataclasses.dataclass(frozen=True)
class OutputTransform:
    """``softcap(logit_scale * u)`` of the output layer's result ``u`` (``None``: not applied).

    Example:
        >>> OutputTransform(softcap=2.0).apply(torch.tensor([0.0, 100.0])).tolist()
        [0.0, 2.0]
    """

    logit_scale: float | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        for name in ("logit_scale", "softcap"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number or None, got {value!r}")
            if not (0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transform of ``logits`` (the output layer's result)."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def output_transform(model: nn.Module) -> OutputTransform:
    """The output transform of a ``transformers`` causal LM, from its configuration.

    Example:
        >>> from types import SimpleNamespace
        >>> gemma = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0))
        >>> output_transform(gemma)
        OutputTransform(logit_scale=None, softcap=30.0)
        >>> granite = SimpleNamespace(config=SimpleNamespace(logits_scaling=8.0))
        >>> output_transform(granite)
        OutputTransform(logit_scale=0.125, softcap=None)
    """
    config = _text_config(model)
    if config is None:
        return OutputTransform()
    scale = None
    for name, invert in (
        ("logit_scale", False),
        ("output_multiplier", False),
        ("logits_scaling", True),
    ):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            scale = 1.0 / float(value) if invert else float(value)
            break
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap else None
    return OutputTransform(scale, softcap)


@torch.no_grad()
def check_output_transform(
    who: str,
    model: nn.Module,
    model_logits: torch.Tensor,
    hidden: torch.Tensor,
    head: nn.Module,
    transform: OutputTransform,
) -> None:
    """Raise ``ValueError`` unless ``transform(head(hidden))`` is the model's own logits.

    ``model_logits`` ``[B, L', V]`` are the model's last ``L'`` positions (``L' = 1`` with
    ``logits_to_keep=1``), ``hidden`` ``[B, L, H]`` its final hidden states.  Tolerance:
    1e-3 of the logits' scale for float32 models, 3e-2 for half-precision ones.
    """
    positions = model_logits.shape[1]
    last = hidden[:, -positions:].float()
    bias = getattr(head, "bias", None)
    expected = transform.apply(
        torch.nn.functional.linear(
            last, cast(torch.Tensor, head.weight).float(), None if bias is None else bias.float()
        )
    )
    got = model_logits.float()
    if got.shape != expected.shape:
        raise ValueError(
            f"the {who}'s logits {tuple(got.shape)} are not its output layer's "
            f"{tuple(expected.shape)} applied to its final hidden states"
        )
    half = head.weight.dtype in (torch.float16, torch.bfloat16) or model_logits.dtype in (
        torch.float16,
        torch.bfloat16,
    )
    tolerance = (3e-2 if half else 1e-3) * max(1.0, float(expected.abs().max()))
    difference = float((got - expected).abs().max())
    if not difference <= tolerance:  # also NaN
        model_type = getattr(_text_config(model), "model_type", type(model).__name__)
        raise ValueError(
            f"the {who}'s logits are not {_describe(transform)} of its final hidden states "
            f"(model type {model_type!r}: largest difference {difference:.3g}, tolerance "
            f"{tolerance:.3g}): its forward transforms the output layer's result in a way "
            "kdkit does not read from the config; pass the right "
            "output_transform=OutputTransform(logit_scale=..., softcap=...) to "
            "DistillationTrainer"
        )


def _describe(transform: OutputTransform) -> str:
    text = "h W^T + b"
    if transform.logit_scale is not None:
        text = f"{transform.logit_scale:g} * ({text})"
    if transform.softcap is not None:
        text = f"softcap_{transform.softcap:g}({text})"
    return text
