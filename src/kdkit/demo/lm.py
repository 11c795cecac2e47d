"""The language-model demo (``kdkit demo --lm``): a tiny Llama teacher, students seven ways.

Pipeline (CPU, offline, nothing downloaded; ``transformers``, ``tokenizers`` and
``matplotlib`` from ``kdkit[hf]`` and ``kdkit[demo]``):

1. Corpus: the standard library's own top-level ``.py`` files
   (``sysconfig.get_paths()["stdlib"]``), every 10th file held out.
2. A byte-level BPE tokenizer trained on the training files with ``tokenizers``.
3. Blocks of ``block`` tokens; the teacher (a randomly initialised Llama-style model) is
   trained with CE on all training blocks; the students see only the first quarter of
   them (the regime where a teacher trained on more data has something to give).
   A second tokenizer (1.5x the vocabulary) and the teacher rebuilt for it, trained
   briefly (:mod:`kdkit.demo.lm_cross_tokenizer`).
4. The same small student (the teacher's width, half its layers) trained seven ways
   (:func:`kdkit.demo.lm_train.train_run`), each over several seeds: CE only
   (``transformers.Trainer``); KD from the live teacher
   (:class:`~kdkit.hf.DistillationTrainer`); KD then on-policy KD
   (:mod:`kdkit.demo.lm_on_policy`); cross-tokenizer KD from the second teacher; KD from
   the teacher's top-8 and top-64 caches; the teacher's layers 0, 2, ... as the
   initialisation (:func:`~kdkit.hf.student_from_teacher`) + KD.
5. Held-out perplexity, next-token accuracy and the teacher's log-likelihood of each
   model's samples (mean ± std over seeds, last step; no model selection), ``report.md``.

KD from top-k teacher caches (two K) runs from ``kdkit.hf.dump_lm_teacher`` caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit._extras import require_installed
from kdkit.demo.lm_cross_tokenizer import (
    CROSS_TOKENIZER_CONDITION,
    XTOK_DIR,
    XTOK_VOCAB_SCALE,
    cross_teacher_model,
    mean_coverage,
)
from kdkit.demo.lm_data import blocks_of, demo_llama, stdlib_corpus, train_tokenizer
from kdkit.demo.lm_on_policy import KD_FRACTION, ON_POLICY_CONDITION, teacher_loglik_of_samples
from kdkit.demo.lm_train import train_run
from kdkit.demo.report import (
    Summary,
    bash_block,
    figure,
    image_lines,
    markdown_table,
    mean_std,
    quick_note,
    settings_line,
    summarize,
    write_json,
    write_report,
)
from kdkit.demo.settings import check_counts, check_output_dir

__all__ = ["LM_CONDITIONS", "LMDemoConfig", "LMDemoResult", "run_lm_demo"]

LM_DEMO_EXTRAS: tuple[tuple[str, str], ...] = (
    ("transformers", "hf"),
    ("tokenizers", "hf"),
    ("accelerate", "hf"),
    ("matplotlib", "demo"),
)
"""Packages the LM demo needs and the extra that brings each, checked before it starts."""

CACHE_KS: tuple[int, ...] = (8, 64)
"""The two K of the top-k teacher caches."""

LM_CONDITIONS: tuple[str, ...] = (
    "CE only",
    "KD (live teacher)",
    ON_POLICY_CONDITION,
    CROSS_TOKENIZER_CONDITION,
    *(f"KD (top-{k} cache)" for k in CACHE_KS),
    "layer-dropped init + KD",
)
"""Student conditions, in table order."""

logger = logging.getLogger("kdkit.demo")


@dataclasses.dataclass
class LMDemoConfig:
    """Settings of :func:`run_lm_demo`; ``quick`` shrinks everything for CI (< 1 minute)."""

    output_dir: str = "kdkit-lm-demo"
    quick: bool = False
    seeds: int = None  # type: ignore[assignment]  # None: the default, set below
    progress: bool = True
    corpus_chars: int = None  # type: ignore[assignment]  # None: the default, set below
    vocab_size: int = None  # type: ignore[assignment]  # None: the default, set below
    block: int = None  # type: ignore[assignment]  # None: the default, set below
    teacher_steps: int = None  # type: ignore[assignment]  # None: the default, set below
    student_steps: int = None  # type: ignore[assignment]  # None: the default, set below
    xtok_teacher_steps: int = None  # type: ignore[assignment]  # None: the default, set below
    temperature: float = 1.0
    kd_alpha: float = 0.8
    workers: int = None  # type: ignore[assignment]  # None: the default, set below

    def __post_init__(self) -> None:
        defaults = {
            "seeds": (1, 2),
            "corpus_chars": (60_000, 1_200_000),
            "vocab_size": (512, 2048),
            "block": (32, 64),
            "teacher_steps": (20, 400),
            "student_steps": (12, 140),
            "xtok_teacher_steps": (6, 80),
        }
        for name, (quick, full) in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, quick if self.quick else full)
        if self.workers is None:  # the ten student runs, one thread each, side by side
            self.workers = min(4, available_cpus())
        check_counts(self, (*defaults, "workers"))
        check_output_dir(self.output_dir)


@dataclasses.dataclass
class LMDemoResult:
    """Outputs of :func:`run_lm_demo`."""

    table: str
    report_path: Path
    wall_time_s: float
    summary: Summary
    teacher_metrics: dict[str, float]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_lm_demo_extras() -> None:
    """Raise ``ImportError`` naming the extra of the first missing package."""
    for module, extra in LM_DEMO_EXTRAS:
        require_installed(module, extra, "kdkit demo --lm")


# --- the student runs ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StudentJob:
    """One student training of the demo (a condition and a seed), runnable in a worker."""

    condition: str
    seed: int
    out: str  # the demo's output directory: teacher/, cache-top*/ are read from it
    config: LMDemoConfig
    data: list[dict[str, Any]]
    held_out: list[dict[str, Any]]


def _run_student(job: _StudentJob) -> tuple[Any, ...]:
    """Train the student of ``job`` (in this process or a worker): ``train_run``'s result.

    Everything comes from the files the demo wrote (the teacher and its tokenizer in
    ``teacher/``, the caches) and the seeds, so a run gives the same numbers in any process.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from kdkit.hf import student_from_teacher

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    out, config, condition = Path(job.out), job.config, job.condition
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "teacher")
    scorer = AutoModelForCausalLM.from_pretrained(out / "teacher", local_files_only=True)
    teacher: Any = None if condition == "CE only" else scorer.eval()
    if condition == "layer-dropped init + KD":
        student = student_from_teacher(teacher, 2)
    else:
        student = demo_llama(len(tokenizer), 2, config.block, seed=job.seed)
    for k in CACHE_KS:
        if condition == f"KD (top-{k} cache)":
            teacher = out / f"cache-top{k}"
    if condition == CROSS_TOKENIZER_CONDITION:
        xtok = AutoModelForCausalLM.from_pretrained(out / XTOK_DIR, local_files_only=True)
        teacher = (xtok.eval(), PreTrainedTokenizerFast.from_pretrained(out / XTOK_DIR))
    slug = condition.lower().replace(" ", "-").replace("(", "").replace(")", "")
    result = train_run(
        condition,
        student,
        teacher,
        job.data,
        job.held_out,
        config,
        config.student_steps,
        job.seed,
        out / "runs" / f"{slug.replace('+', 'plus')}-seed{job.seed}",
        tokenizer,
    )
    loglik = teacher_loglik_of_samples(student, scorer, job.held_out, config.block, job.seed)
    result[0]["teacher_loglik"] = loglik
    if condition == CROSS_TOKENIZER_CONDITION:
        result[0]["coverage"] = mean_coverage(result[2])
    return result


