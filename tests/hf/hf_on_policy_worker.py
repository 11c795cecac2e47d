"""Worker for test_hf_on_policy_distributed.py: on-policy DistillationTrainer under torchrun.

``python -m torch.distributed.run --nproc_per_node=2 hf_on_policy_worker.py OUT`` runs

1. one optimizer step with ``on_policy_fraction=1`` and deterministic decoding (2 ranks x
   2 prompts x 2 accumulation steps = the 8 records); rank 0 saves the synchronised
   gradients;
2. six steps with ``on_policy_fraction=0.5``; every rank saves where each step's
   completions came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    # Imported here: pytest's doctest collection imports this file, also without transformers.
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]  # hf_testing, reference (tests/)
    import torch.distributed as dist
    from hf_testing import grad_grab, tiny_llama
    from test_hf_on_policy import prompt_samples
    from transformers import TrainingArguments

    from kdkit.hf import DistillationTrainer, OnPolicyConfig, PromptCollator
    from kdkit.losses.kd import KDLossConfig

    out = Path(sys.argv[1])
    torch.set_num_threads(1)

    def trainer(policy, steps, callbacks=()):
        args = TrainingArguments(
            output_dir=str(out / "run"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=steps,
            use_cpu=True,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
        )
        return DistillationTrainer(
            tiny_llama(2, seed=2),
            args,
            teacher=tiny_llama(3, seed=1),
            kd_config=KDLossConfig(temperature=2.0, kd_alpha=0.5, loss_type="jsd"),
            train_dataset=prompt_samples(),
            data_collator=PromptCollator(0),
            on_policy=policy,
            callbacks=list(callbacks),
        )

    grab = grad_grab()
    first = trainer(OnPolicyConfig(1.0, max_new_tokens=4, top_p=1e-6), 1, [grab])
    first.train()
    mixed = trainer(OnPolicyConfig(0.5, max_new_tokens=2), 6)
    sources = []
    original = mixed._on_policy_batches

    def record(batches):
        batches = original(batches)
        sources.append(mixed.completion_source)
        return batches

    mixed._on_policy_batches = record
    mixed.train()
    rank = dist.get_rank()
    saved = {"sources": sources}
    if rank == 0:
        saved["grads"] = grab.grads
    torch.save(saved, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
