"""Manifests as users write them (kdkit.data; issue 11, item 8)."""

from __future__ import annotations

import pytest

from kdkit.data import read_manifest


def test_csv_with_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffpath,label,domain,split\na.npy,1,0,train\n".encode())
    (record,) = read_manifest(path)
    assert record.path == "a.npy" and record.label == 1
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes('\ufeff{"path": "a.npy", "label": 2}\n'.encode())
    assert read_manifest(jsonl)[0].label == 2


@pytest.mark.parametrize("label", ["1e20", "-3e12", "2147483648"])
def test_huge_labels_are_refused_with_the_line(tmp_path, label):
    path = tmp_path / "m.csv"
    path.write_text(f"path,label\na.npy,{label}\n")
    with pytest.raises(
        ValueError, match=rf"m.csv:2: label must be an integer below 2\*\*31, got '{label}'"
    ):
        read_manifest(path)
