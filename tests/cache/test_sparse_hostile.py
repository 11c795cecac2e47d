"""Hostile and careless use of sparse top-k caches (#26 items 4, 5; #22 item 1)."""

from __future__ import annotations

import numpy as np
import pytest

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
    """#26.4: these crashed at the first step with numpy's casting message (exit 1)."""
    import re

    root, base = sparse_run
    extra = [str(root / "t") if e == "LIVE" else e for e in extra]
    extra = [f"u={e}" if e == str(root / "t") else e for e in extra]
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
