"""The on-policy row of ``kdkit demo --lm`` and the generation metric of every row.

* **KD then on-policy KD** (:func:`kd_then_on_policy`; generalised KD,
  :mod:`kdkit.hf.on_policy`): GKD starts from a student that already writes sensible
  text (Agarwal et al. 2024 distil SFT'd students), and a randomly initialised student
  samples noise the teacher can say little about.  So the run's student steps are split:
  the first :data:`KD_FRACTION` of them are the off-policy KD row's recipe (live teacher,
  full blocks, forward KL, the demo's ``kd_alpha``), the rest are GKD with the same
  optimizer and one learning-rate schedule over all steps: each block is a prompt (its
  first half) and a completion (its second half); with probability
  :data:`ON_POLICY_FRACTION` per optimizer step the student samples the completions itself
  (temperature 1, KV cache) and the live teacher scores them, otherwise the step trains on
  the block's own second half.  The GKD divergence: JSD with ``jsd_beta = 0.5``,
  ``kd_alpha = 1`` (no CE term).  Settings chosen on a validation split, not on the
  reported held-out files (``docs/decisions.md``).
* **Teacher log-likelihood of the student's samples** (:func:`teacher_loglik_of_samples`):
  the student continues the first half of held-out blocks (sampled at temperature 1,
  seeded), and the teacher's mean log-probability per sampled token measures how
  plausible the teacher finds what the student writes -- the quantity on-policy
  distillation optimises and held-out perplexity (teacher-forced) does not see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from kdkit.hf.on_policy import OnPolicyConfig, completion_batch, generate_completions

__all__ = [
    "KD_FRACTION",
    "ON_POLICY_CONDITION",
    "kd_then_on_policy",
    "on_policy_trainer",
    "prompt_blocks",
    "teacher_loglik_of_samples",
]

ON_POLICY_CONDITION: str = "KD, then on-policy KD (GKD)"
"""The demo's on-policy condition (module docstring)."""

KD_FRACTION: float = 0.75
"""The share of the on-policy row's student steps trained off-policy first."""

ON_POLICY_FRACTION: float = 0.5
"""GKD's lambda in the demo (TRL's default)."""


def prompt_blocks(blocks: list[dict[str, Any]], block: int) -> list[dict[str, Any]]:
    """The blocks as prompt (first half) + completion (second half) records."""
    return [dict(b, prompt_length=max(1, block // 2)) for b in blocks]


def on_policy_trainer(
    student: Any,
    args: Any,
    teacher: Any,
    data: list[dict[str, Any]],
    config: Any,
    tokenizer: Any,
    callbacks: list[Any],
    optimizers: tuple[Any, Any] = (None, None),
) -> Any:
    """The demo's on-policy :class:`~kdkit.hf.DistillationTrainer` (module docstring);
    ``config`` is the demo's ``LMDemoConfig`` (its ``block`` and KD ``temperature``);
    ``optimizers``: ``(optimizer, lr_scheduler)`` to continue, as ``Trainer``'s."""
    from kdkit.hf import DistillationTrainer, PromptCollator
    from kdkit.losses.kd import KDLossConfig

    kd = KDLossConfig(temperature=config.temperature, kd_alpha=1.0, loss_type="jsd")
    policy = OnPolicyConfig(ON_POLICY_FRACTION, max_new_tokens=max(1, config.block // 2))
    return DistillationTrainer(
        student,
        args,
        teacher=teacher,
        kd_config=kd,
        on_policy=policy,
        processing_class=tokenizer,
        train_dataset=prompt_blocks(data, config.block),
        data_collator=PromptCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
        optimizers=optimizers,
    )


def kd_then_on_policy(
    student: Any,
    args: Any,
    teacher: Any,
    data: list[dict[str, Any]],
    config: Any,
    tokenizer: Any,
    curve: Any,
    prepare: Callable[[Any], Any],
) -> Any:
    """Train ``student`` for ``args.max_steps`` steps: off-policy KD for the first
    :data:`KD_FRACTION` of them, then GKD (:func:`on_policy_trainer`), one AdamW and one
    learning-rate schedule over both; ``curve`` (``kdkit.demo.lm_train.curve_callback``)
    counts the steps of both; ``prepare(trainer)`` is applied to each trainer before it
    trains.  Returns the last trainer."""
    from transformers import get_scheduler

    from kdkit.hf import CausalLMCollator, DistillationTrainer
    from kdkit.losses.kd import KDLossConfig

    total = args.max_steps
    kd_steps = min(total, max(1, round(KD_FRACTION * total)))
    first = DistillationTrainer(
        student,
        dataclasses.replace(args, max_steps=kd_steps),
        teacher=teacher,
        kd_config=KDLossConfig(temperature=config.temperature, kd_alpha=config.kd_alpha),
        processing_class=tokenizer,
        train_dataset=data,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        callbacks=[curve],
    )
    optimizer = first.create_optimizer()  # the Trainer's AdamW (no decay on norms)
    scheduler = get_scheduler(  # the whole run's schedule, not the first trainer's
        args.lr_scheduler_type, optimizer, args.get_warmup_steps(total), total
    )
    first.lr_scheduler = scheduler
    prepare(first).train()
    if kd_steps == total:
        return first
    curve.offset = kd_steps
    rest = dataclasses.replace(args, max_steps=total - kd_steps)
    second = on_policy_trainer(
        student, rest, teacher, data, config, tokenizer, [curve], (optimizer, scheduler)
    )
    prepare(second).train()
    return second


@torch.no_grad()
def teacher_loglik_of_samples(
    student: Any, teacher: Any, held_out: list[dict[str, Any]], block: int, seed: int
) -> float:
    r"""The teacher's mean log-probability (nats per token) of the student's samples.

    The student continues the first ``block // 2`` tokens of each of the first 32
    held-out blocks with up to ``block // 2`` sampled tokens (temperature 1, no top-p,
    seeded by ``seed``; stopping at EOS); the result is
    :math:`\frac{1}{|\mathcal{G}|} \sum_{i \in \mathcal{G}} \log p_t(y_i \mid y_{<i})` over
    the sampled tokens :math:`\mathcal{G}` (higher is better).
    """
    half = max(1, block // 2)
    prompts = torch.tensor([b["input_ids"][:half] for b in held_out[:32]])
    mask = torch.ones_like(prompts)
    pad = int(getattr(student.config, "pad_token_id", None) or 0)
    eos = getattr(student.config, "eos_token_id", None)
    sample = OnPolicyConfig(1.0, max_new_tokens=half)
    completion = generate_completions(student, prompts, mask, sample, pad, seed=seed)
    batch = completion_batch(prompts, mask, completion, [] if eos is None else [int(eos)], pad)
    was_training = teacher.training
    teacher.eval()
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher.train(was_training)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(picked[valid].mean())
