"""DistillationTrainer's own arguments (#26 item 11): a dict ``kd_config`` is read with
``KDLossConfig.from_dict``, anything else is a one-line TypeError naming ``kd_config``;
training samples without ``sample_id`` over a cache are an error naming the cache."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hf_testing import lm_samples, tiny_llama
from transformers import TrainingArguments

from kdkit.hf import CausalLMCollator, DistillationTrainer
from kdkit.losses.kd import KDLossConfig


def _args(tmp_path):
    return TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=1
    )


def test_a_dict_kd_config_is_read_as_kd_loss_config(tmp_path):
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path),
        teacher=tiny_llama(3, seed=1),
        kd_config={"temperature": 2.0, "kd_alpha": 0.3},
        train_dataset=lm_samples(4),
        data_collator=CausalLMCollator(0),
    )
    assert trainer.kd_config == KDLossConfig(temperature=2.0, kd_alpha=0.3)


def test_another_kd_config_is_a_type_error_naming_it(tmp_path):
    with pytest.raises(TypeError, match="kd_config must be a KDLossConfig or a dict"):
        DistillationTrainer(
            tiny_llama(2, seed=2), _args(tmp_path), teacher=tiny_llama(3, seed=1), kd_config=2.0
        )


def test_samples_without_sample_id_over_a_cache_name_the_cache(tmp_path):
    from kdkit.hf import dump_lm_teacher

    cache = dump_lm_teacher(tiny_llama(3, seed=1), lm_samples(4), tmp_path / "c", top_k=4)
    bare = [{"input_ids": s["input_ids"]} for s in lm_samples(4)]
    with pytest.raises(ValueError, match=r"teacher cache '.*c'.*sample 0 has no 'sample_id'"):
        DistillationTrainer(
            tiny_llama(2, seed=2),
            _args(tmp_path),
            teacher_cache=cache,
            kd_config=KDLossConfig(temperature=1.0),
            train_dataset=bare,
            data_collator=CausalLMCollator(0, cache_keys=True),
        )
