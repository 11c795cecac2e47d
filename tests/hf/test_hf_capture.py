"""kdkit.hf.dump_lm_teacher: per-token LM outputs through kdkit's dump, fingerprints checked."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_testing import VOCAB, lm_samples, tiny_llama

from kdkit.cache import load_cached_logits
from kdkit.hf.capture import check_lm_cache, dump_lm_teacher, lm_cache_key


@pytest.mark.parametrize("top_k", [None, 8])
def test_dump_and_read_back(tmp_path, top_k, one_torch_thread):
    teacher = tiny_llama(2, seed=1).eval()
    samples = lm_samples(8)
    index = dump_lm_teacher(teacher, samples, tmp_path / "cache", top_k=top_k, dtype="float32")
    assert index.num_samples == 8
    check_lm_cache(index, samples)  # matches: no error
    keys = [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples[:2]]
    cached = load_cached_logits(keys, index)
    with torch.no_grad():
        want = teacher(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0]
    n = len(samples[1]["input_ids"])
    if top_k is None:
        torch.testing.assert_close(cached[1, :n], want, rtol=1e-5, atol=1e-5)
    else:
        assert cached.indices.shape[-1] == 8
        top = torch.log_softmax(want, -1).topk(8, -1).indices
        assert torch.equal(cached.indices[1, :n].sort(-1).values, top.sort(-1).values)
    assert want.shape[-1] == VOCAB


def test_missing_and_changed_samples_are_counted_before_training(tmp_path):
    samples = lm_samples(8)
    index = dump_lm_teacher(tiny_llama(2, seed=1), samples[:6], tmp_path / "cache", top_k=4)
    changed = [dict(s) for s in samples]
    changed[2]["input_ids"] = [5, *changed[2]["input_ids"][1:]]
    with pytest.raises(ValueError) as info:
        check_lm_cache(index, changed)
    message = str(info.value)
    assert "of 8 samples, 2 missing from the cache (e.g. ['6', '7'])" in message
    assert "1 cached for other token sequences (e.g. ['2']" in message
