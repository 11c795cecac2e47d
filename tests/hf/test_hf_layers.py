"""kdkit.hf.student_from_teacher: every k-th layer, weights copied, teacher untouched."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_testing import tiny_gpt2, tiny_llama

from kdkit.hf import kept_layers, student_from_teacher

LAYERS = {"llama": ("model.layers", tiny_llama), "gpt2": ("transformer.h", tiny_gpt2)}


@pytest.mark.parametrize("arch", sorted(LAYERS))
@pytest.mark.parametrize("every_k", [1, 2, 3])
def test_keeps_every_kth_layer(arch, every_k):
    prefix, make = LAYERS[arch]
    teacher = make(5, seed=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, every_k)
    keep = kept_layers(5, every_k)
    assert student.config.num_hidden_layers == len(keep) and teacher.config.num_hidden_layers == 5
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, value in s_state.items():
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1 :].split(".", 1)
            source = f"{prefix}.{keep[int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(value, t_state[source]), name
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        out = student(ids).logits
        cached = student.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9, student.config.vocab_size) and cached.shape == (2, 7)
    if every_k == 1:
        torch.testing.assert_close(out, teacher(ids).logits)
    assert student.training


def test_bad_every_k():
    with pytest.raises(ValueError, match="every_k must be an integer >= 1, got 0"):
        student_from_teacher(tiny_llama(), 0)
    with pytest.raises(ValueError, match="every_k"):
        student_from_teacher(tiny_llama(), 1.5)
