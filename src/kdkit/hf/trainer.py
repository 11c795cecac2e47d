"""``DistillationTrainer``: a ``transformers.Trainer`` that distils a causal LM.

What it changes in the Trainer, and why:

* :meth:`~DistillationTrainer.compute_loss` runs the student, the live teacher (eval mode,
  ``torch.no_grad()``, on its own device if you put it there) and
  :func:`kdkit.hf.loss.lm_distillation_loss`; evaluation keeps the model's own CE loss
  (so ``eval_loss`` is the held-out next-token CE and ``exp(eval_loss)`` the perplexity).
* :meth:`~DistillationTrainer.get_batch_samples` counts, before the first forward of an
  optimizer step, the real target tokens ``N`` (after the label shift) and the KD weight
  sum ``W`` of **all** its gradient-accumulation micro-batches, summed over ranks (one
  ``all_reduce``).  Each micro-batch then contributes ``(1 - a) S_CE / N + a S_KD / W``
  (times the world size, which DDP/FSDP average away), so the step's gradient is the
  gradient of the global batch's loss however it is split over micro-batches and ranks
  (TRL #4719 was this bug).  ``loss_is_scaled_for_ga = True`` keeps the Trainer from
  dividing again.
* :meth:`~DistillationTrainer.log` adds ``kd_loss``, ``ce_loss``, ``kd_weight``,
  ``coverage`` and ``teacher_confidence`` (means over the tokens since the last log,
  over all ranks) to the Trainer's logs, so every reporting callback receives them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from kdkit._extras import require
from kdkit.hf.head import OutputTransform, check_output_transform
from kdkit.hf.head import output_transform as read_output_transform
from kdkit.hf.loss import LMLossStats, lm_distillation_loss, shift_labels
from kdkit.hf.on_policy import PROMPT_KEYS, OnPolicyConfig, checked_on_policy, prepare_step
from kdkit.hf.vocab import real_vocab_size
from kdkit.losses.kd import KDLossConfig
from kdkit.losses.sparse import sparse_confidence
from kdkit.losses.student_terms import confidence_weights, teacher_confidence
from kdkit.sparse import SparseLogits

transformers: Any = require("transformers", "hf", "kdkit.hf")

__all__ = ["SCHEDULE_UNITS", "DistillationTrainer"]

logger = logging.getLogger("kdkit.hf")

SCHEDULE_UNITS: tuple[str, ...] = ("epoch", "step")
"""What ``warmup_epochs``/``kd_ramp_epochs`` count: epochs (fractional) or optimizer steps."""

STEP_TEACHER: str = "kd_step_teacher"
"""The batch key under which :meth:`DistillationTrainer.get_batch_samples` hands the
teacher's confidence (and outputs) of a micro-batch to ``compute_loss``."""

XTOK_BATCH: str = "kd_cross_tokenizer"
"""The batch key of a micro-batch's :class:`~kdkit.hf.cross_tokenizer.CrossTokenizerBatch`."""

LOG_KEYS: tuple[str, ...] = ("kd_loss", "ce_loss", "kd_weight", "coverage", "teacher_confidence")
"""The keys :class:`DistillationTrainer` adds to the Trainer's training logs."""


def fit_length(teacher: Any, length: int) -> Any:
    """Teacher outputs with ``length`` positions, like the batch's ``input_ids``.

    A cache stores each sample's real positions only, so a batch padded further (a
    collator's ``pad_to_multiple_of``) is longer than its cached teacher: dense
    ``[B, L', V]`` logits are padded with zeros, a :class:`~kdkit.SparseLogits` with its
    harmless padding (``mask`` False); padding positions are never targets.
    """
    if isinstance(teacher, SparseLogits):
        return teacher.with_length(length)
    have = teacher.shape[1]
    if have == length:
        return teacher
    if have > length:
        return teacher[:, :length]
    return torch.nn.functional.pad(teacher, (0, 0, 0, length - have))


class _StepTeacher:
    """What :meth:`DistillationTrainer.get_batch_samples` learnt about one micro-batch's
    teacher, handed to :meth:`~DistillationTrainer.compute_loss` inside the batch (the
    Trainer passes objects that are not tensors, mappings or sequences through as they
    are): the per-token confidence ``[B, L]`` and, when kept, the outputs themselves."""

    def __init__(self, outputs: Any, confidence: torch.Tensor) -> None:
        self.outputs = outputs
        self.confidence = confidence


