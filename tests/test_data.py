"""Manifest datasets and array datasets (kdkit.data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdkit.data import ArrayDataset, ManifestDataset, ManifestRecord, read_manifest, write_manifest


@pytest.fixture
def feature_dir(tmp_path):
    (tmp_path / "f").mkdir()
    for i in range(4):
        np.save(tmp_path / "f" / f"{i}.npy", np.full((2, 3), i, dtype=np.float64))
    return tmp_path


def test_jsonl_and_csv_give_the_same_records(feature_dir):
    records = [
        ManifestRecord(f"f/{i}.npy", i % 2, i % 3, "train" if i < 3 else "test") for i in range(4)
    ]
    a = read_manifest(write_manifest(feature_dir / "m.jsonl", records))
    b = read_manifest(write_manifest(feature_dir / "m.csv", records))
    assert a == b == records


def test_defaults_and_relative_paths(feature_dir, tmp_path_factory):
    manifest = feature_dir / "sub" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"path": "../f/2.npy", "label": "1"}) + "\n\n")
    (record,) = read_manifest(manifest)
    assert record == ManifestRecord("../f/2.npy", 1, 0, "train")
    item = ManifestDataset(manifest)[0]
    assert item["path"] == "../f/2.npy"  # the key stays as written
    assert item["features"].dtype == torch.float32
    assert torch.equal(item["features"], torch.full((2, 3), 2.0))
    # Running from another working directory does not matter.
    other = tmp_path_factory.mktemp("elsewhere")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(other)
        assert ManifestDataset(manifest)[0]["label"] == 1


def test_split_and_domain_filters(feature_dir):
    records = [
        ManifestRecord(f"f/{i}.npy", 0, i % 2, "test" if i == 3 else "train") for i in range(4)
    ]
    path = write_manifest(feature_dir / "m.jsonl", records)
    assert len(ManifestDataset(path, split="train")) == 3
    assert len(ManifestDataset(path, split=["train", "test"], domains=[1])) == 2
    with pytest.raises(ValueError, match=r"splits present: \['test', 'train'\]"):
        ManifestDataset(path, split="val")


def test_npz_features(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.arange(3))
    write_manifest(tmp_path / "m.jsonl", [ManifestRecord("a.npz", 0)])
    assert ManifestDataset(tmp_path / "m.jsonl")[0]["features"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"path": "a.npy"}\n', r"m.jsonl:1: missing field\(s\) \['label'\]"),
        ('{"path": "a.npy", "label": 0}\nnot json\n', r"m.jsonl:2: not valid JSON"),
        ('{"path": "a.npy", "label": 1.5}\n', "label must be an integer"),
        ('{"path": "a.npy", "label": 0}\n{"path": "a.npy", "label": 1}\n', "duplicate path"),
        ("[1, 2]\n", "must be a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path / "m.jsonl")


def test_bad_csv_header_and_extension(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.npy,0\n")
    with pytest.raises(ValueError, match="header must name"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match="must end in"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "missing.jsonl")


def test_array_dataset_checks_lengths():
    with pytest.raises(ValueError, match="lengths"):
        ArrayDataset(np.zeros((3, 2)), [0, 1])
    item = ArrayDataset(np.zeros((2, 2)), [0, 1], [0, 2], ["a", "b"])[1]
    assert (item["label"], item["domain"], item["path"]) == (1, 2, "b")
