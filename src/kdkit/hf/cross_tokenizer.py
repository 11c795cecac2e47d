r"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's.

Per micro-batch (:meth:`CrossTokenizer.prepare`, before the step's first forward):

1. each student sequence's text is recovered (:func:`~kdkit.hf.alignment.student_text`)
   and tokenised by the teacher's tokenizer (with its own special tokens, so the teacher
   sees text as it was trained to), right-padded into ``teacher_input_ids``;
2. the positions are aligned by end offsets (:mod:`kdkit.hf.alignment`).

The loss (:func:`cross_tokenizer_loss`) keeps the student's CE on **every** target
token and puts KD on the **aligned** target tokens only:

.. math:: L = (1 - \alpha) \frac{1}{N} \sum_{i \in \mathcal{V}} -\log p_s(y_i)
          + \alpha \frac{1}{W} \sum_{(i, j) \in \mathcal{A},\, i \in \mathcal{V}} \ell_{ij}

with ``N`` the step's target tokens and ``W`` its *aligned* target tokens (both summed
over accumulation steps and ranks by the trainer), and :math:`\ell_{ij}` either

* ``'map'``: ``config.loss_type`` at ``config.temperature`` (times :math:`T^2`) between
  the student's and the teacher's logits restricted to the shared vocabulary
  (:mod:`kdkit.hf.vocab_map`), through the fused linear path
  (:func:`~kdkit.losses.linear.linear_kd_loss`: no ``[M, V]`` student logits); or
* ``'uld'``: :func:`~kdkit.losses.uld.uld_distance` over the full vocabularies.

The CE term is :func:`~kdkit.hf.loss.lm_distillation_loss`'s own (called with the KD
weight 0), so neither formula is written twice.  The coverage logged is the fraction
of target tokens with an aligned teacher position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn

from kdkit.hf.alignment import Alignment, align_batch, student_text, tokenize_with_offsets
from kdkit.hf.head import OutputTransform
from kdkit.hf.loss import LMLossStats, lm_distillation_loss, shift_labels
from kdkit.hf.vocab_map import VocabMap, shared_vocabulary
from kdkit.losses.kd import KDLossConfig, compute_kd_weight
from kdkit.losses.linear import linear_kd_loss
from kdkit.losses.student_terms import combine, kd_mean
from kdkit.losses.uld import uld_distance

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "CrossTokenizer",
    "CrossTokenizerBatch",
    "cross_tokenizer_loss",
]

CROSS_TOKENIZER_LOSSES: tuple[str, ...] = ("map", "uld")
"""The KD terms of cross-tokenizer distillation (module docstring)."""


@dataclasses.dataclass(frozen=True)
class CrossTokenizerBatch:
    """A micro-batch's teacher tokens ``[B, L_t]`` and the :class:`Alignment`."""

    teacher_input_ids: torch.Tensor
    teacher_attention_mask: torch.Tensor
    alignment: Alignment
    unaligned_rows: int  # sequences whose text does not tokenise back to their ids


