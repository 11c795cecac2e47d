r"""Gradient accumulation normalised over the accumulated global batch.

One optimiser step consumes ``grad_accum`` consecutive micro-batches of ``batch_size``
samples on each of ``R`` ranks (:func:`micro_batch_groups`; the last step of an epoch
may have fewer).  The loss of the step is the student loss of the **whole** accumulated
global batch -- CE and the weighted KD mean of all its samples -- not a mean of
per-micro-batch losses.  With the sums of micro-batch ``k`` on rank ``r``,
:math:`S^{CE}_{rk} = \sum_i \mathrm{CE}_i` and :math:`S^{KD}_{rk} = \sum_i w_i m_i \ell_i`,
and the counts of the whole step

.. math:: N = \sum_{r,k} n_{rk}, \qquad W = \sum_{r,k} \sum_i w_i m_i

the step's loss is :math:`L = (1 - \alpha) \sum_{r,k} S^{CE}_{rk} / N + \alpha
\sum_{r,k} S^{KD}_{rk} / W`, and micro-batch ``k`` on rank ``r`` backpropagates

.. math:: L_{rk} = R \left[(1 - \alpha) \frac{S^{CE}_{rk}}{N} + \alpha \frac{S^{KD}_{rk}}{W}\right]

so the accumulated gradient, averaged over ranks by DistributedDataParallel, is exactly
:math:`\nabla L` -- the gradient of one batch of ``R * grad_accum * batch_size``
samples (the formula of
:func:`~kdkit.losses.distributed.compute_student_loss_distributed`, with the sums also
running over micro-batches).  A micro-batch with few or no KD samples (``kd_on='target'``
on a source-domain-heavy micro-batch) is therefore weighted by what it holds.

``N`` and ``W`` depend on the targets, teacher logits and domain mask only
(:func:`~kdkit.losses.student_terms.normaliser_counts`), so they are computed for all
micro-batches of a step **before** the first forward and summed over ranks in one
``all_reduce`` (a step of one micro-batch takes them from its loss terms instead, as
the distributed loss does); the forwards and backwards then run one micro-batch at a time (the
memory of one micro-batch), with DDP's ``no_sync`` on all but the last.  The sums use
:func:`~kdkit.losses.student_terms.student_loss_terms` -- the one implementation of the
maths.  The detached sums, the accuracy, the input-check flags and the step's extra
values (gradient norm, skipped fp16 steps) are gathered in **one** host transfer
(:meth:`StepTotals.finish`); under DDP their ``all_reduce`` is the step's second
collective.  With ``grad_accum=1`` on one process the loss is bit-for-bit
:func:`~kdkit.losses.kd.compute_student_loss`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdkit._validation import compute_dtype, raise_infinite_ce, result_dtype
from kdkit.augment import Mix
from kdkit.losses.distributed import is_distributed
from kdkit.losses.kd import KDLossConfig
from kdkit.losses.small_batch import count_ratio
from kdkit.losses.student_terms import (
    StudentLossInputs,
    StudentLossTerms,
    checked_kd_weight,
    combine,
    kd_mean,
    normaliser_counts,
    raise_for_flags,
    small_batch_student_loss,
    stats_dict,
    student_loss_terms,
    teacher_values,
)

__all__ = [
    "MicroBatch",
    "StepTotals",
    "micro_batch_groups",
    "optimizer_steps",
    "step_normaliser",
    "sync_context",
]

IGNORE_INDEX = -100
_FLAG_CHECKS = ("targets", "student_logits rows", "teacher_logits rows", "infinite KD loss")


class MicroBatch(NamedTuple):
    """One micro-batch on the device: inputs, targets, teacher logits and KD mask."""

    features: torch.Tensor
    targets: torch.Tensor
    teacher_logits: Any  # a tensor or SparseLogits; None: a cross-entropy-only run
    domain_mask: torch.Tensor | None


def micro_batch_groups(batches: Iterable[Any], grad_accum: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``grad_accum`` batches (the last group may be shorter)."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


def optimizer_steps(num_batches: int, grad_accum: int) -> int:
    """Optimiser steps of an epoch of ``num_batches`` micro-batches."""
    return math.ceil(num_batches / grad_accum)


def sync_context(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for all but the last micro-batch of a step (else a no-op)."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile(DDP(model))
    if last or not isinstance(ddp, DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def step_normaliser(
    micro_batches: Sequence[MicroBatch], kd: KDLossConfig, dtype: torch.dtype
) -> torch.Tensor:
    """``[N, W, S]``: valid samples, KD weight sum and samples of the whole step, over
    all ranks (``S`` normalises feature KD's per-sample mean)."""
    parts = []
    for mb in micro_batches:
        if mb.teacher_logits is None:
            valid = (mb.targets != IGNORE_INDEX).sum().to(dtype)
            counts = torch.stack([valid, torch.zeros_like(valid)])
        else:
            counts = normaliser_counts(
                mb.teacher_logits, mb.targets, kd, mb.domain_mask, IGNORE_INDEX, dtype
            )
        parts.append(torch.cat([counts, _samples(mb, counts)]))
    total = torch.stack(parts).sum(dim=0)
    if is_distributed():
        dist.all_reduce(total)
    return total


def _samples(mb: MicroBatch, like: torch.Tensor) -> torch.Tensor:
    """``[n]``: the micro-batch's number of samples (a host value: no sync)."""
    return like.new_full((1,), float(mb.targets.shape[0]))


class StepTotals:
    """The losses of the micro-batches of one step and their running detached sums.

    Args:
        normaliser: :func:`step_normaliser` of the step; ``None`` for a step of one
            micro-batch, whose counts are then taken from its loss terms (saving a
            second pass over the teacher logits).
        kd: The KD settings (``None`` for a cross-entropy-only run).
        kd_epoch: The (fractional) epoch of the KD schedule.
        feature_names: The stats of feature KD (``feature_loss`` first, then one per
            pair), in the order of the values :meth:`loss` is given; empty without it.
    """

    def __init__(
        self,
        normaliser: torch.Tensor | None,
        kd: KDLossConfig | None,
        kd_epoch: float,
        feature_names: Sequence[str] = (),
    ) -> None:
        self.normaliser = normaliser
        self.kd = kd
        self.kd_epoch = kd_epoch
        self.feature_names = tuple(feature_names)
        self.alpha = 0.0
        self.scale = float(dist.get_world_size()) if is_distributed() else 1.0
        self._sums: torch.Tensor | None = None
        self._checked: list[tuple[StudentLossTerms | None, StudentLossInputs]] = []
        self._known: tuple[tuple[float, ...], float, torch.dtype] | None = None

    def _counts(
        self, valid_count: torch.Tensor, kd_weight_sum: torch.Tensor, mb: MicroBatch
    ) -> torch.Tensor:
        """The step's ``[N, W, S]``: given, or this micro-batch's summed over ranks."""
        if self.normaliser is None:
            counts = torch.stack([valid_count, kd_weight_sum])
            self.normaliser = torch.cat([counts, _samples(mb, counts)])
            if is_distributed():
                dist.all_reduce(self.normaliser)
        return self.normaliser

    def loss(
        self,
        logits: torch.Tensor,
        mb: MicroBatch,
        mix: Mix | None = None,
        feature: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The loss micro-batch ``mb`` backpropagates (:math:`L_{rk}`), in float32.

        Args:
            mix: The micro-batch's mixup: its CE sum is ``lam * CE(y) + (1 - lam) *
                CE(y[index])`` (the KD term does not depend on the targets).
            feature: Feature KD's ``(weighted loss, detached stats)``, means over the
                micro-batch (:meth:`kdkit.features.FeatureDistiller.loss_terms`); the
                step adds ``n_k / S`` times it, the mean over the step's ``S`` samples.
        """
        if mb.teacher_logits is None:
            dtype = compute_dtype(logits)
            valid = (mb.targets != IGNORE_INDEX).sum().to(dtype)
            normaliser = self._counts(valid, torch.zeros_like(valid), mb)
            count = normaliser[0].clamp_min(1)
            ce_sum = _mixed(
                lambda y: F.cross_entropy(logits.to(dtype), y, reduction="sum"), mb.targets, mix
            )
            local = ce_sum / count
            zero = torch.zeros_like(count)
            correct = (logits.detach().argmax(dim=-1) == mb.targets).sum().to(dtype)
            sums = torch.stack([ce_sum.detach(), zero, zero, zero, correct])
        else:
            inputs = StudentLossInputs(
                logits, mb.teacher_logits, mb.targets, self.kd, mb.domain_mask, IGNORE_INDEX, "auto"
            )
            self.alpha = checked_kd_weight(inputs, self.kd_epoch, KDLossConfig)
            fast = self._small_batch(inputs, mb) if mix is None else None
            if fast is not None:
                local, sums = fast
                assert self.normaliser is not None  # given, or set by _small_batch
                normaliser = self.normaliser
            else:
                local, sums, normaliser = self._kd_loss(logits, mb, mix, inputs)
        if feature is not None or self._sums is not None:  # stats of more than the pass
            self._known = None
        if feature is not None:  # the mean over the step's samples: n_k / S of this mean
            weighted, values = feature
            share = _samples(mb, normaliser)[0] / normaliser[2]
            local = local + share * weighted.to(local.dtype)
            sums = torch.cat([sums, _samples(mb, sums) * values.to(sums.dtype)])
        self._sums = sums if self._sums is None else self._sums + sums
        return local if self.scale == 1.0 else self.scale * local

    def _kd_loss(
        self, logits: torch.Tensor, mb: MicroBatch, mix: Mix | None, inputs: StudentLossInputs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(local loss, sums, step normaliser)`` of a KD micro-batch by the torch path."""
        terms = student_loss_terms(inputs, self.alpha)
        if mix is not None:  # the CE of the partners' targets (alpha 0: no divergence)
            partner = student_loss_terms(inputs._replace(targets=mb.targets[mix.index]), 0.0)
            ce_sum = mix.lam * terms.ce_sum + (1.0 - mix.lam) * partner.ce_sum
            terms = terms._replace(ce_sum=ce_sum)
        normaliser = self._counts(terms.valid_count, terms.kd_weight_sum, mb)
        count = normaliser[0].clamp_min(1)
        kd = kd_mean(terms.kd_sum, normaliser[1], self.alpha)
        local = combine(terms.ce_sum / count, kd, self.alpha)
        local = local.to(result_dtype(logits, teacher_values(mb.teacher_logits)))
        correct = (logits.detach().argmax(dim=-1) == mb.targets).sum().to(count.dtype)
        sums = torch.stack(
            [
                terms.ce_sum.detach(),
                terms.kd_sum.detach(),
                terms.selected_count,
                terms.confidence_sum,
                correct,
                *terms.flags,
            ]
        )
        detached = inputs._replace(student_logits=logits.detach())
        light = terms._replace(ce_sum=terms.ce_sum.detach(), kd_sum=terms.kd_sum.detach())
        self._checked.append((light, detached))
        return local, sums, normaliser

    def _small_batch(
        self, inputs: StudentLossInputs, mb: MicroBatch
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(local loss, sums)`` by the one-call pass of :mod:`kdkit.losses.small_batch`
        (the same loss and sums as :meth:`_kd_loss`), or ``None`` where it does not apply
        or a value check failed (then :meth:`_kd_loss` gives the result or the error).
        Under ``torch.distributed`` it needs the step's counts first (``grad_accum > 1``)."""
        if self.normaliser is None and is_distributed():
            return None  # the counts of one micro-batch are summed over ranks first
        given = None  # read by the kernel: no host read (it is a CPU tensor)
        if self.normaliser is not None:
            given = self.normaliser.to(torch.float64).contiguous()
        done = small_batch_student_loss(inputs, self.alpha, given)
        if done is None:
            return None
        local, means, values = done
        ce_sum, kd_sum, valid, weight, selected, confidence, correct = values[:7]
        dtype = local.dtype
        if self.normaliser is None:  # one micro-batch: its means are the step's stats
            samples = float(mb.targets.shape[0])
            self.normaliser = torch.tensor([valid, weight, samples], dtype=dtype)
            self._known = (means, count_ratio(correct, valid, dtype), dtype)
        sums = torch.tensor(
            [ce_sum, kd_sum, selected, confidence, correct, 0, 0, 0, 0], dtype=dtype
        )
        self._checked.append((None, inputs._replace(student_logits=inputs.student_logits.detach())))
        return local, sums

    def finish(
        self, extra: Sequence[torch.Tensor] = ()
    ) -> tuple[dict[str, float], float, list[float]]:
        """``(stats, train accuracy, extra values)`` of the step: the one host transfer.

        The stats are those of the accumulated global batch (as
        :func:`~kdkit.losses.kd.compute_student_loss` returns for one batch, plus feature
        KD's ``feature_loss*`` means, included in ``total_loss``); the accuracy is over
        the same samples.  Raises the input errors of the losses (also on the ranks whose
        own input was fine).
        """
        sums, normaliser = self._sums, self.normaliser
        assert sums is not None and normaliser is not None  # set by the first loss() call
        if self._known is not None:
            return self._finish_known(extra)
        if is_distributed():
            sums = sums.clone()
            dist.all_reduce(sums)
        count = normaliser[0].clamp_min(1)
        ce = sums[0] / count
        accuracy = sums[4] / count
        n_feature = len(self.feature_names)
        feature = sums[len(sums) - n_feature :] / normaliser[2].clamp_min(1)
        feature_loss = feature[0] if n_feature else None
        if self.kd is None:
            total = ce if feature_loss is None else ce + feature_loss
            head = [total, ce, accuracy, *feature]
            values = torch.stack([*head, *(e.to(ce.device, ce.dtype) for e in extra)]).tolist()
            stats = {"total_loss": values[0], "ce_loss": values[1]}
            stats.update(zip(self.feature_names, values[3 : len(head)]))
            return stats, values[2], values[len(head) :]
        alpha = self.alpha
        kd = kd_mean(sums[1], normaliser[1], alpha)
        total = combine(ce, kd, alpha)
        if feature_loss is not None:
            total = total + feature_loss
        head = [total, ce, kd, sums[2] / count, sums[3] / count, accuracy, *sums[5:9], *feature]
        values = torch.stack([*head, *(e.to(ce.device, ce.dtype) for e in extra)]).tolist()
        if any(values[6:10]):
            self._raise(values[6:10])
        raise_infinite_ce(values[1], alpha)
        stats = stats_dict(values[0], values[1], values[2], values[3], values[4], alpha)
        stats.update(zip(self.feature_names, values[10 : len(head)]))
        return stats, values[5], values[len(head) :]

    def _finish_known(
        self, extra: Sequence[torch.Tensor]
    ) -> tuple[dict[str, float], float, list[float]]:
        """:meth:`finish` of a step of one micro-batch that the small-batch pass computed
        (without feature KD; not distributed: the pass then waits for the step's counts):
        its stats are the pass's means (:func:`kdkit.losses.small_batch.batch_means`,
        bit-equal to the tensor arithmetic of :meth:`finish`), so only ``extra`` is read.
        An infinite CE made the pass's total infinite, so the torch path took it."""
        assert self._known is not None
        (total, ce, kd, coverage, confidence), accuracy, dtype = self._known
        values = torch.stack([e.to("cpu", dtype) for e in extra]).tolist() if extra else []
        return stats_dict(total, ce, kd, coverage, confidence, self.alpha), accuracy, values

    def non_finite_logits(self) -> int | None:
        """Index of the first micro-batch with non-finite student logits (error path)."""
        for i, (_, inputs) in enumerate(self._checked):
            if not bool(torch.isfinite(inputs.student_logits).all()):
                return i
        return None

    def _raise(self, flags: Sequence[float]) -> None:
        """The error of the first bad micro-batch of this rank, or one naming the checks."""
        for terms, inputs in self._checked:
            if terms is None:  # the small-batch pass found nothing wrong
                continue
            local = torch.stack(terms.flags).tolist()  # error path only
            if any(local):
                raise_for_flags(local, terms, inputs)
        failed = [c for c, v in zip(_FLAG_CHECKS, flags) if v]
        raise ValueError(
            f"invalid input on another rank (check(s) failed: {', '.join(failed)}); "
            "see that rank's error"
        )


def _mixed(
    ce_sum: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, mix: Mix | None
) -> torch.Tensor:
    """``ce_sum(targets)``, or under mixup ``lam * ce_sum(y) + (1 - lam) * ce_sum(y[index])``."""
    if mix is None:
        return ce_sum(targets)
    return mix.lam * ce_sum(targets) + (1.0 - mix.lam) * ce_sum(targets[mix.index])
