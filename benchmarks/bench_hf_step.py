"""Time of a ``DistillationTrainer`` optimizer step against a plain CE ``Trainer`` step.

Llama-style teacher and student built from configs (nothing downloaded), one batch of
``B`` sequences of ``L`` tokens over a vocabulary of ``V``.  Rows, each a median over
``--steps`` optimizer steps (after two warm-up steps) of each of ``--rounds`` rounds (every
row once per round, so a change of machine load hits all rows alike), timed by a callback
from one step's end to the next's (batch fetch and ``get_batch_samples`` included), with
the ratio to the CE-only step measured in the same run:

* ``CE only`` -- ``transformers.Trainer`` with the model's own loss (the baseline);
* ``naive KD`` -- a ``Trainer`` whose ``compute_loss`` takes the student's ``[B, L, V]``
  logits and calls ``kdkit.compute_student_loss`` on them (what a hand-written KD
  trainer does: the logits and their gradient exist);
* ``kdkit live`` / ``kdkit live pmax`` -- ``DistillationTrainer`` with the live teacher
  (fused linear path; ``pmax`` weighting needs the teacher before the step);
* ``kdkit top-K cache`` -- from a top-``K`` cache of ``dump_lm_teacher``.

``--memory`` instead runs each row in a fresh process and reports its extra peak resident
memory over the steps after the first (Linux: ``/proc/self/clear_refs`` resets the peak,
``VmHWM`` reads it), against the CE-only row's.

    python benchmarks/bench_hf_step.py                       # V = 8192, B = 8, L = 128
    python benchmarks/bench_hf_step.py --vocab 32000 --steps 6
    python benchmarks/bench_hf_step.py --vocab 32000 --memory
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def llama(vocab: int, layers: int, hidden: int, length: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=length,
            tie_word_embeddings=False,
        )
    )


def step_timer(sync=None):
    """A ``TrainerCallback`` recording step times in ``.times``; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before each clock reading."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Time from one optimizer step's end to the next's: the whole step, including
        the batch fetch and ``get_batch_samples`` (where a pmax teacher runs)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._last: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if sync is not None:
                sync()
            now = time.perf_counter()
            if self._last is not None:
                self.times.append(now - self._last)
            self._last = now

    return StepTimer()


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _memory_probe():
    """Extra peak RSS (MB) of the steps after the first: reset at step 1's end."""
    from transformers import TrainerCallback

    class MemoryProbe(TrainerCallback):
        def __init__(self) -> None:
            self.before_kb = 0
            self.extra_mb: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.before_kb = _status_kb("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")

        def on_train_end(self, args, state, control, **kwargs):
            self.extra_mb = (_status_kb("VmHWM") - self.before_kb) / 1024

    return MemoryProbe()