class CrossTokenizer:
    """The student and teacher tokenizers of a cross-tokenizer run, and the vocabulary map.

    Raises:
        ValueError: an unknown ``loss``, a tokenizer that is not a fast tokenizer (no
            offsets), tokenizers that share no token (``'map'``).
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        loss: str,
        student_size: int,
        teacher_size: int,
    ) -> None:
        if loss not in CROSS_TOKENIZER_LOSSES:
            raise ValueError(
                f"cross_tokenizer_loss must be one of {list(CROSS_TOKENIZER_LOSSES)}, got {loss!r}"
            )
        for name, tok in (
            ("processing_class", student_tokenizer),
            ("teacher_tokenizer", teacher_tokenizer),
        ):
            if not getattr(tok, "is_fast", False):
                raise ValueError(
                    f"cross-tokenizer distillation needs fast tokenizers (character offsets): "
                    f"{name} is {type(tok).__name__}"
                )
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.loss = loss
        self.vocab_map = (
            shared_vocabulary(student_tokenizer, teacher_tokenizer, student_size, teacher_size)
            if loss == "map"
            else None
        )
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad_id = pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)

    def prepare(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> CrossTokenizerBatch:
        """The teacher's tokens of a student batch ``[B, L]`` and the aligned positions."""
        students, teachers = [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            if attention_mask is not None:
                ids = ids[attention_mask[b].bool()]
            text, seq = student_text(self.student_tokenizer, ids.tolist())
            students.append(seq)
            teachers.append(
                tokenize_with_offsets(self.teacher_tokenizer, text, add_special_tokens=True)
            )
        length = max(1, *(len(t.ids) for t in teachers))
        t_ids = torch.full((len(teachers), length), self.teacher_pad_id, dtype=torch.long)
        t_mask = torch.zeros((len(teachers), length), dtype=torch.long)
        for b, t in enumerate(teachers):
            t_ids[b, : len(t.ids)] = torch.tensor(t.ids, dtype=torch.long)
            t_mask[b, : len(t.ids)] = 1
        alignment = align_batch(students, teachers)
        return CrossTokenizerBatch(t_ids, t_mask, alignment, sum(s is None for s in students))

    @torch.no_grad()
    def teacher_logits(
        self, teacher: nn.Module, batch: CrossTokenizerBatch, device: Any
    ) -> torch.Tensor:
        """The live teacher's logits ``[B, L_t, V_t]`` on its own tokens (moved to ``device``)."""
        where = next(teacher.parameters()).device
        out = teacher(
            input_ids=batch.teacher_input_ids.to(where),
            attention_mask=batch.teacher_attention_mask.to(where),
        )
        return out.logits.to(device)

    def loss_terms(
        self,
        student_hidden: torch.Tensor,
        student_head: nn.Module,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        config: KDLossConfig,
        progress: float,
        batch: CrossTokenizerBatch,
        **options: Any,
    ) -> tuple[torch.Tensor, LMLossStats]:
        """:func:`cross_tokenizer_loss` with this run's alignment, loss and vocabulary map."""
        return cross_tokenizer_loss(
            student_hidden,
            student_head,
            teacher_logits,
            labels,
            config,
            progress,
            alignment=batch.alignment,
            loss=self.loss,
            vocab_map=self.vocab_map,
            **options,
        )

    def aligned_targets(
        self, batch: CrossTokenizerBatch, labels: torch.Tensor, attention_mask: Any, ignore: int
    ) -> torch.Tensor:
        """The number of aligned positions whose (shifted) target is real (0-d)."""
        targets = shift_labels(labels, attention_mask, ignore)
        a = batch.alignment.to(targets.device)
        return (targets[a.row, a.student] != ignore).sum()


def cross_tokenizer_loss(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: KDLossConfig,
    progress: float = 0.0,
    *,
    alignment: Alignment,
    loss: str = "map",
    vocab_map: VocabMap | None = None,
    num_tokens: torch.Tensor | float | None = None,
    kd_weight_total: torch.Tensor | float | None = None,
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, LMLossStats]:
    """The cross-tokenizer loss of one micro-batch (module docstring); ``(loss, stats)``.

    Args:
        student_hidden: ``[B, L, H]`` final hidden states; ``student_head`` its output layer.
        teacher_logits: ``[B, L_t, V_t]`` on the teacher's own tokens.
        alignment: The aligned ``(row, student, teacher)`` positions.
        loss: ``'map'`` (needs ``vocab_map``) or ``'uld'``.
        num_tokens, kd_weight_total: ``N`` (target tokens) and ``W`` (aligned target
            tokens) of the whole step; default: this micro-batch's.
        Others: as :func:`~kdkit.hf.loss.lm_distillation_loss`.

    Raises:
        ValueError: ``config.kd_weighting`` other than ``'none'``, ``'map'`` without a map.
    """
    if config.kd_weighting != "none":
        raise ValueError(
            "kd_weighting must be 'none' with cross-tokenizer distillation, got "
            f"{config.kd_weighting!r}"
        )
    if loss == "map" and vocab_map is None:
        raise ValueError("cross_tokenizer_loss 'map' needs vocab_map")
    plain = dataclasses.replace(config, kd_alpha=0.0)
    ce_loss, ce_stats = lm_distillation_loss(
        student_hidden,
        student_head,
        student_hidden.detach(),  # not read: the KD weight is 0 (CE only)
        labels,
        plain,
        progress,
        num_tokens=num_tokens,
        attention_mask=attention_mask,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        teacher_confidence=torch.zeros(labels.shape, device=labels.device),
        logit_scale=logit_scale,
        softcap=softcap,
        teacher_head=student_head,
    )
    alpha = compute_kd_weight(
        progress, config.warmup_epochs, config.kd_ramp_epochs, config.kd_alpha
    )
    targets = shift_labels(labels, attention_mask, ignore_index)
    a = alignment.to(targets.device)
    keep = targets[a.row, a.student] != ignore_index
    rows, s_pos, t_pos = a.row[keep], a.student[keep], a.teacher[keep]
    aligned = keep.sum().to(ce_stats.ce_sum.dtype)
    hidden = student_hidden[rows, s_pos]  # [M, H]
    teacher = teacher_logits[rows, t_pos].detach()  # [M, V_t]
    kd_sum = hidden.new_zeros((), dtype=ce_loss.dtype)
    if alpha > 0 and hidden.shape[0] > 0:
        kd_sum = _kd_sum(
            hidden, student_head, teacher, config, loss, vocab_map, vocab_size, logit_scale, softcap
        ).to(ce_loss.dtype)
    w = aligned if kd_weight_total is None else kd_weight_total
    w = torch.as_tensor(w, dtype=ce_loss.dtype, device=ce_loss.device)
    total = combine(ce_loss, kd_mean(kd_sum, w, alpha), alpha)
    stats = ce_stats._replace(
        kd_sum=kd_sum.detach(), kd_weight_sum=aligned, selected=aligned, alpha=alpha
    )
    return total, stats


def _kd_sum(
    hidden: torch.Tensor,
    head: nn.Module,
    teacher: torch.Tensor,
    config: KDLossConfig,
    loss: str,
    vocab_map: VocabMap | None,
    vocab_size: int | None,
    logit_scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """``sum_m l_m`` over the ``M`` aligned target positions."""
    weight = cast(torch.Tensor, head.weight)  # an output layer's weight parameter
    bias: torch.Tensor | None = getattr(head, "bias", None)
    if loss == "uld":
        logits = weight[:vocab_size] if vocab_size is not None else weight
        z = hidden @ logits.t()
        if bias is not None:
            z = z + bias[: logits.shape[0]]
        z = OutputTransform(logit_scale, softcap).apply(z)
        return uld_distance(z, teacher, config.temperature, "sum")
    assert vocab_map is not None  # checked by cross_tokenizer_loss
    m = vocab_map.to(hidden.device)
    return linear_kd_loss(
        hidden,
        weight[m.student],
        teacher[:, m.teacher],
        config.temperature,
        config.loss_type,
        "sum",
        student_bias=None if bias is None else bias[m.student],
        jsd_beta=config.jsd_beta,
        logit_scale=logit_scale,
        softcap=softcap,
    )