@dataclasses.dataclass(frozen=True)
class TeacherHidden:
    """A live teacher's final hidden states ``[B, L, H_t]``: the loss applies its output
    layer chunk by chunk (:func:`~kdkit.hf.loss.lm_distillation_loss`'s ``teacher_head``),
    so no ``[B, L, V]`` teacher logits exist."""

    hidden: torch.Tensor

    def to(self, device: Any) -> TeacherHidden:
        return TeacherHidden(self.hidden.to(device))


class _HiddenCapture:
    """Forward hook on the base model keeping its ``last_hidden_state`` (after the final norm)."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state


def _checked_arguments(
    teacher: Any, teacher_cache: Any, schedule_unit: str, kd_config: Any, output_transform: Any
) -> KDLossConfig:
    """The trainer's own arguments, checked before the Trainer is built; the KD config."""
    if (teacher is None) == (teacher_cache is None):
        raise ValueError("give exactly one of teacher (a live model) and teacher_cache")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be a causal LM (nn.Module), got {type(teacher).__name__}")
    if schedule_unit not in SCHEDULE_UNITS:
        raise ValueError(
            f"schedule_unit must be one of {list(SCHEDULE_UNITS)}, got {schedule_unit!r}"
        )
    if isinstance(kd_config, dict):
        kd_config = KDLossConfig.from_dict(kd_config)
    if kd_config is None:
        kd_config = KDLossConfig()
    if not isinstance(kd_config, KDLossConfig):
        raise TypeError(
            f"kd_config must be a KDLossConfig or a dict of its fields, got "
            f"{type(kd_config).__name__}"
        )
    kd_config.validate()
    if output_transform is not None and not isinstance(output_transform, OutputTransform):
        raise TypeError(
            "output_transform must be a kdkit.hf.head.OutputTransform, got "
            f"{type(output_transform).__name__}"
        )
    return kd_config


