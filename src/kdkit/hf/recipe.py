"""The LM distillation recipe behind ``kdkit distill-lm``: local dirs in, a student out.

:class:`LMDistillConfig` (one validated dataclass) -> :func:`distill_lm`: load the
teacher, the student (a model directory, a config JSON, or every k-th teacher layer) and
the tokenizer from **local** paths only (``local_files_only``; a hub id is an error, never
a download), read the JSONL data, train with
:class:`~kdkit.hf.trainer.DistillationTrainer`, save the student and
``kdkit_config.json`` (the resolved settings) in ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from kdkit.hf.on_policy import OnPolicyConfig
from kdkit.losses.kd import KDLossConfig

__all__ = ["LMDistillConfig", "LMDistillResult", "distill_lm", "local_dir"]

logger = logging.getLogger("kdkit.hf")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def local_dir(path: str, what: str) -> Path:
    """``path`` as an existing local directory; else ``ValueError`` (hub ids named as such).

    Example:
        >>> local_dir("meta-llama/Llama-3.2-1B", "--teacher_model")
        Traceback (most recent call last):
        ...
        ValueError: --teacher_model 'meta-llama/Llama-3.2-1B' is not a local directory; it looks like a Hugging Face hub id, but kdkit loads local model directories only (nothing is downloaded): download it first and pass its directory
    """
    p = Path(path)
    if p.is_dir():
        return p
    if not p.exists() and _HUB_ID.match(path) and not path.startswith((".", "/")):
        raise ValueError(
            f"{what} {path!r} is not a local directory; it looks like a Hugging Face hub id, "
            "but kdkit loads local model directories only (nothing is downloaded): "
            "download it first and pass its directory"
        )
    raise ValueError(
        f"{what} {path!r} is not a directory" + ("" if p.exists() else " (no such path)")
    )


@dataclasses.dataclass
class LMDistillConfig:
    """Settings of :func:`distill_lm` (the flags of ``kdkit distill-lm``)."""

    data: str | None = None
    output_dir: str = "runs/lm-student"
    tokenizer: str | None = None
    eval_data: str | None = None
    max_length: int = 512
    teacher_model: str | None = None
    teacher_tokenizer: str | None = None
    cross_tokenizer_loss: str | None = None
    cache: str | None = None
    teacher: str | None = None
    sparse_tail: str = "bucket"
    retemper: bool = False
    student_model: str | None = None
    student_config: str | None = None
    student_from_teacher: int | None = None
    trust_remote_code: bool = False
    kd: KDLossConfig = dataclasses.field(default_factory=KDLossConfig)
    schedule_unit: str = "epoch"
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    bf16: bool = False
    seed: int = 0
    logging_steps: int = 10
    vocab_size: int | None = None
    save_steps: int = 0
    resume: bool = False
    on_policy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting, before anything is loaded."""
        if not self.data:
            raise ValueError("no training data: give --data FILE.jsonl")
        if (self.teacher_model is None) == (self.cache is None):
            raise ValueError("give exactly one teacher source: --teacher_model DIR or --cache DIR")
        if self.cache is not None and (self.teacher_tokenizer or self.cross_tokenizer_loss):
            raise ValueError(
                "--teacher_tokenizer/--cross_tokenizer_loss need a live teacher (--teacher_model)"
            )
        if self.on_policy.active and (
            self.cache is not None or self.teacher_tokenizer or self.cross_tokenizer_loss
        ):
            raise ValueError(
                "--on_policy_fraction/--seq_kd need a live teacher of the student's tokenizer "
                "(--teacher_model, no --cache, no --teacher_tokenizer): a cache cannot score "
                "sampled sequences"
            )
        if not isinstance(self.on_policy, OnPolicyConfig):
            raise TypeError(
                f"on_policy must be an OnPolicyConfig, got {type(self.on_policy).__name__}"
            )
        if self.cross_tokenizer_loss not in (None, "map", "uld"):
            raise ValueError(
                f"cross_tokenizer_loss must be 'map' or 'uld', got {self.cross_tokenizer_loss!r}"
            )
        if self.cache is not None and self.student_from_teacher is not None:
            raise ValueError("--student_from_teacher needs --teacher_model (the teacher's layers)")
        students = [
            self.student_model is not None,
            self.student_config is not None,
            self.student_from_teacher is not None,
        ]
        if sum(students) != 1:
            raise ValueError(
                "give exactly one student: --student_model DIR, --student_config JSON or "
                "--student_from_teacher EVERY_K"
            )
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.student_from_teacher is not None and self.student_from_teacher < 1:
            raise ValueError(
                f"student_from_teacher must be an integer >= 1, got {self.student_from_teacher!r}"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        from kdkit._validation import SPARSE_TAILS, check_bool, check_choice

        check_choice("sparse_tail", self.sparse_tail, SPARSE_TAILS)
        check_bool("retemper", self.retemper)
        check_bool("trust_remote_code", self.trust_remote_code)
        check_bool("resume", self.resume)
        if isinstance(self.save_steps, bool) or not isinstance(self.save_steps, int):
            raise ValueError(f"save_steps must be an integer >= 0, got {self.save_steps!r}")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be an integer >= 0, got {self.save_steps!r}")
        if self.schedule_unit not in ("epoch", "step"):
            raise ValueError(f"schedule_unit must be 'epoch' or 'step', got {self.schedule_unit!r}")
        self.kd.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LMDistillResult:
    """What :func:`distill_lm` returns."""

    output_dir: Path
    metrics: dict[str, float]
    trainer: Any


def _load_student(config: LMDistillConfig, teacher: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdkit.hf.layers import student_from_teacher
    from kdkit.hf.loading import load_causal_lm

    if config.student_model is not None:
        path = local_dir(config.student_model, "--student_model")
        return load_causal_lm(path, "--student_model", trust_remote_code=config.trust_remote_code)
    if config.student_config is not None:
        path = Path(config.student_config)
        if not path.is_file():
            raise ValueError(f"--student_config {str(path)!r} is not a file")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"--student_config {str(path)!r}: not valid JSON ({exc.msg})"
            ) from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise ValueError(
                f"--student_config {str(path)!r} must be a JSON object with a 'model_type' "
                "(e.g. a model directory's config.json)"
            )
        model_config = AutoConfig.for_model(values.pop("model_type"), **values)
        return AutoModelForCausalLM.from_config(model_config)
    assert config.student_from_teacher is not None  # validate(): exactly one student
    return student_from_teacher(teacher, config.student_from_teacher)


def dir_tokenizer(
    path: str | Path | None, what: str = "model directory", *, trust_remote_code: bool = False
) -> Any:
    """The tokenizer saved in a model directory, or None (see :mod:`kdkit.hf.loading`)."""
    from kdkit.hf.loading import load_tokenizer

    if path is None:
        return None
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return load_tokenizer(path, what, trust_remote_code=trust_remote_code)


def _tokenizers(config: LMDistillConfig) -> tuple[Any, Any]:
    """``(student tokenizer, teacher tokenizer)``; both may be None.

    The student's: ``--tokenizer``, else the student directory's, else the teacher's.  The
    teacher's directory tokenizer is compared with it before training.
    """
    from kdkit.hf.loading import load_tokenizer

    trust = config.trust_remote_code
    teacher = dir_tokenizer(config.teacher_model, "--teacher_model", trust_remote_code=trust)
    if config.teacher_tokenizer is not None:
        path = local_dir(config.teacher_tokenizer, "--teacher_tokenizer")
        teacher = load_tokenizer(path, "--teacher_tokenizer", trust_remote_code=trust)
    if config.tokenizer is not None:
        path = local_dir(config.tokenizer, "--tokenizer")
        return load_tokenizer(path, "--tokenizer", trust_remote_code=trust), teacher
    student = dir_tokenizer(config.student_model, "--student_model", trust_remote_code=trust)
    return (student if student is not None else teacher), teacher


def distill_lm(config: LMDistillConfig) -> LMDistillResult:
    """Run the recipe; see the module docstring.

    Raises:
        ValueError: bad settings, a missing directory or a hub id, bad data (before any
            training), different tokenizers.
        ImportError: ``kdkit[hf]`` not installed.
    """
    config.validate()
    teacher_dir = None
    if config.teacher_model is not None:
        teacher_dir = local_dir(config.teacher_model, "--teacher_model")
    else:
        assert config.cache is not None  # validate(): exactly one teacher source
        local_dir(config.cache, "--cache")
    if config.student_model is not None:
        local_dir(config.student_model, "--student_model")
    from kdkit._extras import require

    transformers = require("transformers", "hf", "kdkit distill-lm")
    from kdkit.hf.data import CausalLMCollator
    from kdkit.hf.loading import load_causal_lm
    from kdkit.hf.on_policy_data import PromptCollator
    from kdkit.hf.trainer import DistillationTrainer

    tokenizer, teacher_tokenizer = _tokenizers(config)
    prompts = config.on_policy.active
    train_data = _flag_data("--data", config.data, tokenizer, config.max_length, prompts)
    eval_data = (
        _flag_data("--eval_data", config.eval_data, tokenizer, config.max_length, prompts)
        if config.eval_data
        else None
    )
    transformers.set_seed(config.seed)
    teacher = None
    if teacher_dir is not None:
        teacher = load_causal_lm(
            teacher_dir, "--teacher_model", trust_remote_code=config.trust_remote_code
        )
    student = _load_student(config, teacher)
    _check_vocabularies(config, tokenizer, teacher, student)
    _check_data_ids(config, student, teacher, train_data, eval_data)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (student.config.pad_token_id or 0)
    out = Path(config.output_dir)
    from kdkit.hf.run_dir import run_directory, run_settings, write_settings

    settings = run_settings(config.to_dict())
    with run_directory(settings, out) as checkpoint:
        trainer = DistillationTrainer(
            student,
            _training_arguments(transformers, config, out),
            teacher=teacher,
            teacher_cache=config.cache,
            cache_teacher=config.teacher,
            sparse_tail=config.sparse_tail,
            retemper=config.retemper,
            kd_config=config.kd,
            schedule_unit=config.schedule_unit,
            vocab_size=config.vocab_size,
            train_dataset=train_data,
            eval_dataset=eval_data,
            data_collator=PromptCollator(pad)
            if prompts
            else CausalLMCollator(pad, cache_keys=config.cache is not None),
            processing_class=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            cross_tokenizer_loss=config.cross_tokenizer_loss
            or ("map" if config.teacher_tokenizer is not None else None),
            on_policy=config.on_policy if prompts else None,
        )
        output = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = {"train_loss": float(output.training_loss)}
        if eval_data is not None:
            loss = trainer.evaluate()["eval_loss"]
            metrics.update(eval_loss=float(loss), eval_perplexity=math.exp(min(loss, 700.0)))
        trainer.save_model(str(out))
        write_settings(settings, out)
    return LMDistillResult(out, metrics, trainer)


def _check_data_ids(
    config: LMDistillConfig, student: Any, teacher: Any, train_data: Any, eval_data: Any
) -> None:
    """The data's token ids fit the models' input embeddings (the student's alone in
    cross-tokenizer mode, where the teacher re-tokenises the text)."""
    from kdkit.hf.data import check_token_ids

    cross = config.cross_tokenizer_loss is not None or config.teacher_tokenizer is not None
    models = [student] if teacher is None or cross else [student, teacher]
    rows = min(m.get_input_embeddings().num_embeddings for m in models)
    for flag, path, data in (
        ("--data", config.data, train_data),
        ("--eval_data", config.eval_data, eval_data),
    ):
        if data is not None:
            check_token_ids(data, rows, f"{flag} {path}", "model input embeddings")


def _check_vocabularies(
    config: LMDistillConfig, tokenizer: Any, teacher: Any, student: Any
) -> None:
    """Teacher and student of different output sizes need a tokenizer or ``--vocab_size``.

    Without either, the difference could be padding (the same tokenizer) or another
    vocabulary altogether; ``distill-lm`` does not guess (the library's
    :func:`~kdkit.hf.vocab.real_vocab_size` takes the smaller size, logged).
    """
    from kdkit.hf.vocab import output_size

    if tokenizer is not None or config.vocab_size is not None or config.teacher_tokenizer:
        return
    if teacher is not None:
        rows, source = output_size(teacher), "the teacher"
    else:
        from kdkit.cache import load_cache_index

        index = load_cache_index(str(config.cache))
        classes = index.teacher_num_classes
        name = config.teacher if config.teacher in classes else next(iter(classes))
        rows, source = classes[name], f"the cached teacher {name!r}"
    if rows != output_size(student):
        raise ValueError(
            f"{source} has {rows} output classes and the student {output_size(student)}, and "
            "no tokenizer says which vocabulary they share: pass --vocab_size N if they share "
            "a tokenizer and only the padding differs, --tokenizer DIR, or --teacher_tokenizer "
            "DIR for teachers with another tokenizer (cross-tokenizer distillation)"
        )


def _training_arguments(transformers: Any, config: LMDistillConfig, out: Path) -> Any:
    """The ``transformers.TrainingArguments`` of the recipe (checkpoints every
    ``save_steps`` optimizer steps, none if 0; no reporters; the process-group timeout of
    :func:`kdkit.train.torchrun.dist_timeout`)."""
    from kdkit.train.torchrun import dist_timeout

    return transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        bf16=config.bf16,
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_timeout=math.ceil(dist_timeout().total_seconds()),
    )


def _flag_data(
    flag: str, path: Any, tokenizer: Any, max_length: int | None, prompts: bool = False
) -> list[dict[str, Any]]:
    """:func:`~kdkit.hf.data.load_lm_data` (on-policy: :func:`~kdkit.hf.on_policy_data.
    load_prompt_data`), its ValueError naming ``flag``."""
    from kdkit.hf.data import load_lm_data
    from kdkit.hf.on_policy_data import load_prompt_data

    load = load_prompt_data if prompts else load_lm_data
    try:
        return load(path, tokenizer, max_length=max_length)
    except ValueError as exc:
        raise ValueError(f"{flag} {' '.join(str(exc).split())}") from None
