"""Hostile and careless use of sparse top-k caches (#26 items 4, 5; #22 item 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """A manifest, a trained 3-class teacher run and a sparse (top-2) cache of it."""
    root = tmp_path_factory.mktemp("sparse-train")
    records = []
    for i in range(12):
        np.save(root / f"{i}.npy", np.random.RandomState(i).randn(5).astype(np.float32))
        records.append(ManifestRecord(f"{i}.npy", i % 3, 0, "test" if i % 4 == 0 else "train"))
    manifest = write_manifest(root / "m.jsonl", records)
    base = ["--manifest", str(manifest), "--epochs", "1", "--batch_size", "4", "--no-progress"]
    assert main(["train-teacher", *base, "--output_dir", str(root / "t")]) == 0
    dump = ["dump-teacher", "--manifest", str(manifest), "--teacher", f"t={root / 't'}"]
    assert main([*dump, "--cache", str(root / "c"), "--top_k", "2", "--no-progress"]) == 0
    return root, base


@pytest.mark.filterwarnings("ignore:augment")
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--augment", "mixup"], r"--augment mixup mixes dense logits"),
        (["--augment", "noise,mixup:0.4"], r"--augment mixup mixes dense logits"),
        (["--teacher_model", "LIVE"], r"sparse teachers cannot be fused, with a live teacher"),
        (["--temperature", "4"], r"captured at temperature 1\.0: train with --temperature 1\.0"),
    ],
)
def test_sparse_cache_refused_before_training(sparse_run, tmp_path, capsys, extra, message):
    """#26.4: mixup and a live teacher crashed at the first step with numpy's casting
    message (exit 1); another KD temperature failed there too (exit 1)."""
    import re

    root, base = sparse_run
    extra = [f"u={root / 't'}" if e == "LIVE" else e for e in extra]  # the teacher, live
    if "--temperature" not in extra:
        extra += ["--temperature", "1"]
    out = tmp_path / "s"
    argv = ["train-student", *base, "--output_dir", str(out), "--cache", str(root / "c")]
    assert main([*argv, *extra]) == 2
    line = _one_line(capsys)
    assert re.search(rf"teacher 't' is sparse \(top-k\).*{message}", line), line
    assert not (out / "checkpoints").exists()  # refused before any training


def test_sparse_cache_refused_by_the_api(sparse_run, tmp_path):
    from kdkit.train import TrainConfig, train_student

    root, _ = sparse_run
    config = TrainConfig(
        manifest=str(root / "m.jsonl"),
        cache=str(root / "c"),
        output_dir=str(tmp_path / "s"),
        epochs=1,
        augment="mixup",
        kd={"temperature": 1.0},
        progress=False,
    )
    with pytest.raises(ValueError, match=r"is sparse \(top-k\): --augment mixup"):
        train_student(config)


@pytest.mark.filterwarnings("ignore:augment")
def test_sparse_cache_trains_with_noise_at_its_capture_temperature(sparse_run, tmp_path, capsys):
    root, base = sparse_run
    argv = ["train-student", *base, "--output_dir", str(tmp_path / "s"), "--cache", str(root / "c")]
    assert main([*argv, "--augment", "noise", "--temperature", "1"]) == 0


# -- #26.5: a dump in which every position is masked ---------------------------------------

L, V = 7, 40


class _TokenLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(V, V)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(V, V, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def _items(n: int, start: int = 0, real: bool = False) -> list[dict]:
    mask = torch.ones(L, dtype=torch.long) if real else torch.zeros(L, dtype=torch.long)
    return [
        {"input_ids": torch.arange(L) * (i + 1) % V, "attention_mask": mask, "path": f"d/{i}"}
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("top_k", [None, 5])
def test_every_position_masked_gives_a_valid_empty_cache(tmp_path, capsys, top_k):
    """#26.5: the committed cache could not be opened (a 1-byte file for 0 positions)."""
    from kdkit.cache import dump_teacher_logits, load_cache_index, load_cached_logits, verify_cache

    d = tmp_path / "c"
    kw = {"input_key": "input_ids", "progress": False, "batch_size": 4, "top_k": top_k}
    with pytest.warns(UserWarning, match=r"every position of the 3 cached samples .* is masked"):
        dump_teacher_logits({"t": _TokenLM()}, _items(3), d, **kw)
    index = load_cache_index(d)
    assert index.num_samples == 3 and index.num_positions == 0
    verify_cache(d)
    assert index.lengths(["d/0", "d/2"]).tolist() == [0, 0]
    got = load_cached_logits(["d/0", "d/1"], d, teacher="t")
    assert tuple(got.shape) == (2, 0, V)
    assert main(["cache", "verify", str(d)]) == 0
    dump_teacher_logits({"t": _TokenLM()}, _items(2, start=3, real=True), d, **kw)  # a later dump
    verify_cache(d)
    index = load_cache_index(d)
    assert index.num_samples == 5 and index.num_positions == 2 * L
    full = load_cached_logits(["d/3", "d/0"], d, teacher="t")
    assert tuple(full.shape) == (2, L, V)
    if top_k is None:
        want = torch.log_softmax(_TokenLM()(torch.arange(L) * 4 % V), -1)
        torch.testing.assert_close(torch.log_softmax(full[0], -1), want)
        assert (full[1] == 0).all()  # the empty sample is all padding
    else:
        assert full.mask.sum(-1).tolist() == [L, 0]


# -- #22.1: the rest of the attack on sparse caches -------------------------------------------


