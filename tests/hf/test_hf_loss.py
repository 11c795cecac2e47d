"""kdkit.hf.loss: the causal-LM loss equals kdkit's logits API on shifted logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kdkit.hf.loss import lm_distillation_loss, shift_labels
from kdkit.losses.kd import KDLossConfig, compute_student_loss

B, L, H, V = 3, 7, 5, 11


def _problem(pad_student: int = 0, pad_teacher: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V + pad_student, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V + pad_student, H, generator=gen, dtype=torch.float64))
    teacher = 2 * torch.randn(B, L, V + pad_teacher, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, :3] = -100  # a prompt
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0  # padding
    labels[1, 5:] = -100
    return hidden, head, teacher, labels, mask


def test_shift_labels_once_with_padding():
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert shift_labels(labels, mask).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
    # A padding position whose label was not set to ignore_index is still not a target.
    assert shift_labels(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]])).tolist() == [
        [6, -100, -100]
    ]


@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce", "reverse_kl", "jsd"])
@pytest.mark.parametrize("weighting", ["none", "pmax", "threshold"])
def test_matches_compute_student_loss_on_shifted_logits(loss_type, weighting):
    config = KDLossConfig(
        temperature=2.0,
        kd_alpha=0.7,
        loss_type=loss_type,
        kd_weighting=weighting,
        confidence_threshold=0.2,
        warmup_epochs=1,
        kd_ramp_epochs=2,
    )
    hidden, head, teacher, labels, mask = _problem()
    loss, terms = lm_distillation_loss(
        hidden, head, teacher, labels, config, 2.0, attention_mask=mask
    )
    assert terms.alpha == pytest.approx(0.35)
    (grad,) = torch.autograd.grad(loss, hidden)

    # Reference: the model's logits, shifted by hand, through the public logits API.
    hidden2 = hidden.detach().clone().requires_grad_(True)
    logits = head(hidden2)[:, :-1]
    ref, stats = compute_student_loss(logits, teacher[:, :-1], labels[:, 1:].clone(), config, 2.0)
    (ref_grad,) = torch.autograd.grad(ref, hidden2)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert terms.num_tokens.item() == (labels[:, 1:] != -100).sum().item()
    assert (terms.confidence_sum / terms.num_tokens).item() == pytest.approx(
        stats["avg_confidence"]
    )


def test_padded_vocabularies_are_cut_to_the_real_size():
    config = KDLossConfig(temperature=3.0, kd_alpha=0.5)
    hidden, head, teacher, labels, mask = _problem(pad_student=5, pad_teacher=9)
    loss, _ = lm_distillation_loss(
        hidden, head, teacher, labels, config, attention_mask=mask, vocab_size=V
    )
    logits = head(hidden)[:, :-1, :V]
    ref, _ = compute_student_loss(logits, teacher[:, :-1, :V], labels[:, 1:].clone(), config)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_hidden_may_be_logits_and_all_ignored_is_an_exact_zero():
    config = KDLossConfig(kd_alpha=0.5)
    logits = torch.randn(2, 4, V, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss, terms = lm_distillation_loss(logits, None, torch.randn(2, 4, V), labels, config)
    assert loss.item() == 0.0 and terms.num_tokens.item() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_input_is_named():
    config = KDLossConfig()
    hidden, head, teacher, labels, _ = _problem()
    labels[2, 3] = V + 4
    with pytest.raises(ValueError, match="ignore_index"):
        lm_distillation_loss(hidden, head, teacher, labels, config)
    with pytest.raises(ValueError, match=r"same shape|differ"):
        lm_distillation_loss(hidden, head, teacher[..., :-1], labels.clamp(max=0), config)


def test_step_totals_make_micro_batch_losses_add_up():
    """Two halves with the totals of the whole batch sum to the whole batch's loss."""
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting="pmax")
    hidden, head, teacher, labels, mask = _problem()
    whole, stats = lm_distillation_loss(hidden, head, teacher, labels, config, attention_mask=mask)
    totals = {"num_tokens": stats.num_tokens, "kd_weight_total": stats.kd_weight_sum}
    parts = [
        lm_distillation_loss(
            hidden[s], head, teacher[s], labels[s], config, attention_mask=mask[s], **totals
        )[0]
        for s in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)