def _naive_trainer(config):
    """A hand-written KD trainer: the student's [B, L, V] logits, then the logits API."""
    from transformers import Trainer

    from kdkit.losses.kd import compute_student_loss

    class NaiveKD(Trainer):
        def __init__(self, *args, teacher, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            with torch.no_grad():
                teacher = self.teacher(**inputs).logits
            loss, _ = compute_student_loss(
                logits[:, :-1], teacher[:, :-1], labels[:, 1:].contiguous(), config
            )
            return loss

    return NaiveKD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="every row once per round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--memory", action="store_true", help="extra peak RSS per row instead")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one row, in a --memory worker
    args = parser.parse_args(argv)
    if args.memory:
        return _memory_table(args, argv if argv is not None else sys.argv[1:])
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from kdkit.hf import CausalLMCollator, DistillationTrainer, dump_lm_teacher
    from kdkit.losses.kd import KDLossConfig

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    total = args.batch_size * (args.steps + 2)
    data = [
        {
            "input_ids": torch.randint(0, args.vocab, (args.length,), generator=gen).tolist(),
            "sample_id": str(i),
        }
        for i in range(total)
    ]
    teacher = llama(args.vocab, 4, args.hidden, args.length, seed=1)
    config = KDLossConfig(temperature=1.0, kd_alpha=0.5)
    pmax = KDLossConfig(temperature=1.0, kd_alpha=0.5, kd_weighting="pmax")
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        dump_lm_teacher(teacher, data, cache, top_k=args.top_k, batch_size=args.batch_size)

        def run(name: str, make) -> None:
            if args.only is not None and name != args.only:
                return
            timer = step_timer()
            probe = _memory_probe()
            targs = TrainingArguments(
                output_dir=str(Path(tmp) / name.replace(" ", "-")),
                per_device_train_batch_size=args.batch_size,
                max_steps=args.steps + 2,
                learning_rate=1e-4,
                use_cpu=True,
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
                logging_steps=10_000,
                dataloader_pin_memory=False,
            )
            student = llama(args.vocab, 2, args.hidden, args.length, seed=2)
            trainer = make(student, targs, timer)
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(probe)
            trainer.train()
            if args.only is not None:
                print(f"MEMORY {probe.extra_mb:.1f}", flush=True)
            times.setdefault(name, []).extend(timer.times[1:])
            print(f"{name:<22} {statistics.median(timer.times[1:]) * 1000:8.1f} ms / step")

        collate = CausalLMCollator(0)
        cached = CausalLMCollator(0, cache_keys=True)
        common = {"train_dataset": data}
        naive = _naive_trainer(config)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            run(
                "CE only",
                lambda s, a, t: Trainer(s, a, data_collator=collate, callbacks=[t], **common),
            )
            run(
                "naive KD (logits)",
                lambda s, a, t: naive(
                    s, a, teacher=teacher, data_collator=collate, callbacks=[t], **common
                ),
            )
            for name, kd in (("kdkit live", config), ("kdkit live pmax", pmax)):
                run(
                    name,
                    lambda s, a, t, kd=kd: DistillationTrainer(
                        s,
                        a,
                        teacher=teacher,
                        kd_config=kd,
                        data_collator=collate,
                        callbacks=[t],
                        **common,
                    ),
                )
            run(
                f"kdkit top-{args.top_k} cache",
                lambda s, a, t: DistillationTrainer(
                    s,
                    a,
                    teacher_cache=cache,
                    kd_config=config,
                    data_collator=cached,
                    callbacks=[t],
                    **common,
                ),
            )
    if args.only is not None:
        return 0
    rows = [(name, statistics.median(ts)) for name, ts in times.items()]
    base = rows[0][1]
    print(
        f"\nV = {args.vocab}, B = {args.batch_size}, L = {args.length}, hidden {args.hidden}, "
        f"{args.threads} thread(s); median of {args.rounds} x {args.steps} steps; "
        "ratio to CE only:"
    )
    print("| step | ms | x CE only |\n|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t * 1000:.1f} | {t / base:.2f} |")
    return 0


ROWS = ("CE only", "naive KD (logits)", "kdkit live", "kdkit live pmax")


def _memory_table(args: argparse.Namespace, argv: list[str]) -> int:
    """Each row in a fresh process (``--only``): its extra peak RSS, and the ratio."""
    forwarded = [a for a in argv if a != "--memory"]
    rows = [*ROWS, f"kdkit top-{args.top_k} cache"]
    extra: dict[str, float] = {}
    for name in rows:
        out = subprocess.run(
            [sys.executable, __file__, *forwarded, "--only", name, "--rounds", "1"],
            capture_output=True,
            text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("MEMORY ")]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        extra[name] = float(lines[-1].split()[1])
        print(f"{name:<22} {extra[name]:8.1f} MB extra peak", flush=True)
    base = extra.get("CE only")
    logits_mb = args.batch_size * args.length * args.vocab * 4 / 2**20
    print(
        f"\nV = {args.vocab}, B = {args.batch_size}, L = {args.length}: extra peak RSS of the "
        f"steps after the first; one float32 [B, L, V] = {logits_mb:.0f} MB"
    )
    print("| step | extra peak MB | x CE only | [B, L, V] tensors |\n|---|---:|---:|---:|")
    for name, mb in extra.items():
        ratio = f"{mb / base:.2f}" if base else "-"
        print(f"| {name} | {mb:.0f} | {ratio} | {mb / logits_mb:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