@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce", "reverse_kl", "jsd"])
def test_k_equal_v_is_the_dense_path(loss_type):
    """K = V keeps every class: value and gradient equal the dense path to float64 rounding."""
    from kdkit import kd_loss
    from kdkit.losses.linear import linear_kd_loss
    from kdkit.sparse import sparse_topk

    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    sparse = sparse_topk(t, 11)
    tails = ["bucket"] + (["renormalize"] if loss_type in ("kldiv", "soft_ce") else [])
    for tail in tails:
        s1 = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
        s2 = s1.detach().clone().requires_grad_(True)
        a = kd_loss(s1, sparse, 2.0, loss_type=loss_type, sparse_tail=tail, retemper=True)
        b = kd_loss(s2, t, 2.0, loss_type=loss_type)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-12)
    h = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(11, 4, generator=g, dtype=torch.float64)
    a = linear_kd_loss(h, w, sparse_topk(t, 11, temperature=1.0), 1.0, loss_type=loss_type)
    b = linear_kd_loss(h, w, t, 1.0, loss_type=loss_type)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [0, -2, 6])
def test_hand_built_k_outside_one_to_v(k):
    from kdkit.sparse import SparseLogits

    n = max(k, 0)
    with pytest.raises(
        ValueError, match=rf"^SparseLogits top_k={n} must be in \[1, vocab_size=5\]"
    ):
        SparseLogits(torch.zeros(2, n, dtype=torch.long), torch.zeros(2, n), torch.zeros(2), 5)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_teacher_outputs_at_a_sparse_dump(tmp_path, value):
    from kdkit.cache import dump_teacher_logits

    class Bad(_TokenLM):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x).clone()
            y[0, 1, 2] = value
            return y

    with pytest.raises(
        ValueError, match=r"'t' produced NaN or Inf logits for 1 sample\(s\): 'd/0'"
    ):
        dump_teacher_logits(
            {"t": Bad()},
            _items(2, real=True),
            tmp_path / "c",
            input_key="input_ids",
            progress=False,
            top_k=3,
        )
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_ragged_lengths_in_one_batch_are_one_line(tmp_path):
    """Items of different lengths without padding: torch's stack message named nothing."""
    from kdkit.cache import dump_teacher_logits

    items = [{"input_ids": torch.arange(n) % V, "path": f"r/{i}"} for i, n in enumerate([5, 7, 3])]
    with pytest.raises(
        ValueError,
        match=r"^items of one batch differ in the shape of 'input_ids': \(5,\) for 'r/0' and "
        r"\(7,\) for 'r/1'; pad sequences",
    ):
        dump_teacher_logits(
            {"t": _TokenLM()},
            items,
            tmp_path / "c",
            input_key="input_ids",
            progress=False,
            top_k=3,
        )
    one = dump_teacher_logits(  # one per batch is fine: lengths come from the items
        {"t": _TokenLM()},
        items,
        tmp_path / "c",
        input_key="input_ids",
        progress=False,
        top_k=3,
        batch_size=1,
    )
    assert one.lengths(["r/0", "r/1", "r/2"]).tolist() == [5, 7, 3]


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_a_manifest_pointing_outside_the_cache_is_refused(tmp_path, name):
    import json

    from kdkit.cache import CacheError, dump_teacher_logits, load_cache_index

    d = tmp_path / "c"
    dump_teacher_logits(
        {"t": _TokenLM()},
        _items(2, real=True),
        d,
        input_key="input_ids",
        progress=False,
        top_k=3,
    )
    manifest = json.loads((d / "manifest.json").read_text())
    old = manifest["teachers"]["t"]["file"]
    (tmp_path / "outside.bin").write_bytes((d / old).read_bytes())
    manifest["teachers"]["t"]["file"] = name
    manifest["files"][name] = manifest["files"].pop(old)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"invalid|outside"):
        load_cache_index(d)


def test_a_sparse_and_a_dense_cached_teacher_are_not_fused(sparse_run, tmp_path, capsys):
    """Fusion asked of a sparse teacher: exit 2 before training (was exit 1)."""
    root, base = sparse_run
    run = root / "t"
    dump = ["dump-teacher", "--manifest", str(root / "m.jsonl"), "--no-progress"]
    both = tmp_path / "both"
    argv = [*dump, "--teacher", f"t={run}", "--teacher", f"u={run}", "--top_k", "t=2"]
    assert main([*argv, "--cache", str(both)]) == 0
    capsys.readouterr()
    out = tmp_path / "s"
    argv = ["train-student", *base, "--output_dir", str(out), "--cache", str(both)]
    assert main([*argv, "--teacher", "t,u", "--temperature", "1"]) == 2
    line = _one_line(capsys)
    assert "teacher 't' is sparse (top-k): sparse teachers cannot be fused (--teacher t,u)" in line
    assert main([*argv, "--teacher", "u", "--temperature", "1"]) == 0  # the dense one alone


def test_float16_at_a_hot_capture_temperature_warns(tmp_path):
    """At T_c = 1000 float16 log-probabilities lose the teacher (KD loss off by ~20 %)."""
    import warnings

    from kdkit.cache import dump_teacher_logits

    kw = {"input_key": "input_ids", "progress": False, "top_k": 3}
    with pytest.warns(UserWarning, match=r"\['t'\] captured at a temperature above 100 with"):
        dump_teacher_logits(
            {"t": _TokenLM()},
            _items(2, real=True),
            tmp_path / "a",
            dtype="float16",
            capture_temperature=1000.0,
            **kw,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dump_teacher_logits(
            {"t": _TokenLM()},
            _items(2, real=True),
            tmp_path / "b",
            dtype="float32",
            capture_temperature=1000.0,
            **kw,
        )
        dump_teacher_logits(
            {"t": _TokenLM()},
            _items(2, real=True),
            tmp_path / "c",
            dtype="float16",
            capture_temperature=4.0,
            **kw,
        )