def _sparse_teacher(teacher: torch.Tensor, k: int, mask: torch.Tensor, temperature=2.0):
    """A top-k cache's SparseLogits of ``teacher`` (real positions: ``mask``), captured at
    the tests' temperature 2."""
    from kdkit.sparse import sparse_topk

    return sparse_topk(teacher, k, temperature, mask=mask.bool())


@pytest.mark.parametrize("teacher_kind", ["dense", "top-k"])
def test_hidden_states_go_through_the_linear_path(monkeypatch, teacher_kind):
    """With a head, the loss is computed by student_loss_terms_linear (no [B, L, V]
    student logits) for live/dense and top-k teachers alike."""
    import kdkit.losses.linear as linear

    calls = []
    original = linear.student_loss_terms_linear

    def spy(*args, **kwargs):
        calls.append(type(args[2]).__name__)
        return original(*args, **kwargs)

    monkeypatch.setattr(linear, "student_loss_terms_linear", spy)
    hidden, head, teacher, labels, mask = _problem()
    if teacher_kind == "top-k":
        teacher = _sparse_teacher(teacher, 4, mask)
    config = KDLossConfig(temperature=2.0)
    lm_distillation_loss(hidden, head, teacher, labels, config, attention_mask=mask)
    assert calls == ["SparseLogits" if teacher_kind == "top-k" else "Tensor"]


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("weighting", ["none", "pmax"])
def test_top_k_teacher_matches_compute_student_loss(tail, weighting):
    """A top-k cache through the linear path = the logits API on the shifted logits."""
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting=weighting)
    hidden, head, teacher, labels, mask = _problem()
    sparse = _sparse_teacher(teacher, 4, mask)
    loss, terms = lm_distillation_loss(
        hidden, head, sparse, labels, config, attention_mask=mask, sparse_tail=tail
    )
    (grad,) = torch.autograd.grad(loss, hidden)
    hidden2 = hidden.detach().clone().requires_grad_(True)
    ref_teacher = _sparse_teacher(teacher[:, :-1], 4, mask[:, :-1])
    ref, stats = compute_student_loss(
        head(hidden2)[:, :-1],
        ref_teacher,
        labels[:, 1:].clone(),
        config,
        sparse_tail=tail,
    )
    (ref_grad,) = torch.autograd.grad(ref, hidden2)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert (terms.confidence_sum / terms.num_tokens).item() == pytest.approx(
        stats["avg_confidence"]
    )


def test_given_teacher_confidence_skips_the_pass_and_changes_nothing(monkeypatch):
    """The trainer's confidence (computed for W) replaces the linear path's own pass."""
    import kdkit.losses.linear_front as linear_front
    import kdkit.losses.linear_student as linear_student
    from kdkit.losses.student_terms import teacher_confidence

    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting="pmax")
    hidden, head, teacher, labels, mask = _problem()
    ref, ref_stats = lm_distillation_loss(
        hidden, head, teacher, labels, config, attention_mask=mask
    )
    (ref_grad,) = torch.autograd.grad(ref, hidden)

    def no_pass(prep):
        raise AssertionError("a second confidence pass")

    monkeypatch.setattr(linear_front, "teacher_confidence_pass", no_pass)
    monkeypatch.setattr(linear_student, "teacher_confidence_pass", no_pass)
    loss, stats = lm_distillation_loss(
        hidden,
        head,
        teacher,
        labels,
        config,
        attention_mask=mask,
        teacher_confidence=teacher_confidence(teacher),
    )
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    assert stats.kd_weight_sum.item() == pytest.approx(ref_stats.kd_weight_sum.item())
    with pytest.raises(ValueError, match="teacher_confidence must have shape"):
        lm_distillation_loss(
            hidden,
            head,
            teacher,
            labels,
            config,
            teacher_confidence=teacher_confidence(teacher)[:, 1:],
        )
