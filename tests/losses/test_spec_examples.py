"""The specification's README examples, run as written (only the import path changed)."""

import torch
import torch.nn.functional as F

from kdkit.losses.kd import (
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)


def batch(b=32, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, c, generator=g, requires_grad=True)
    teacher = torch.randn(b, c, generator=g) * 3
    targets = torch.randint(0, c, (b,), generator=g)
    return student, teacher, targets


def test_kd_loss_example():
    student_logits, teacher_logits, _ = batch()
    loss = kd_loss(student_logits, teacher_logits, temperature=4.0, loss_type="kldiv")
    assert loss.shape == ()
    loss.backward()  # "loss is scalar, ready for backward()"


def test_confidence_weights_example(capsys):
    _, teacher_logits, _ = batch()
    weights, stats = compute_confidence_weights(
        teacher_logits, weighting="threshold", threshold=0.7
    )
    print(f"Coverage: {stats['coverage']:.1%}")
    print(f"Avg confidence: {stats['avg_confidence']:.3f}")
    out = capsys.readouterr().out
    assert out.startswith("Coverage: ") and "Avg confidence: 0." in out


def test_schedule_example_prints_spec_output(capsys):
    for epoch in range(20):
        kd_alpha = compute_kd_weight(epoch, warmup_epochs=5, kd_ramp_epochs=10, target_alpha=0.7)
        print(f"Epoch {epoch}: kd_alpha = {kd_alpha:.3f}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Epoch 0: kd_alpha = 0.000"
    assert lines[5] == "Epoch 5: kd_alpha = 0.000"
    assert lines[10] == "Epoch 10: kd_alpha = 0.350"
    assert lines[15] == "Epoch 15: kd_alpha = 0.700"
    assert lines[19] == "Epoch 19: kd_alpha = 0.700"


def test_student_loss_example_and_training_step(capsys):
    student_logits, teacher_logits, targets = batch()
    target_domain_mask = torch.arange(32) % 2 == 1
    config = KDLossConfig(
        temperature=4.0,
        kd_alpha=0.7,
        loss_type="kldiv",
        kd_weighting="pmax",
        confidence_threshold=0.0,
        warmup_epochs=5,
        kd_ramp_epochs=10,
    )
    loss, stats = compute_student_loss(
        student_logits,
        teacher_logits,
        targets,
        config,
        current_epoch=15,
        domain_mask=target_domain_mask,  # Optional
    )
    optimizer = torch.optim.SGD([student_logits], lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(
        f"Epoch 15: Loss={stats['total_loss']:.4f}, "
        f"CE={stats['ce_loss']:.4f}, KD={stats['kd_loss']:.4f}, "
        f"Coverage={stats['coverage']:.1%}"
    )
    assert "Coverage=50.0%" in capsys.readouterr().out


def test_config_examples():
    # Conservative config (high confidence only)
    config = KDLossConfig(
        temperature=3.0,
        kd_alpha=0.5,
        kd_weighting="threshold",
        confidence_threshold=0.8,
        warmup_epochs=10,
        kd_ramp_epochs=20,
    )
    # Aggressive config (all samples, high KD weight)
    config = KDLossConfig(
        temperature=5.0, kd_alpha=0.9, kd_weighting="pmax", warmup_epochs=0, kd_ramp_epochs=0
    )
    assert config.kd_alpha == 0.9
    for kwargs in (
        {"kd_weighting": "none"},
        {"kd_weighting": "pmax"},
        {"kd_weighting": "threshold", "confidence_threshold": 0.7},
        {"warmup_epochs": 0, "kd_ramp_epochs": 0, "kd_alpha": 0.7},
        {"warmup_epochs": 10, "kd_ramp_epochs": 0, "kd_alpha": 0.7},
        {"warmup_epochs": 5, "kd_ramp_epochs": 15, "kd_alpha": 0.7},
    ):
        KDLossConfig(**kwargs)


def test_advanced_examples():
    student_logits, teacher_logits, targets = batch(c=4)

    def custom_distillation_loss(student_logits, teacher_logits, targets):
        """Custom loss combining CE and multiple KD temperatures"""
        ce_loss = F.cross_entropy(student_logits, targets)
        kd_loss_t2 = kd_loss(student_logits, teacher_logits, temperature=2.0)
        kd_loss_t4 = kd_loss(student_logits, teacher_logits, temperature=4.0)
        kd_loss_t8 = kd_loss(student_logits, teacher_logits, temperature=8.0)
        return 0.3 * ce_loss + 0.2 * kd_loss_t2 + 0.3 * kd_loss_t4 + 0.2 * kd_loss_t8

    custom_distillation_loss(student_logits, teacher_logits, targets).backward()

    def get_dynamic_temperature(epoch, max_epochs):
        return 2.0 + 6.0 * (epoch / max_epochs)  # 2.0 → 8.0

    for epoch in range(3):
        kd_loss(student_logits, teacher_logits, temperature=get_dynamic_temperature(epoch, 3))

    # Per-class weighting
    kd_loss_per_sample = kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="none")
    pred_classes = teacher_logits.argmax(dim=1)
    class_weights = torch.tensor([1.0, 2.0, 1.5, 1.0])
    sample_weights = class_weights[pred_classes]
    weighted_loss = (kd_loss_per_sample * sample_weights).mean()
    assert kd_loss_per_sample.shape == (32,) and weighted_loss.shape == ()


def test_troubleshooting_examples():
    student_logits, teacher_logits, _ = batch()
    student_logits = torch.clamp(student_logits, -10, 10)
    teacher_logits = torch.clamp(teacher_logits, -10, 10)
    config = KDLossConfig()
    config.temperature = 5.0
    weights, stats = compute_confidence_weights(teacher_logits, weighting="none")
    print(f"Teacher confidence: {stats['avg_confidence']:.3f}")
    assert 0.1 <= stats["avg_confidence"] <= 1.0  # at least 1/C for C = 10 classes
    config.confidence_threshold = 0.5
    config.kd_weighting = "pmax"
    config.warmup_epochs = 10
    config.kd_ramp_epochs = 20
    config.kd_alpha = 0.5
    config.temperature = 3.0
