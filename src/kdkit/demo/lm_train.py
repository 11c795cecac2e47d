"""One training run of ``kdkit demo --lm`` (:mod:`kdkit.demo.lm`): the teacher or a
student of one condition, with its held-out perplexity curve and a one-line summary.

Every run uses the same optimiser settings (AdamW lr 3e-3, cosine schedule with 10 %
warmup, weight decay 0.01, batch 16); the condition picks the trainer:
``transformers.Trainer`` (CE only), :class:`~kdkit.hf.DistillationTrainer` with a live
teacher, a top-k cache, a teacher with another tokenizer
(:mod:`kdkit.demo.lm_cross_tokenizer`) or KD then on-policy KD
(:mod:`kdkit.demo.lm_on_policy`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdkit.demo.lm_cross_tokenizer import CROSS_TOKENIZER_CONDITION, cross_tokenizer_trainer
from kdkit.demo.lm_data import evaluate_lm
from kdkit.demo.lm_on_policy import ON_POLICY_CONDITION, kd_then_on_policy

__all__ = ["curve_callback", "quiet", "train_run"]


def curve_callback(blocks: list[dict[str, Any]], every: int) -> Any:
    """A TrainerCallback recording ``(step, held-out perplexity)`` every ``every`` steps in
    ``points``; its ``offset`` (default 0) is added to the trainer's step (a run made of
    several trainers in sequence)."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[tuple[int, float]] = []
            self.offset = 0

        def on_step_end(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            step = self.offset + state.global_step
            if step % every == 0:
                self.points.append((step, evaluate_lm(model, blocks)["perplexity"]))

    return Curve()


def quiet(trainer: Any) -> Any:
    """``trainer`` printing one line per run, not one per log: no printer, and a progress
    bar (where it has one) that prints no logs."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietBar(ProgressCallback):
        """The Trainer's progress bar without its printed log dictionaries."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            return None

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietBar())
    return trainer


def _args(config: Any, steps: int, seed: int, out: Path) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=3e-3,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        use_cpu=True,
        report_to=[],
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        seed=seed,
        disable_tqdm=not config.progress,
        dataloader_pin_memory=False,
    )


def train_run(
    condition: str,
    student: Any,
    teacher: Any,
    data: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    config: Any,
    steps: int,
    seed: int,
    out: Path,
    tokenizer: Any,
) -> tuple[dict[str, float], list[tuple[int, float]], list[dict[str, Any]], str]:
    """Train one model (``config`` is the demo's ``LMDemoConfig``; ``teacher``: ``None``
    for CE, a model, a cache directory, or ``(model, its tokenizer)`` for the
    cross-tokenizer condition); return its held-out metrics, perplexity curve, training
    logs and a one-line summary of the run."""
    from transformers import Trainer

    from kdkit.hf import CausalLMCollator, DistillationTrainer
    from kdkit.losses.kd import KDLossConfig

    args = _args(config, steps, seed, out)
    curve = curve_callback(held_out[:32] if config.quick else held_out, max(1, steps // 6))
    kd = KDLossConfig(temperature=config.temperature, kd_alpha=config.kd_alpha)
    common: dict[str, Any] = dict(
        train_dataset=data,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        callbacks=[curve],
    )
    began = time.perf_counter()
    if condition == ON_POLICY_CONDITION:
        trainer = kd_then_on_policy(student, args, teacher, data, config, tokenizer, curve, quiet)
    else:
        if condition == CROSS_TOKENIZER_CONDITION:
            trainer = cross_tokenizer_trainer(student, args, teacher, kd, tokenizer, common)
        elif teacher is None:
            trainer = Trainer(student, args, **common)
        elif isinstance(teacher, (str, Path)):  # a top-k cache of dump_lm_teacher
            common["data_collator"] = CausalLMCollator(tokenizer.pad_token_id, cache_keys=True)
            trainer = DistillationTrainer(
                student, args, teacher_cache=teacher, kd_config=kd, processing_class=tokenizer,
                **common,
            )  # fmt: skip
        else:
            trainer = DistillationTrainer(
                student, args, teacher=teacher, kd_config=kd, processing_class=tokenizer, **common
            )
        quiet(trainer).train()
    metrics = evaluate_lm(student, held_out)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    line = (
        f"{condition:<26} seed {seed}: held-out perplexity {metrics['perplexity']:.2f}, "
        f"accuracy {metrics['accuracy']:.3f} ({time.perf_counter() - began:.1f} s)"
    )
    return metrics, curve.points, logs, line
