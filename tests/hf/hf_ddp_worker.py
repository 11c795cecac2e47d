"""Worker for test_hf_distributed.py: one DistillationTrainer step under torchrun.

``python -m torch.distributed.run --nproc_per_node=2 hf_ddp_worker.py OUT WEIGHTING [fsdp]``
trains the tiny student for one optimizer step (2 ranks x 2 sequences x 2 accumulation
steps = the 8 samples of ``lm_samples``) and rank 0 saves the synchronised gradients
and the logged statistics to ``OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    # Imported here: pytest's doctest collection imports this file, also without transformers.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_testing import grad_grab, lm_samples, tiny_llama
    from transformers import TrainingArguments

    from kdkit.hf import CausalLMCollator, DistillationTrainer
    from kdkit.losses.kd import KDLossConfig

    out, weighting = Path(sys.argv[1]), sys.argv[2]
    fsdp = len(sys.argv) > 3 and sys.argv[3] == "fsdp"
    torch.set_num_threads(1)
    extra = {}
    if fsdp:
        extra = {"fsdp": True, "fsdp_config": {"reshard_after_forward": True}}
    args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    grab = grad_grab()
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        args,
        teacher=tiny_llama(3, seed=1),
        kd_config=KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting=weighting),
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
        callbacks=[grab],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "kd_loss" in h]
        torch.save({"grads": grab.grads, "logs": logs}, out / "rank0.pt")


if __name__ == "__main__":
    main()
