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


# -- #26.10: feature files and manifest lines are named; numpy's pickle advice never shows --


def _one(tmp_path, name: str, lines: int = 2):
    """A manifest whose line ``lines`` names ``name`` (earlier lines: a good file)."""
    import json

    import numpy as np

    np.save(tmp_path / "ok.npy", np.ones(3, dtype=np.float32))
    rows = [{"path": "ok.npy", "label": 0}] * (lines - 1) + [{"path": name, "label": 1}]
    rows = [dict(r, path=r["path"] if i == lines - 1 else f"ok{i}.npy") for i, r in enumerate(rows)]
    for i in range(lines - 1):
        np.save(tmp_path / f"ok{i}.npy", np.ones(3, dtype=np.float32))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from kdkit.data import ManifestDataset

    return ManifestDataset(tmp_path / "m.jsonl")


def _write_bad(tmp_path, kind: str) -> str:
    import numpy as np

    if kind == "object":
        np.save(tmp_path / "bad.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "object-npz":
        np.savez(tmp_path / "bad.npz", x=np.array([{"a": 1}], dtype=object))
        return "bad.npz"
    elif kind == "truncated":
        np.save(tmp_path / "bad.npy", np.ones(50, dtype=np.float32))
        blob = (tmp_path / "bad.npy").read_bytes()
        (tmp_path / "bad.npy").write_bytes(blob[:-17])
    elif kind == "not-npy":
        (tmp_path / "bad.npy").write_bytes(b"hello, this is text")
    elif kind == "strings":
        np.save(tmp_path / "bad.npy", np.array(["a", "b"]))
    elif kind == "two-arrays":
        np.savez(tmp_path / "bad.npz", x=np.ones(3), y=np.ones(3))
        return "bad.npz"
    return "bad.npy"


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("object", r"holds Python objects \(pickled data\), which kdkit never loads"),
        ("object-npz", r"holds Python objects \(pickled data\), which kdkit never loads"),
        ("truncated", r"is truncated \(fewer bytes than its header declares\)"),
        ("not-npy", r"is not an \.npy file \(no NUMPY header\)"),
        ("strings", "holds <U1 values, not numbers"),
        ("two-arrays", r"is an \.npz holding 2 arrays \['x', 'y'\], not one"),
    ],
)
def test_bad_feature_files_name_the_manifest_line_and_file(tmp_path, kind, reason):
    name = _write_bad(tmp_path, kind)
    data = _one(tmp_path, name, lines=3)
    data[0]  # a good file first
    with pytest.raises(
        ValueError, match=rf"^\S*m\.jsonl:3: feature file '\S*{name}' {reason}"
    ) as e:
        data[2]
    text = str(e.value)
    assert "allow_pickle" not in text and "pickle.load" not in text and "\n" not in text


def test_a_missing_feature_file_names_the_line(tmp_path):
    data = _one(tmp_path, "nope.npy", lines=2)
    with pytest.raises(
        FileNotFoundError, match=r"m\.jsonl:2: feature file '\S*nope\.npy' does not"
    ):
        data[1]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_non_utf8_manifest_line_is_named(tmp_path, suffix):
    path = tmp_path / f"m.{suffix}"
    if suffix == "csv":
        path.write_bytes(b"path,label\na.npy,0\nb.npy,1\n\xff.npy,1\n")
        line = 4
    else:
        path.write_bytes(b'{"path": "a.npy", "label": 0}\n{"path": "\xfe.npy", "label": 1}\n')
        line = 2
    with pytest.raises(ValueError, match=rf"m\.{suffix}:{line}: not UTF-8 text \(byte 0x"):
        read_manifest(path)


def test_json_lines_keep_unicode_line_separators_and_crlf(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        '{"path": "a\u2028b.npy", "label": 0}\r\n{"path": "c.npy", "label": 1}\r\n'.encode()
    )
    assert [r.path for r in read_manifest(path)] == ["a\u2028b.npy", "c.npy"]


def test_paths_outside_the_manifest_directory_stay_allowed(tmp_path):
    """Decision (docs/decisions.md): a manifest is the user's own list of files; ``../``
    and absolute paths are read like any other (no pickle is ever loaded)."""
    import json

    import numpy as np

    from kdkit.data import ManifestDataset

    (tmp_path / "data").mkdir()
    np.save(tmp_path / "up.npy", np.full(2, 3.0, dtype=np.float32))
    rows = [{"path": "../up.npy", "label": 0}, {"path": str(tmp_path / "up.npy"), "label": 1}]
    (tmp_path / "data" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ManifestDataset(tmp_path / "data" / "m.jsonl")
    assert data[0]["features"].tolist() == [3.0, 3.0] and data[0]["path"] == "../up.npy"
    assert data[1]["features"].tolist() == [3.0, 3.0]


def test_duplicate_paths_name_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.npy,0\nb.npy,1\na.npy,1\n")
    with pytest.raises(ValueError, match=r"m\.csv:4: duplicate path 'a\.npy'"):
        read_manifest(path)