@functools.cache
def _keeps_logits(model_class: Any) -> bool:
    """Whether ``model_class.forward`` takes ``logits_to_keep`` (once per class: the
    signature is inspected in the step otherwise)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` for causal-LM distillation from a live teacher.

    The loss is ``(1 - alpha) * CE + alpha * KD`` with :class:`~kdkit.KDLossConfig`
    semantics (``T**2``, ``loss_type`` incl. ``'reverse_kl'``/``'jsd'``, per-token
    confidence weighting, the warmup + ramp schedule of ``alpha``), both terms normalised
    by the real target tokens of the whole optimizer step (all micro-batches and ranks).

    Args:
        model: The student (a ``*ForCausalLM`` model).
        args: ``transformers.TrainingArguments``.
        teacher: The live teacher, a causal LM sharing the student's tokenizer.  It is put
            in eval mode with ``requires_grad=False``; if it sits on another device than
            the student it stays there (its logits are moved), otherwise it is moved to the
            student's device.
        teacher_cache: Instead of ``teacher``: a cache of :func:`~kdkit.hf.dump_lm_teacher`
            (a directory or ``CacheIndex``), checked against ``train_dataset`` before
            training (:func:`~kdkit.hf.check_lm_cache`); batches need ``kd_keys``
            (``CausalLMCollator(..., cache_keys=True)``).
        cache_teacher: The teacher's name in ``teacher_cache`` (default: its only one).
        sparse_tail: With a top-k cache: ``'bucket'`` or ``'renormalize'``
            (see :func:`~kdkit.compute_student_loss`).
        retemper: With a top-k cache captured at another temperature than
            ``kd_config.temperature``: re-temper its log-probabilities (an approximation,
            see ``docs/decisions.md``); without it that is an error before training.
        kd_config: The KD settings (default ``KDLossConfig()``).
        schedule_unit: ``'epoch'`` (``warmup_epochs``/``kd_ramp_epochs`` in fractional
            epochs, ``state.epoch``) or ``'step'`` (in optimizer steps).
        teacher_tokenizer: The teacher's tokenizer, compared with ``processing_class``
            (the student's) before training: different vocabularies are an error.
        vocab_size: The real vocabulary size, when the embedding matrices are padded and
            no tokenizer is given (default: from the tokenizer, else the smaller output).
        ignore_index: The label value that marks non-targets.
        output_transform: What the student's forward applies after its output layer
            (:class:`~kdkit.hf.head.OutputTransform`: ``logit_scale``, ``softcap``);
            default: read from its config (:func:`~kdkit.hf.head.output_transform`).
            Checked against the model's own logits at the first training step.
        on_policy: On-policy distillation (:class:`~kdkit.hf.on_policy.OnPolicyConfig`):
            per optimizer step, with probability ``on_policy_fraction``, the step's
            completions are sampled by the student from the batches' prompts (with
            ``seq_kd``, otherwise by the teacher) and scored by the live teacher.  Needs
            prompt data (:class:`~kdkit.hf.on_policy_data.PromptCollator`); default
            ``None`` (or ``on_policy_fraction=0`` without ``seq_kd``): off-policy only.
        **kwargs: Passed to ``transformers.Trainer`` (``train_dataset``,
            ``data_collator``, ``processing_class``, ``callbacks``...).

    Raises:
        ValueError: no teacher, different tokenizers, an unknown ``schedule_unit``,
            ``args.n_gpu > 1`` (DataParallel: launch with torchrun / accelerate instead).
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        args: Any = None,
        *,
        teacher: nn.Module | None = None,
        teacher_cache: Any = None,
        cache_teacher: str | None = None,
        sparse_tail: str = "bucket",
        retemper: bool = False,
        kd_config: KDLossConfig | None = None,
        schedule_unit: str = "epoch",
        teacher_tokenizer: Any = None,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        output_transform: OutputTransform | None = None,
        cross_tokenizer_loss: str | None = None,
        on_policy: OnPolicyConfig | None = None,
        **kwargs: Any,
    ) -> None:
        kd_config = _checked_arguments(
            teacher, teacher_cache, schedule_unit, kd_config, output_transform
        )
        on_policy = checked_on_policy(
            on_policy, teacher_cache, cross_tokenizer_loss, kwargs.get("train_dataset")
        )
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DistillationTrainer does not support DataParallel over {self.args.n_gpu} "
                "GPUs in one process: launch one process per GPU (torchrun or accelerate launch)"
            )
        self.kd_config = kd_config
        self.schedule_unit = schedule_unit
        self.ignore_index = ignore_index
        self.sparse_tail = sparse_tail
        self.retemper = retemper
        from kdkit.hf.capture import open_lm_cache

        self.cache: Any
        self.cache, self.cache_teacher = open_lm_cache(
            teacher_cache, cache_teacher, self.train_dataset
        )
        from kdkit.hf.fingerprint import check_cache_tokenizer, cross_tokenizer_setup

        check_cache_tokenizer(self.cache, self.processing_class, cross_tokenizer_loss)
        self.xtok = cross_tokenizer_setup(
            cross_tokenizer_loss,
            teacher,
            model,
            self.processing_class,
            teacher_tokenizer,
            kd_config,
        )
        self.vocab_size = real_vocab_size(
            model
            if self.xtok is not None
            else teacher
            if teacher is not None
            else cast(Any, self.cache).teacher_num_classes[self.cache_teacher],
            model,
            vocab_size=vocab_size,
            tokenizer=self.processing_class,
            teacher_tokenizer=None if self.xtok else teacher_tokenizer,
        )
        if self.cache is not None and self.cache.is_sparse(self.cache_teacher):
            self._check_top_k_cache()
        self.teacher: Any = None if teacher is None else teacher.eval().requires_grad_(False)
        self.output_transform = (
            read_output_transform(model) if output_transform is None else output_transform
        )
        self._transform_checked = False
        self._teacher_via_hidden: bool | None = None  # decided at the first teacher call
        self._teacher_checked = False
        self._teacher_placed = False
        self._normalisers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._window: torch.Tensor | None = None  # [ce, kd, N, W, selected, confidence]
        self._alpha = 0.0
        self.on_policy = on_policy
        self.completion_source = "data"  # the last step's: 'data', 'student' or 'teacher'

    def _check_top_k_cache(self) -> None:
        """Before training: the loss's own sparse checks (same messages), and a top-k
        cache stored over the real vocabulary (its tail mass must not hold padding rows)."""
        from kdkit._validation import check_capture_temperature, check_sparse_tail

        info = self.cache.manifest["teachers"][self.cache_teacher]
        check_sparse_tail(self.kd_config.loss_type, self.sparse_tail, self.retemper)
        check_capture_temperature(
            float(info["capture_temperature"]), float(self.kd_config.temperature), self.retemper
        )
        stored = self.cache.teacher_num_classes[self.cache_teacher]
        if stored != self.vocab_size:
            raise ValueError(
                f"the top-k cache {str(self.cache.path)!r} holds teacher "
                f"{self.cache_teacher!r} over {stored} classes, but the real vocabulary "
                f"has {self.vocab_size}: dump it again over the real vocabulary "
                f"(kdkit dump-teacher --vocab_size {self.vocab_size})"
            )

    def _set_signature_columns_if_needed(self) -> None:
        """Keep ``sample_id`` (cache keys) and ``prompt_length`` through the column filter."""
        super()._set_signature_columns_if_needed()
        columns: list[str] = list(self.__dict__.get("_signature_columns") or [])
        missing = [k for k in ("sample_id", "prompt_length") if k not in columns]
        self._signature_columns = [*columns, *missing]

    # -- schedule and teacher ---------------------------------------------------------

    def kd_progress(self) -> float:
        """Where the schedule stands: the fractional epoch, or the optimizer step."""
        if self.schedule_unit == "step":
            return float(self.state.global_step)
        return float(self.state.epoch or 0.0)

    def _teacher_device(self) -> torch.device:
        device = next(self.teacher.parameters()).device
        if not self._teacher_placed:
            self._teacher_placed = True
            if device.type == "cpu" and self.args.device.type != "cpu":
                self.teacher.to(self.args.device)  # not placed by the user: follow the student
                device = self.args.device
        return device

    @torch.no_grad()
    def teacher_logits(self, inputs: dict[str, Any]) -> Any:
        """The teacher's outputs on the student's device (no graph): from a live teacher its
        final hidden states (:class:`TeacherHidden`, when it sits on the student's device
        and shares the student's output transform) or else its ``[B, L, V_t]`` logits; from
        a top-k cache a :class:`~kdkit.SparseLogits` (dense cache: a tensor)."""
        if self.cache is not None:
            from kdkit.cache import load_cached_logits

            if "kd_keys" not in inputs:
                raise KeyError(
                    "batches need 'kd_keys' with a teacher cache: "
                    "data_collator=CausalLMCollator(pad_id, cache_keys=True)"
                )
            cached = load_cached_logits(inputs["kd_keys"], self.cache, self.cache_teacher)
            return fit_length(cached.to(inputs["input_ids"].device), inputs["input_ids"].shape[1])
        device = self._teacher_device()
        kwargs = {"input_ids": inputs["input_ids"].to(device)}
        if inputs.get("attention_mask") is not None:
            kwargs["attention_mask"] = inputs["attention_mask"].to(device)
        self.teacher.eval()
        student_device = inputs["input_ids"].device
        if self._teacher_via_hidden is None:
            self._teacher_via_hidden = self._hidden_path_possible(device, student_device)
        if self._teacher_via_hidden:
            capture = _HiddenCapture()
            handle = self.teacher.base_model.register_forward_hook(capture)
            try:
                outputs = self.teacher(**kwargs, logits_to_keep=1)
            finally:
                handle.remove()
            if self._teacher_checked or self._check_teacher_transform(outputs, capture):
                return TeacherHidden(cast(torch.Tensor, capture.hidden))
        return self.teacher(**kwargs).logits.to(student_device)

    def _hidden_path_possible(self, teacher_device: torch.device, student_device: Any) -> bool:
        """Whether the live teacher can hand over hidden states instead of logits: a
        ``transformers`` causal LM on the student's device whose output transform is the
        student's (the linear path applies one transform to both)."""

        teacher = self.teacher
        head = (
            teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
        )
        return (
            head is not None
            and getattr(head, "weight", None) is not None
            and hasattr(teacher, "base_model")
            and _keeps_logits(cast(Any, type(teacher)))
            and torch.device(teacher_device) == torch.device(student_device)
            and read_output_transform(teacher) == self.output_transform
        )

    def _check_teacher_transform(self, outputs: Any, capture: _HiddenCapture) -> bool:
        """Once: the teacher's own last-position logits against its head on the hidden
        states.  A mismatch (a forward doing more than the config says) falls back to the
        teacher's logits for the rest of the run (said once), never a different target."""
        self._teacher_checked = True
        try:
            check_output_transform(
                "teacher",
                self.teacher,
                outputs.logits,
                cast(torch.Tensor, capture.hidden),
                self.teacher.get_output_embeddings(),
                self.output_transform,
            )
        except ValueError as exc:
            logger.warning("%s; kdkit uses the teacher's [B, L, V] logits instead", exc)
            self._teacher_via_hidden = False
            return False
        return True

    def _hidden_confidence(self, outputs: TeacherHidden) -> torch.Tensor:
        """The teacher's per-token confidence from its hidden states (chunked)."""
        from kdkit.losses.linear import linear_teacher_confidence

        head = self.teacher.get_output_embeddings()
        return linear_teacher_confidence(
            outputs.hidden,
            head.weight.detach(),
            None if getattr(head, "bias", None) is None else head.bias.detach(),
            logit_scale=self.output_transform.logit_scale,
            softcap=self.output_transform.softcap,
            vocab_size=self.vocab_size,
        ).float()

    def _labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        labels = inputs.get("labels")
        if labels is None:  # plain LM data: every real token is a target
            labels = inputs["input_ids"]
            if inputs.get("attention_mask") is not None:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, self.ignore_index)
        return labels

    # -- normalisation over accumulation steps and ranks -------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """The step's micro-batches, and its real target tokens summed over ranks.

        Also stores ``(N, W)`` for :meth:`compute_loss`.  With ``kd_weighting`` other than
        ``'none'``, ``W`` needs the teacher's confidence on every micro-batch first; that
        confidence rides along with the batch (the loss makes no second confidence pass),
        and so do the teacher's outputs when the step has one micro-batch or the teacher
        is a top-k cache (small) -- otherwise a live teacher runs once more per
        micro-batch in :meth:`compute_loss` rather than holding every micro-batch's
        ``[B, L, V]`` logits at once.
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.on_policy is not None:
            batches = self._on_policy_batches(batches)
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        weighted = self.kd_config.kd_weighting != "none"
        for batch in batches:
            targets = shift_labels(
                self._labels(batch), batch.get("attention_mask"), self.ignore_index
            ).to(device)
            valid = targets != self.ignore_index
            counts[0] += valid.sum()
            if self.xtok is not None:  # the teacher's tokens, the aligned targets
                batch[XTOK_BATCH] = self.xtok.prepare(
                    batch["input_ids"], batch.get("attention_mask")
                )
                counts[1] += self.xtok.aligned_targets(
                    batch[XTOK_BATCH],
                    self._labels(batch),
                    batch.get("attention_mask"),
                    self.ignore_index,
                ).to(device)
            if weighted:
                outputs = self.teacher_logits(batch)
                if isinstance(outputs, SparseLogits):  # the largest kept probability
                    confidence = sparse_confidence(outputs, torch.float32)
                elif isinstance(outputs, TeacherHidden):  # chunk by chunk, no [B, L, V]
                    confidence = self._hidden_confidence(outputs)
                else:
                    confidence = teacher_confidence(outputs[..., : self.vocab_size].float())
                confidence = confidence.to(device)
                weights = confidence_weights(
                    confidence, self.kd_config.kd_weighting, self.kd_config.confidence_threshold
                )
                counts[1] += torch.where(valid, weights, 0.0).sum()
                small = isinstance(outputs, (SparseLogits, TeacherHidden))
                keep = len(batches) == 1 or small
                batch[STEP_TEACHER] = _StepTeacher(outputs if keep else None, confidence)
        if not weighted and self.xtok is None:
            counts[1] = counts[0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self._normalisers = (counts[0], counts[1])
        return batches, counts[0]

    def _on_policy_batches(self, batches: list) -> list:
        """The step's micro-batches with sampled completions (:func:`prepare_step`)."""
        pad = getattr(self.processing_class, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        batches, self.completion_source = prepare_step(
            batches,
            cast(OnPolicyConfig, self.on_policy),
            student=self.accelerator.unwrap_model(self.model),
            teacher=lambda: (self._teacher_device(), self.teacher)[1],
            seed=self.args.seed,
            step=self.state.global_step,
            rank=self.args.process_index,
            pad_token_id=0 if pad is None else int(pad),
            ignore_index=self.ignore_index,
        )
        return batches

    # -- the loss ----------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Training: the distillation loss of this micro-batch; evaluation: the model's CE."""
        if not model.training or self._normalisers is None:
            drop = ("kd_keys", STEP_TEACHER, XTOK_BATCH, *PROMPT_KEYS)
            inputs = {k: v for k, v in inputs.items() if k not in drop}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = self._labels(inputs)
        inputs.pop("labels", None)
        step: _StepTeacher | None = inputs.pop(STEP_TEACHER, None)
        device = inputs["input_ids"].device
        xbatch = inputs.pop(XTOK_BATCH, None)
        if xbatch is not None:
            teacher_logits = self.xtok.teacher_logits(self.teacher, xbatch, device)
        elif step is not None and step.outputs is not None:
            teacher_logits = step.outputs.to(device)
        else:
            teacher_logits = self.teacher_logits(inputs)
        confidence = None if step is None else step.confidence.to(device)
        teacher_head = None
        if isinstance(teacher_logits, TeacherHidden):
            teacher_head = self.teacher.get_output_embeddings()
            teacher_logits = teacher_logits.hidden
        for key in ("kd_keys", *PROMPT_KEYS):
            inputs.pop(key, None)
        unwrapped = self.accelerator.unwrap_model(model)
        capture = _HiddenCapture()
        handle = unwrapped.base_model.register_forward_hook(capture)
        try:
            outputs = model(**inputs, **self._forward_kwargs(unwrapped))
        finally:
            handle.remove()
        head = unwrapped.get_output_embeddings()
        if not self._transform_checked:  # once: the model's own logits vs the transform
            check_output_transform(
                "student",
                unwrapped,
                outputs.logits,
                cast(torch.Tensor, capture.hidden),
                head,
                self.output_transform,
            )
            self._transform_checked = True
        num_tokens, kd_weight_total = self._normalisers
        common: dict[str, Any] = {
            "num_tokens": num_tokens,
            "kd_weight_total": kd_weight_total,
            "attention_mask": inputs.get("attention_mask"),
            "vocab_size": self.vocab_size,
            "ignore_index": self.ignore_index,
            "logit_scale": self.output_transform.logit_scale,
            "softcap": self.output_transform.softcap,
        }
        main: tuple[Any, ...] = (
            capture.hidden,
            head,
            teacher_logits,
            labels,
            self.kd_config,
            self.kd_progress(),
        )
        if xbatch is not None:
            loss, stats = self.xtok.loss_terms(*main, xbatch, **common)
        else:
            loss, stats = lm_distillation_loss(
                *main,
                **common,
                sparse_tail=self.sparse_tail,
                retemper=self.retemper,
                teacher_confidence=confidence,
                teacher_head=teacher_head,
            )
        self._record(stats)
        loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
        """Ask for the last position's logits only (the loss uses the hidden states)."""
        return {"logits_to_keep": 1} if _keeps_logits(cast(Any, type(model))) else {}

    # -- logging -----------------------------------------------------------------------

    def _record(self, stats: LMLossStats) -> None:
        values = torch.stack(
            [
                stats.ce_sum,
                stats.kd_sum,
                stats.num_tokens,
                stats.kd_weight_sum,
                stats.selected,
                stats.confidence_sum,
            ]
        ).to(torch.float64)
        self._window = values if self._window is None else self._window + values
        self._alpha = stats.alpha

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the KD statistics (see :data:`LOG_KEYS`) to training logs."""
        if "loss" in logs and self._window is not None:
            window = self._window
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                window = window.clone()
                dist.all_reduce(window, op=dist.ReduceOp.SUM)
            ce, kd, n, w, selected, confidence = window.tolist()
            n = max(n, 1.0)
            logs["ce_loss"] = ce / n
            logs["kd_loss"] = kd / w if w > 0 else 0.0
            logs["kd_weight"] = self._alpha
            logs["coverage"] = selected / n
            logs["teacher_confidence"] = confidence / n
            self._window = None
        super().log(logs, start_time)
