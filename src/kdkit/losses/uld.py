r"""The universal logit distance (ULD) of Boizard et al. (2024): KD across vocabularies.

Two models with different tokenizers have distributions over different, unrelated sets
of classes, so no divergence that pairs class ``c`` of one with class ``c`` of the other
is meaningful.  ULD compares what *can* be compared without any vocabulary mapping: the
shapes of the two distributions.  With :math:`p = \mathrm{softmax}(z_s / T)` over the
student's :math:`V_s` classes and :math:`q = \mathrm{softmax}(z_t / T)` over the teacher's
:math:`V_t`, sorted in decreasing order (:math:`p_{(1)} \ge p_{(2)} \ge \dots`) and the
shorter one padded with zeros to :math:`V = \max(V_s, V_t)`:

.. math:: \mathrm{ULD}(p, q) = \sum_{k=1}^{V} \left| p_{(k)} - q_{(k)} \right|

the :math:`L^1` (Wasserstein-1 under the paper's closed-form simplification) distance
between the sorted probability vectors.  It lies in :math:`[0, 2]`, is 0 exactly when the
two sorted vectors agree, and is symmetric.  Its gradient flows through the sort (a
permutation: the gradient of :math:`p_{(k)}` goes to the class that holds rank
:math:`k`).  Unlike the KL-family losses of :mod:`kdkit.losses.kd`, no :math:`T^2`
factor is applied: the paper uses the raw distance, and an :math:`L^1` distance of
probabilities does not have the :math:`1/T^2` gradient scale that factor compensates.
"""

from __future__ import annotations

import math

import torch

__all__ = ["uld_distance"]

REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean")


def uld_distance(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
) -> torch.Tensor:
    r"""ULD between student and teacher logits of (possibly) different vocabularies.

    Args:
        student_logits: ``[..., V_s]`` (differentiable).
        teacher_logits: ``[..., V_t]``, the same leading shape (used detached).
        temperature: ``T > 0``; both distributions are ``softmax(z / T)``.
        reduction: ``'none'`` (``[...]``), ``'sum'`` or ``'mean'`` over positions.

    Shape:
        ``[..., V_s]``, ``[..., V_t]`` -> ``[...]`` (``'none'``) or ``[]``.

    Raises:
        ValueError: leading shapes differ, an empty vocabulary, a temperature that is not
            a finite number > 0, an unknown reduction.

    Example:
        >>> s, t = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0, -50.0]])
        >>> float(uld_distance(s, t)) < 1e-6  # the same distribution shape, other classes
        True
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            "student_logits and teacher_logits must have the same leading shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] < 1 or teacher_logits.shape[-1] < 1:
        raise ValueError("student_logits and teacher_logits need at least one class")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    p = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    q = torch.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    p = torch.sort(p, dim=-1, descending=True).values
    q = torch.sort(q, dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    per_position = (p - q).abs().sum(dim=-1)
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        return per_position.mean() if per_position.numel() else per_position.sum()
    return per_position
