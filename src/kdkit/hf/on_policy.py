r"""On-policy distillation (generalised KD, Agarwal et al. 2024) for the ``kdkit.hf`` trainer.

Per **optimizer step** (all its gradient-accumulation micro-batches alike, every rank
alike), a seeded Bernoulli draw with probability :math:`\lambda` = ``on_policy_fraction``
(:func:`on_policy_draw`, a function of the trainer's seed and the global step only)
decides where the step's completions come from:

* drawn: the **student** samples them from the batch's prompts;
* not drawn, ``seq_kd=True``: the **teacher** samples them (sequence-level KD);
* otherwise: the dataset's own completions (off-policy; prompt tokens are not targets).

Sampling (:func:`generate_completions`) runs under ``torch.no_grad()`` in eval mode with
the model's KV cache (``use_cache=True``: one forward over the prompt, then one token per
forward), ``do_sample=True`` at ``sampling_temperature`` with nucleus ``top_p`` (no top-k
cut), at most ``max_new_tokens`` tokens, seeded by :func:`generation_seed`.  The new
micro-batch (:func:`completion_batch`) holds prompt + completion, **right**-padded like
:class:`~kdkit.hf.data.CausalLMCollator`'s batches, with ``labels`` = ``-100`` on the
prompt, on padding and after a row's first EOS (the EOS itself is a target).  The
trainer then scores it as any batch: the live teacher's outputs, the divergence of
``kd_config.loss_type`` through the fused linear path, normalised by the real generated
target tokens of the whole step (accumulation steps and ranks).  Semantics against TRL's
``GKDTrainer``: ``docs/decisions.md``, "On-policy distillation".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ON_POLICY_FIELD_HELP",
    "PROMPT_KEYS",
    "OnPolicyConfig",
    "checked_on_policy",
    "completion_batch",
    "generate_completions",
    "generation_seed",
    "on_policy_draw",
    "prepare_step",
]

PROMPT_KEYS: tuple[str, ...] = ("prompt_input_ids", "prompt_attention_mask")
"""The batch keys of the left-padded prompts (:class:`~kdkit.hf.on_policy_data.PromptCollator`)."""

ON_POLICY_FIELD_HELP: dict[str, str] = {
    "on_policy_fraction": "probability per optimizer step that the student generates the "
    "step's completions (GKD's lambda; 0 = off-policy only)",
    "seq_kd": "off-policy steps train on completions sampled by the teacher "
    "(sequence-level KD) instead of the data's",
    "max_new_tokens": "tokens sampled per completion (at most)",
    "sampling_temperature": "temperature of the sampling of completions (not the KD --temperature)",
    "top_p": "nucleus sampling of completions: the smallest set of tokens of mass >= top_p",
}
"""The help of the ``kdkit distill-lm`` flags derived from :class:`OnPolicyConfig`."""


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """The on-policy settings of :class:`~kdkit.hf.DistillationTrainer` (module docstring).

    Attributes:
        on_policy_fraction: :math:`\\lambda \\in [0, 1]`; 0 (default) is exactly the
            off-policy trainer.
        seq_kd: Completions of off-policy steps sampled by the teacher.
        max_new_tokens: Tokens sampled per completion, >= 1.
        sampling_temperature: Sampling temperature > 0 (``kd_config.temperature`` is
            the KD softening temperature, a different thing).
        top_p: Nucleus mass in (0, 1].

    Raises:
        ValueError: a field out of range, naming it.
    """

    on_policy_fraction: float = 0.0
    seq_kd: bool = False
    max_new_tokens: int = 32
    sampling_temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        fraction = self.on_policy_fraction
        if not _real(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be a number in [0, 1], got {fraction!r}")
        if not isinstance(self.seq_kd, bool):
            raise ValueError(f"seq_kd must be True or False, got {self.seq_kd!r}")
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {tokens!r}")
        temperature = self.sampling_temperature
        if not _real(temperature) or not temperature > 0:
            raise ValueError(
                f"sampling_temperature must be a finite number > 0, got {temperature!r}"
            )
        if not _real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")

    @property
    def active(self) -> bool:
        """Whether any step can train on sampled completions (else: the plain trainer)."""
        return self.on_policy_fraction > 0 or self.seq_kd

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OnPolicyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown on-policy settings {unknown}; known: {sorted(names)}")
        return cls(**values)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_STREAM = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, step) over the seeds


def on_policy_draw(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` is on-policy: ``u < fraction`` for a uniform ``u``
    drawn from a generator seeded by ``(seed, step)`` only -- reproducible, the same on
    every rank and for every micro-batch of the step, independent of the global RNG.
    ``fraction`` 0 is never, 1 always."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    generator = torch.Generator().manual_seed((seed * _STREAM + step) % 2**63)
    return bool(torch.rand((), generator=generator, dtype=torch.float64).item() < fraction)


def generation_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The torch seed of the sampling of one micro-batch (reproducible, different per
    step, rank and micro-batch)."""
    return (((seed * _STREAM + step) * 1_000_003 + rank) * 1_009 + micro_batch + 1) % 2**63


