"""Time of an on-policy ``DistillationTrainer`` step against an off-policy one.

At the size of ``kdkit demo --lm`` (:func:`kdkit.demo.lm_data.demo_llama`: width 128, the
teacher 4 layers, the student 2, vocabulary ``--vocab``, blocks of 64 tokens, micro-batch
16): prompt/completion records of ``--prompt`` + ``--new`` random tokens.  Rows, each the
median over ``--steps`` optimizer steps (after one warm-up step) of each of ``--rounds``
rounds (every row once per round, so a change of machine load hits all rows alike), timed
from one step's end to the next's (batch fetch, generation and the teacher included), and
the median over rounds of each round's ratio to its off-policy step:

* ``off-policy`` -- ``on_policy_fraction=0``: the data's completions (today's trainer);
* ``on-policy`` -- ``on_policy_fraction=1``: the student samples ``--new`` tokens per
  prompt (KV cache) and the teacher scores them;
* ``seq_kd`` -- the teacher samples them;
* ``on-policy, no KV cache`` -- as ``on-policy`` with ``generate(use_cache=False)``
  forced (every new token re-encodes the whole prefix): what the cache saves.

EOS is switched off during sampling so that every completion has ``--new`` tokens, like
the data's: the rows train on the same number of tokens and differ by the sampling only.
The loss is ``reverse_kl`` at ``T = 1`` with ``kd_alpha = 1`` (GKD's setting) in every row.

    python benchmarks/bench_on_policy.py                 # V = 2048, 32 + 32 tokens
    python benchmarks/bench_on_policy.py --new 16 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _records(n: int, prompt: int, new: int, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, prompt + new), generator=gen).tolist()
    return [{"input_ids": row, "prompt_length": prompt} for row in ids]


def _step_times(row: str, args: argparse.Namespace, out: str) -> list[float]:
    from transformers import TrainingArguments

    from bench_hf_step import step_timer
    from kdkit.demo.lm_data import demo_llama
    from kdkit.hf import DistillationTrainer, OnPolicyConfig, PromptCollator
    from kdkit.losses.kd import KDLossConfig

    block = args.prompt + args.new
    student = demo_llama(args.vocab, 2, block, seed=0)
    teacher = demo_llama(args.vocab, 4, block, seed=1)
    for model in (student, teacher):
        model.generation_config.eos_token_id = None  # every completion: --new tokens
    policy = {
        "off-policy": OnPolicyConfig(0.0),
        "on-policy": OnPolicyConfig(1.0, max_new_tokens=args.new),
        "seq_kd": OnPolicyConfig(0.0, seq_kd=True, max_new_tokens=args.new),
        "on-policy, no KV cache": OnPolicyConfig(1.0, max_new_tokens=args.new),
    }[row]
    if row == "on-policy, no KV cache":
        generate = student.generate

        def no_cache(*a, **k):
            return generate(*a, **{**k, "use_cache": False})

        student.generate = no_cache
    clock = step_timer()  # the step times of bench_hf_step (end of one step to the next)
    trainer = DistillationTrainer(
        student,
        TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps + 1,
            learning_rate=1e-4,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=10_000,
        ),
        teacher=teacher,
        kd_config=KDLossConfig(temperature=1.0, kd_alpha=1.0, loss_type="reverse_kl"),
        train_dataset=_records(args.batch * (args.steps + 1), args.prompt, args.new, args.vocab),
        data_collator=PromptCollator(0),
        on_policy=policy,
        callbacks=[clock],
    )
    trainer.train()
    return clock.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ("off-policy", "on-policy", "seq_kd", "on-policy, no KV cache")
    times: dict[str, list[float]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            for row in rows:
                times[row].append(statistics.median(_step_times(row, args, out)))
    base = statistics.median(times["off-policy"])
    print(
        f"V = {args.vocab}, B = {args.batch}, prompt {args.prompt} + {args.new} tokens, "
        f"{args.threads} threads; median of {args.rounds} rounds x {args.steps} steps"
    )
    print("| step | ms | x off-policy | median of the rounds' ratios | rounds (ms) |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        ms = statistics.median(times[row])
        ratio = statistics.median(t / b for t, b in zip(times[row], times["off-policy"]))
        rounds = ", ".join(f"{1000 * t:.0f}" for t in times[row])
        print(f"| {row} | {1000 * ms:.1f} | {ms / base:.2f} | {ratio:.2f} | {rounds} |")


if __name__ == "__main__":
    main()
