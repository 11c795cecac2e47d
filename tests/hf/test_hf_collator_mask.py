"""The causal-LM collator honours a record's own attention_mask (#26 item 2)."""

from __future__ import annotations

import pytest

from kdkit.hf.data import CausalLMCollator


def test_tokenizer_padded_record_never_trains_on_pads():
    samples = [
        {"input_ids": [5, 6, 0, 0], "attention_mask": [1, 1, 0, 0]},
        {"input_ids": [7, 8, 9]},
    ]
    batch = CausalLMCollator(pad_token_id=0)(samples)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, -100, -100], [7, 8, 9, -100]]


def test_own_labels_are_masked_too():
    samples = [{"input_ids": [5, 6, 1], "labels": [5, 6, 1], "attention_mask": [1, 1, 0]}]
    assert CausalLMCollator()(samples)["labels"].tolist() == [[5, 6, -100]]


@pytest.mark.parametrize("mask", [[1, 1], [1, 2, 0]])
def test_bad_attention_mask_is_refused(mask):
    with pytest.raises(ValueError, match=r"^sample 0: attention_mask must be 3 values of 0/1"):
        CausalLMCollator()([{"input_ids": [5, 6, 7], "attention_mask": mask}])