def _eos_ids(model: nn.Module) -> list[int]:
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: OnPolicyConfig,
    pad_token_id: int,
    seed: int | None = None,
) -> torch.Tensor:
    """Sample completions ``[B, G]`` (``G <= max_new_tokens``) of left-padded prompts
    ``[B, P]`` with ``model.generate`` (KV cache, eval mode, no graph); the model's
    training mode and the global RNG state are restored after.  Rows that finished early
    are filled with ``pad_token_id`` by ``generate``; :func:`completion_batch` masks
    everything after a row's first EOS."""
    was_training = model.training
    device = prompt_ids.device
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            sequences = model.generate(  # type: ignore[operator]
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                use_cache=True,
                do_sample=True,
                temperature=config.sampling_temperature,
                top_p=config.top_p,
                top_k=0,
                max_new_tokens=config.max_new_tokens,
                pad_token_id=pad_token_id,
            )
    finally:
        model.train(was_training)
    return sequences[:, prompt_ids.shape[1] :]


def completion_batch(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion: torch.Tensor,
    eos_ids: Sequence[int],
    pad_token_id: int,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The micro-batch of prompts ``[B, P]`` (left-padded) + completions ``[B, G]``.

    Each row's real prompt tokens, then its completion up to and including its first EOS
    (all ``G`` tokens without one), right-padded to ``[B, L]`` (``L`` the longest row):
    ``input_ids`` (``pad_token_id`` at padding), ``attention_mask`` and ``labels``
    (the completion's tokens; ``ignore_index`` on the prompt and on padding)."""
    real_prompt = prompt_mask.bool()
    if eos_ids:
        is_eos = torch.isin(completion, torch.as_tensor(list(eos_ids), device=completion.device))
        before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before
        real_completion = before == 0
    else:
        real_completion = torch.ones_like(completion, dtype=torch.bool)
    ids = torch.cat([prompt_ids, completion], dim=1)
    mask = torch.cat([real_prompt, real_completion], dim=1)
    targets = torch.cat([torch.zeros_like(real_prompt), real_completion], dim=1)
    # Real tokens first, in order (a stable sort of the padding flags): right padding.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    ids, mask, targets = (t.gather(1, order) for t in (ids, mask, targets))
    length = int(mask.sum(dim=1).max().item())
    ids, mask, targets = ids[:, :length], mask[:, :length], targets[:, :length]
    return {
        "input_ids": ids.masked_fill(~mask, pad_token_id),
        "attention_mask": mask.long(),
        "labels": ids.masked_fill(~targets, ignore_index),
    }


def checked_on_policy(
    on_policy: Any, teacher_cache: Any, cross_tokenizer_loss: Any, train_dataset: Any
) -> OnPolicyConfig | None:
    """The trainer's ``on_policy`` argument, checked against its other arguments (``None``:
    off-policy only).

    Raises:
        TypeError: not an :class:`OnPolicyConfig`.
        ValueError: with a teacher cache or a cross-tokenizer loss; a dataset without
            prompts (:func:`~kdkit.hf.on_policy_data.check_prompt_dataset`).
    """
    if on_policy is None:
        return None
    if not isinstance(on_policy, OnPolicyConfig):
        raise TypeError(
            f"on_policy must be a kdkit.hf.OnPolicyConfig, got {type(on_policy).__name__}"
        )
    if not on_policy.active:
        return None
    if teacher_cache is not None:
        raise ValueError(
            "on_policy needs a live teacher: a teacher_cache cannot score sequences "
            "sampled during training (pass teacher=...)"
        )
    if cross_tokenizer_loss is not None:
        raise ValueError("on_policy is not supported with cross_tokenizer_loss (yet)")
    from kdkit.hf.on_policy_data import check_prompt_dataset

    check_prompt_dataset(train_dataset, on_policy.on_policy_fraction < 1 and not on_policy.seq_kd)
    return on_policy


def prepare_step(
    batches: list[dict[str, Any]],
    config: OnPolicyConfig,
    *,
    student: nn.Module,
    teacher: Any,
    seed: int,
    step: int,
    rank: int,
    pad_token_id: int,
    ignore_index: int = -100,
) -> tuple[list[dict[str, Any]], str]:
    """The optimizer step's micro-batches, and where their completions came from.

    ``teacher`` is called (no arguments) for the teacher model only when ``seq_kd``
    needs it.  Returns ``(batches, source)`` with ``source`` ``'student'``,
    ``'teacher'`` or ``'data'`` (then the batches without their prompt keys).

    Raises:
        ValueError: a batch without prompts (``prompt_input_ids``).
    """
    for batch in batches:
        if "prompt_input_ids" not in batch:
            raise ValueError(
                "on-policy distillation needs prompts in every batch: a dataset of "
                "{'input_ids', 'prompt_length'} records (or 'prompt'/'completion' text) "
                "and data_collator=kdkit.hf.PromptCollator(pad_token_id)"
            )
    if on_policy_draw(seed, step, config.on_policy_fraction):
        source, model = "student", student
    elif config.seq_kd:
        source, model = "teacher", teacher()
    else:
        plain = [{k: v for k, v in b.items() if k not in PROMPT_KEYS} for b in batches]
        return plain, "data"
    eos = _eos_ids(model)
    out = []
    for index, batch in enumerate(batches):
        device = next(model.parameters()).device
        prompt_ids = batch["prompt_input_ids"].to(device)
        prompt_mask = batch["prompt_attention_mask"].to(device)
        completion = generate_completions(
            model,
            prompt_ids,
            prompt_mask,
            config,
            pad_token_id,
            seed=generation_seed(seed, step, rank, index),
        )
        new = completion_batch(prompt_ids, prompt_mask, completion, eos, pad_token_id, ignore_index)
        target = batch["input_ids"].device
        out.append({k: v.to(target) for k, v in new.items()})
    return out, source