def _run_jobs(jobs: list[_StudentJob], workers: int) -> list[tuple[Any, ...]]:
    """The jobs' results in order: in this process (``workers == 1``), else in a pool of
    ``workers`` spawned processes of one thread each (no progress bars there)."""
    if workers == 1:
        return [_run_student(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    quiet = [
        dataclasses.replace(j, config=dataclasses.replace(j.config, progress=False)) for j in jobs
    ]
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_run_student, quiet))


# --- the demo ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Corpus:
    """Step 1: the tokenizer and the token blocks of the demo."""

    tokenizer: Any
    texts: tuple[list[str], list[str]]  # train and held-out files
    train_files: int
    held_files: int
    train_blocks: list[dict[str, Any]]
    student_blocks: list[dict[str, Any]]
    held_out: list[dict[str, Any]]


def _corpus(config: LMDemoConfig, out: Path) -> _Corpus:
    """Step 1: the stdlib corpus, its BPE tokenizer (``out/tokenizer``) and the blocks."""
    train_texts, held_texts = stdlib_corpus(config.corpus_chars)
    tokenizer = train_tokenizer(train_texts, config.vocab_size, out / "tokenizer")
    train_blocks = blocks_of(train_texts, tokenizer, config.block)
    corpus = _Corpus(
        tokenizer,
        (train_texts, held_texts),
        len(train_texts),
        len(held_texts),
        train_blocks,
        train_blocks[: max(16, len(train_blocks) // 4)],
        blocks_of(held_texts, tokenizer, config.block)[:128],
    )
    logger.info(
        "corpus: %d train files (%d blocks of %d tokens; students: %d), %d held-out "
        "files (%d blocks); BPE vocabulary %d",
        corpus.train_files,
        len(corpus.train_blocks),
        config.block,
        len(corpus.student_blocks),
        corpus.held_files,
        len(corpus.held_out),
        len(tokenizer),
    )
    return corpus


def _teacher(
    config: LMDemoConfig, out: Path, corpus: _Corpus
) -> tuple[Any, dict[str, float], list[tuple[int, float]]]:
    """Step 2: the teacher trained with CE on all blocks, saved to ``out/teacher`` with the
    tokenizer; the teacher (in eval mode), its held-out metrics and perplexity curve."""
    teacher = demo_llama(len(corpus.tokenizer), 4, config.block, seed=1000)
    metrics, curve, _, line = train_run(
        "teacher",
        teacher,
        None,
        corpus.train_blocks,
        corpus.held_out,
        config,
        config.teacher_steps,
        1000,
        out / "runs" / "teacher",
        corpus.tokenizer,
    )
    logger.info("%s", line)
    metrics["teacher_loglik"] = teacher_loglik_of_samples(
        teacher, teacher, corpus.held_out, config.block, 1000
    )
    teacher.save_pretrained(out / "teacher")
    corpus.tokenizer.save_pretrained(out / "teacher")
    teacher.eval()
    return teacher, metrics, curve


def _xtok_teacher(config: LMDemoConfig, out: Path, corpus: _Corpus, teacher: Any) -> dict:
    """Step 2b (:mod:`kdkit.demo.lm_cross_tokenizer`): the second tokenizer and the teacher
    rebuilt for it, trained briefly with CE and saved to ``out/teacher-xtok``; its facts."""
    train_texts, held_texts = corpus.texts
    vocab = round(XTOK_VOCAB_SCALE * config.vocab_size)
    tokenizer = train_tokenizer(train_texts, vocab, out / XTOK_DIR)
    model = demo_llama(len(tokenizer), 4, config.block, seed=2000)
    copied = cross_teacher_model(teacher, corpus.tokenizer, tokenizer, model)
    held_out = blocks_of(held_texts, tokenizer, config.block)[:128]
    metrics, _, _, line = train_run(
        "teacher (other tokenizer)",
        model,
        None,
        blocks_of(train_texts, tokenizer, config.block),
        held_out,
        config,
        config.xtok_teacher_steps,
        2000,
        out / "runs" / "teacher-xtok",
        tokenizer,
    )
    logger.info("%s (its own tokens; %d embedding rows copied)", line, copied)
    model.save_pretrained(out / XTOK_DIR)
    chars = sum(len(tokenizer.decode(b["input_ids"])) for b in held_out)
    tokens = sum(len(b["input_ids"]) for b in held_out)
    return {"vocab": len(tokenizer), "copied_rows": copied, "chars_per_token": chars / tokens,
            "perplexity": metrics["perplexity"]}  # fmt: skip


def _caches(teacher: Any, corpus: _Corpus, out: Path) -> dict[int, float]:
    """Step 3: the top-k caches (``out/cache-top{k}``) of the students' blocks for each K
    of :data:`CACHE_KS`; the data bytes per token of each."""
    from kdkit.hf import dump_lm_teacher

    cache_bytes = {}
    for k in CACHE_KS:
        cache = out / f"cache-top{k}"
        index = dump_lm_teacher(teacher, corpus.student_blocks, cache, top_k=k, dtype="float16")
        data_bytes = sum(
            f.stat().st_size for f in cache.rglob("*") if f.is_file() and f.suffix == ".bin"
        )
        cache_bytes[k] = data_bytes / max(1, index.num_positions)
        logger.info("top-%d cache: %.0f bytes per token", k, cache_bytes[k])
    return cache_bytes


@dataclasses.dataclass
class _Students:
    """Step 4's results: per condition, each seed's final metrics and perplexity curve,
    and the training logs of its first run."""

    finals: dict[str, list[dict[str, float]]]
    curves: dict[str, list[list[tuple[int, float]]]]
    train_logs: dict[str, list[dict[str, Any]]]


def _students(config: LMDemoConfig, out: Path, corpus: _Corpus) -> _Students:
    """Step 4: a student per condition of :data:`LM_CONDITIONS` and seed."""
    result = _Students({c: [] for c in LM_CONDITIONS}, {c: [] for c in LM_CONDITIONS}, {})
    jobs = [
        _StudentJob(condition, seed, str(out), config, corpus.student_blocks, corpus.held_out)
        for seed in range(config.seeds)
        for condition in LM_CONDITIONS
    ]
    for job, (metrics, curve, logs, line) in zip(jobs, _run_jobs(jobs, config.workers)):
        logger.info("%s", line)
        result.finals[job.condition].append(metrics)
        result.curves[job.condition].append(curve)
        result.train_logs.setdefault(job.condition, logs)
    return result


@contextlib.contextmanager
def _one_quiet_thread() -> Iterator[None]:
    """One intra-op torch thread and transformers' errors only, restored afterwards."""
    from transformers.utils import logging as hf_logging

    previous_threads = torch.get_num_threads()
    # Tiny models: one intra-op thread is faster than two, and several thrash on a busy
    # machine (measured: 0.13 vs 2.5 CPU-seconds per teacher step on 2 loaded cores).
    torch.set_num_threads(1)
    hf_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        hf_logging.set_verbosity(hf_verbosity)


def run_lm_demo(config: LMDemoConfig | None = None) -> LMDemoResult:
    """Run the LM demo (see the module docstring); return the table and paths.

    Raises:
        ImportError: before any work, when a package of ``kdkit[hf]``/``kdkit[demo]`` is
            missing.
    """
    check_lm_demo_extras()
    config = LMDemoConfig() if config is None else config
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _one_quiet_thread():
        corpus = _corpus(config, out)
        teacher, teacher_metrics, teacher_curve = _teacher(config, out, corpus)
        xtok = _xtok_teacher(config, out, corpus, teacher)
        cache_bytes = _caches(teacher, corpus, out)
        students = _students(config, out, corpus)
    summary = summarize(students.finals)
    table = format_lm_table(summary, teacher_metrics, config.seeds)
    plots = _plots(out, students, teacher_curve)
    wall = time.perf_counter() - start
    facts = {**_facts(corpus, cache_bytes), "xtok_teacher": xtok}
    table += (
        "\n\nTeacher cache, bytes per token (float16 top-k + tail): "
        + ", ".join(f"top-{k}: {v:.0f}" for k, v in cache_bytes.items())
        + f" (dense float16: {2 * facts['vocab']})."
    )
    report_path = _report(config, out, table, summary, plots, wall, facts)
    write_json(out / "results.json", {"summary": summary, "teacher": teacher_metrics, **facts})
    return LMDemoResult(table, report_path, wall, summary, teacher_metrics)


def _facts(corpus: _Corpus, cache_bytes: dict[int, float]) -> dict[str, Any]:
    """The corpus and cache sizes of ``results.json`` and the report."""
    return {
        "train_files": corpus.train_files,
        "held_files": corpus.held_files,
        "train_blocks": len(corpus.train_blocks),
        "student_blocks": len(corpus.student_blocks),
        "held_blocks": len(corpus.held_out),
        "vocab": len(corpus.tokenizer),
        "cache_bytes_per_token": {str(k): v for k, v in cache_bytes.items()},
    }


def format_lm_table(summary: Summary, teacher: dict[str, float], seeds: int) -> str:
    """The results table (markdown)."""
    header = ["model", "held-out perplexity", "next-token accuracy (%)", "teacher log-lik"]
    rows = [
        [
            "teacher (4 layers)",
            f"{teacher['perplexity']:.2f}",
            f"{100 * teacher['accuracy']:.1f}",
            f"{teacher['teacher_loglik']:.2f}",
        ]
    ]
    rows += [
        [
            f"student (2 layers): {name}",
            mean_std(stats["perplexity"], ".2f", scale=1),
            mean_std(stats["accuracy"]),
            mean_std(stats["teacher_loglik"], ".2f", scale=1),
        ]
        for name, stats in summary.items()
    ]
    note = (
        f"Held-out stdlib files; students: mean ± std over {seeds} seed(s), last step. "
        "Teacher log-lik: the teacher's mean log-probability (nats/token) of the model's "
        "own samples continuing held-out prompts (higher: more teacher-like generations)."
    )
    return markdown_table(note, header, rows)


def _perplexity_curves(
    out: Path,
    curves: dict[str, list[list[tuple[int, float]]]],
    teacher_curve: list[tuple[int, float]],
) -> str:
    with figure(
        out / "perplexity_curves.png",
        legend=8,
        xlabel="optimizer step",
        ylabel="held-out perplexity",
        yscale="log",
        title="Held-out perplexity during training (mean over seeds)",
    ) as ax:
        for name, runs in curves.items():
            steps = [s for s, _ in runs[0]]
            values = np.array([[p for _, p in run] for run in runs])
            ax.plot(steps, values.mean(axis=0), marker="o", ms=3, label=f"student: {name}")
        if teacher_curve:
            ax.plot(*zip(*teacher_curve), ":", color="gray", label="teacher (own schedule)")
    return "perplexity_curves.png"


def _kd_losses(out: Path, logs: list[dict[str, Any]]) -> str:
    steps = [h["step"] for h in logs]
    with figure(
        out / "kd_losses.png",
        legend=8,
        xlabel="optimizer step",
        ylabel="training loss",
        title="KD (live teacher): CE vs KD",
    ) as ax:
        for key, label in (("ce_loss", "CE"), ("kd_loss", "KD"), ("loss", "total")):
            ax.plot(steps, [h[key] for h in logs], label=label)
    return "kd_losses.png"


def _plots(out: Path, students: _Students, teacher_curve: list[tuple[int, float]]) -> list[str]:
    return [
        _perplexity_curves(out, students.curves, teacher_curve),
        _kd_losses(out, students.train_logs["KD (live teacher)"]),
    ]


def _report(
    config: LMDemoConfig,
    out: Path,
    table: str,
    summary: Summary,
    plots: list[str],
    wall: float,
    facts: dict[str, Any],
) -> Path:
    budget = f"teacher {config.teacher_steps} steps, students {config.student_steps} steps"
    return write_report(
        out,
        "kdkit LM demo report",
        settings_line(config.quick, config.seeds, budget, wall),
        [
            ("Setup", _setup_lines(config, facts)),
            ("Results", _results_lines(config, table, summary)),
            ("Plots", image_lines(plots)),
            ("Reproduce with the CLI", bash_block(_reproduce_lines(config))),
        ],
    )


def _setup_lines(config: LMDemoConfig, facts: dict[str, Any]) -> list[str]:
    x = facts["xtok_teacher"]
    return [
        f"* Corpus: the standard library's top-level `.py` files ({facts['train_files']} "
        f"train files, {facts['held_files']} held-out files: every 10th), byte-level BPE "
        f"tokenizer trained on the train files ({facts['vocab']} tokens).",
        f"* Blocks of {config.block} tokens: teacher on all {facts['train_blocks']} train "
        f"blocks, students on the first {facts['student_blocks']}; evaluation on "
        f"{facts['held_blocks']} held-out blocks.",
        "* Teacher: Llama-style, 4 layers, width 128, randomly initialised, CE only. Students: "
        "the same with 2 layers. AdamW lr 3e-3, cosine schedule, batch 16.",
        f"* KD: T = {config.temperature:g}, alpha = {config.kd_alpha:g}, forward KL, no "
        "warmup; the live teacher runs in eval mode under no_grad "
        "(`kdkit.hf.DistillationTrainer`). Layer-dropped init: the teacher's layers 0 and 2 "
        "(`kdkit.hf.student_from_teacher(teacher, 2)`).",
        "* Top-k caches: the teacher's "
        + " and ".join(f"top-{k}" for k in CACHE_KS)
        + " log-probabilities (float16, plus the tail mass) per token of the students' "
        "blocks (`kdkit.hf.dump_lm_teacher`), read back as `SparseLogits` "
        "(`DistillationTrainer(teacher_cache=...)`, `sparse_tail='bucket'`).",
        f"* {ON_POLICY_CONDITION}: the first {KD_FRACTION:.0%} of the student steps are "
        "the KD row's recipe; the rest (same AdamW, one cosine schedule) split each block "
        "into prompt (first half) and completion; per step, with probability 0.5, the "
        "student samples the completions (T = 1, KV cache) and the live teacher scores them "
        "(`DistillationTrainer(on_policy=...)`); JSD (beta 0.5), kd_alpha = 1, as TRL's GKD.",
        f"* {CROSS_TOKENIZER_CONDITION}: a second byte-level BPE tokenizer trained on the "
        f"same train files ({x['vocab']} tokens, {x['chars_per_token']:.2f} characters per "
        "held-out token); its teacher is the teacher's layers with the embedding rows of the "
        f"{x['copied_rows']} tokens both vocabularies spell alike, trained "
        f"{config.xtok_teacher_steps} CE steps (held-out perplexity {x['perplexity']:.1f} "
        "over its own tokens); the student distils it through "
        "`DistillationTrainer(teacher_tokenizer=..., cross_tokenizer_loss='map')` (KD on "
        "positions aligned by character offsets, over the shared vocabulary).",
    ]


def _results_lines(config: LMDemoConfig, table: str, summary: Summary) -> list[str]:
    ce = summary["CE only"]["perplexity"][0]
    kd = summary["KD (live teacher)"]["perplexity"][0]
    init = summary["layer-dropped init + KD"]["perplexity"][0]
    ll = {c: summary[c]["teacher_loglik"][0] for c in ("CE only", "KD (live teacher)")}
    on, xt = summary[ON_POLICY_CONDITION], summary[CROSS_TOKENIZER_CONDITION]
    on_ll, kd_ll = round(on["teacher_loglik"][0], 2), round(ll["KD (live teacher)"], 2)
    verdict = (
        f"{'beats' if on['perplexity'][0] < kd else 'does not beat'} off-policy KD on "
        f"held-out perplexity ({on['perplexity'][0]:.2f} vs {kd:.2f}), and its samples are "
        f"{'more' if on_ll > kd_ll else 'not more'} teacher-like ({on_ll:.2f} vs {kd_ll:.2f})"
    )
    return [
        *(quick_note("steps", "kdkit demo --lm") if config.quick else []),
        table,
        "",
        f"Held-out perplexity: CE only {ce:.2f}, KD from the live teacher {kd:.2f} "
        f"({100 * (kd / ce - 1):+.1f} %), layer-dropped init + KD {init:.2f} "
        f"({100 * (init / ce - 1):+.1f} %). {ON_POLICY_CONDITION}: perplexity "
        f"{on['perplexity'][0]:.2f}, teacher log-likelihood of its samples "
        f"{on['teacher_loglik'][0]:.2f} nats/token (CE only {ll['CE only']:.2f}, KD "
        f"{ll['KD (live teacher)']:.2f}); it {verdict}. {CROSS_TOKENIZER_CONDITION}: "
        f"perplexity {xt['perplexity'][0]:.2f} ({100 * (xt['perplexity'][0] / ce - 1):+.1f} "
        f"% vs CE only), aligned coverage {100 * xt['coverage'][0]:.1f} % of the student's "
        "target tokens (the trainer's logged `coverage`).",
    ]


def _reproduce_lines(config: LMDemoConfig) -> list[str]:
    return [
        f"kdkit distill-lm --data train.jsonl --teacher_model {config.output_dir}/teacher \\",
        "    --student_from_teacher 2 --temperature "
        f"{config.temperature:g} --kd_alpha {config.kd_alpha:g} \\",
        f"    --max_steps {config.student_steps} --per_device_train_batch_size 16 "
        "--learning_rate 3e-3 --output_dir runs/lm-student",
    ]
