"""Choose the LM demo's "KD, then on-policy KD" schedule on a validation split.

The demo's students train on the first quarter of the train blocks; the validation split
here is the train blocks they never see (the rest of the train files), never the held-out
files of the demo's report.  Each candidate ``(KD_FRACTION, lambda)`` trains the demo's
student (full settings but ``--steps``, default 160 as in docs/decisions.md; seed 0) and reports validation perplexity and the teacher's
log-likelihood of its samples on validation prompts; ``KD_FRACTION = 1`` is the plain KD
row.  Needs a finished demo directory (its ``teacher/``)::

    PYTHONPATH=src python benchmarks/lm_on_policy_schedule.py /tmp/lmdemo [--workers 2]
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CANDIDATES = ((1.0, 0.5), (0.5, 0.5), (0.75, 0.5), (0.5, 1.0))


def _run(job: tuple[str, float, float, int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    import kdkit.demo.lm_on_policy as lop
    from kdkit.demo.lm import LMDemoConfig
    from kdkit.demo.lm_data import blocks_of, demo_llama, stdlib_corpus
    from kdkit.demo.lm_train import train_run

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    out, fraction, lam, steps = Path(job[0]), job[1], job[2], job[3]
    lop.KD_FRACTION, lop.ON_POLICY_FRACTION = fraction, lam
    config = LMDemoConfig(output_dir=str(out / "schedule"), progress=False, workers=1)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher", local_files_only=True).eval()
    train_texts, _ = stdlib_corpus(config.corpus_chars)
    blocks = blocks_of(train_texts, tokenizer, config.block)
    students = blocks[: max(16, len(blocks) // 4)]
    validation = blocks[len(students) :][::7][:128]
    student = demo_llama(len(tokenizer), 2, config.block, seed=0)
    metrics, _, _, _ = train_run(
        lop.ON_POLICY_CONDITION, student, teacher, students, validation, config,
        steps, 0, out / "schedule" / f"f{fraction}-l{lam}", tokenizer,
    )  # fmt: skip
    loglik = lop.teacher_loglik_of_samples(student, teacher, validation, config.block, 0)
    return {"kd_fraction": fraction, "lambda": lam, **metrics, "teacher_loglik": loglik}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=160, help="student steps (docs: 160)")
    args = parser.parse_args()
    jobs = [(args.demo_dir, f, lam, args.steps) for f, lam in CANDIDATES]
    with ProcessPoolExecutor(args.workers) as pool:
        for row in pool.map(_run, jobs):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
