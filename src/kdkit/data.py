"""Datasets of dict samples: a manifest (JSONL or CSV) of feature files, or arrays in memory.

Every kdkit training function takes any :class:`torch.utils.data.Dataset` whose items are
dicts with these fields (the collated batch has the same keys):

* ``features``: a float tensor (any shape; one sample, without the batch dimension);
* ``label``: an ``int`` class index;
* ``domain``: an ``int`` domain id (e.g. 0 = source device, 1, 2, ... = target devices);
* ``path``: a ``str`` key identifying the sample (the teacher-logit cache is keyed by it).

A *manifest* lists one sample per line with ``path``, ``label``, ``domain`` and ``split``
(``domain`` defaults to 0 and ``split`` to ``"train"``).  Features are read from ``path``
(``.npy`` with ``np.load(allow_pickle=False)``, or ``.npz`` holding a single array); a
relative path is resolved against the manifest's directory, while the item's ``path``
field keeps the string as written in the manifest, so cache keys do not depend on where
the data set is mounted.

JSONL::

    {"path": "feats/0001.npy", "label": 3, "domain": 0, "split": "train"}

CSV (header required)::

    path,label,domain,split
    feats/0001.npy,3,0,train
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "ArrayDataset",
    "ManifestDataset",
    "ManifestRecord",
    "jsonl_objects",
    "manifest_lines",
    "read_manifest",
    "write_manifest",
]

_REQUIRED = ("path", "label")


@dataclass(frozen=True)
class ManifestRecord:
    """One manifest line: the sample's key/path, label, domain and split."""

    path: str
    label: int
    domain: int = 0
    split: str = "train"


def _as_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {field} must be an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{where}: {field} must be an integer, got {value!r}")
    if not -(2**31) <= number < 2**31:
        raise ValueError(f"{where}: {field} must be an integer below 2**31, got {value!r}")
    return int(number)


def _record(row: dict[str, Any], where: str) -> ManifestRecord:
    missing = [f for f in _REQUIRED if row.get(f) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; each sample needs path and label")
    domain = row.get("domain")
    split = row.get("split")
    return ManifestRecord(
        path=str(row["path"]),
        label=_as_int(row["label"], "label", where),
        domain=0 if domain in (None, "") else _as_int(domain, "domain", where),
        split="train" if split in (None, "") else str(split),
    )


def read_manifest(path: str | Path) -> list[ManifestRecord]:
    """Read a JSONL (``.jsonl``/``.json``/``.ndjson``) or CSV (``.csv``) manifest.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: an unknown extension, a line that is not UTF-8 or malformed (named by
            line number), a missing ``path``/``label``, a non-integer label or domain,
            duplicate paths.
    """
    return [record for _, record in manifest_lines(path)]


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """The JSON objects of a JSONL file as ``(line number, "path:line", object)``.

    Blank lines are skipped; a UTF-8 BOM is accepted.  The one reader of kdkit's JSONL
    files (manifests, LM data, prompts), so every one names the file and line alike.

    Raises:
        ValueError: a line that is not UTF-8, not valid JSON or not a JSON object (named
            ``path:line``).
    """
    path = Path(path)
    for number, line in enumerate(_manifest_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        yield number, where, row


def _manifest_text(path: Path) -> str:
    """The manifest's text (a UTF-8 BOM is accepted); a non-UTF-8 byte names its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8"
        ) from None


def manifest_lines(path: str | Path) -> list[tuple[int, ManifestRecord]]:
    """:func:`read_manifest` with each record's line number (for error messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    records: list[tuple[int, ManifestRecord]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for number, where, row in jsonl_objects(path):
            records.append((number, _record(row, where)))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_manifest_text(path), newline=""))
        if reader.fieldnames is None or not set(_REQUIRED) <= set(reader.fieldnames):
            raise ValueError(
                f"{path}: the CSV header must name at least {list(_REQUIRED)}, "
                f"got {reader.fieldnames}"
            )
        for row in reader:
            number = reader.line_num
            records.append((number, _record(row, f"{path}:{number}")))
    else:
        raise ValueError(f"manifest {str(path)!r} must end in .jsonl, .json, .ndjson or .csv")
    seen: set[str] = set()
    for number, record in records:
        if record.path in seen:
            raise ValueError(f"{path}:{number}: duplicate path {record.path!r}")
        seen.add(record.path)
    return records


def write_manifest(path: str | Path, records: Iterable[ManifestRecord]) -> Path:
    """Write ``records`` as JSONL (or CSV when ``path`` ends in ``.csv``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"path": r.path, "label": r.label, "domain": r.domain, "split": r.split} for r in records
    ]
    if path.suffix.lower() == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "domain", "split"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _has_npy_magic(file: Path) -> bool:
    with file.open("rb") as f:
        return f.read(6) == b"\x93NUMPY"


def _load_features(file: Path) -> np.ndarray:
    """The numeric array of a ``.npy`` (or one-array ``.npz``) file; ``ValueError`` naming
    the file for anything else (pickled objects are never loaded, and numpy's advice to
    load them is not passed on)."""
    try:
        if file.suffix.lower() == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                names = list(archive.keys())
                array = archive[names[0]] if len(names) == 1 else None
        else:
            array = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"feature file {str(file)!r} does not exist") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        text = str(exc)
        if file.suffix.lower() == ".npy" and not _has_npy_magic(file):
            reason = "is not an .npy file (no NUMPY header)"
        elif "pickle" in text or "Object arrays" in text:
            reason = "holds Python objects (pickled data), which kdkit never loads"
        elif "could only read" in text or "not fully written" in text or isinstance(exc, EOFError):
            reason = "is truncated (fewer bytes than its header declares)"
        else:
            reason = f"is not a readable .npy/.npz array ({' '.join(text.split()[:12])})"
        raise ValueError(
            f"feature file {str(file)!r} {reason}; save numeric arrays with np.save"
        ) from None
    if array is None:
        raise ValueError(
            f"feature file {str(file)!r} is an .npz holding {len(names)} arrays {names}, not one"
        )
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"feature file {str(file)!r} holds {kind} values, not numbers")
    return array


def _check_split(split: object) -> None:
    """``split``: ``None``, a split name or a sequence of names (``TypeError`` naming
    ``split`` otherwise: an integer is not a split name)."""
    names = [split] if isinstance(split, str) or split is None else split
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(
        isinstance(n, str) for n in names if split is not None
    ):
        raise TypeError(
            f"split must be None, a split name or a list of names (strings), got {split!r}"
        )


class ManifestDataset(Dataset):
    """Samples listed in a manifest, features loaded lazily from ``.npy``/``.npz`` files.

    Args:
        manifest: Path of the JSONL or CSV manifest.
        split: Keep only samples of this split (``None``: all); a sequence keeps several.
        domains: Keep only samples of these domains (``None``: all).

    Items are dicts ``{"features": float32 tensor, "label": int, "domain": int,
    "path": str}``.

    Raises:
        ValueError: no sample matches ``split``/``domains`` (the message lists the splits
            present), or see :func:`read_manifest`.  Reading an item whose features
            differ in shape from the first item read (both files and shapes named).

    Example:
        >>> import tempfile, numpy as np
        >>> root = Path(tempfile.mkdtemp())
        >>> np.save(root / "a.npy", np.ones(3, dtype=np.float32))
        >>> _ = write_manifest(root / "m.jsonl", [ManifestRecord("a.npy", 1, 0, "train")])
        >>> item = ManifestDataset(root / "m.jsonl", split="train")[0]
        >>> item["features"], item["label"], item["path"]
        (tensor([1., 1., 1.]), 1, 'a.npy')
    """

    def __init__(
        self,
        manifest: str | Path,
        split: str | Sequence[str] | None = None,
        domains: Iterable[int] | None = None,
    ) -> None:
        _check_split(split)
        self.manifest = Path(manifest)
        self.root = self.manifest.resolve().parent
        self._first: tuple[Path, tuple[int, ...]] | None = None
        lines = manifest_lines(self.manifest)
        records = [record for _, record in lines]
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        keep_domains = None if domains is None else set(domains)
        kept = [
            (n, r)
            for n, r in lines
            if (splits is None or r.split in splits)
            and (keep_domains is None or r.domain in keep_domains)
        ]
        self.records = [r for _, r in kept]
        self._lines = {r.path: n for n, r in kept}  # the manifest line of a path, for errors
        if not self.records:
            present = sorted({r.split for r in records})
            raise ValueError(
                f"{self.manifest}: no sample with split {split!r} and domains {domains!r} "
                f"(splits present: {present})"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        file = Path(record.path)
        if not file.is_absolute():
            file = self.root / file
        line = self._lines.get(record.path)
        where = f"{self.manifest}:{line}" if line is not None else str(self.manifest)
        try:
            array = _load_features(file)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        features = torch.from_numpy(np.asarray(array, dtype=np.float32))
        if self._first is None:  # the shape every other sample must have
            self._first = (file, tuple(features.shape))
        elif tuple(features.shape) != self._first[1]:
            raise ValueError(
                f"{where}: {file}: features of shape {tuple(features.shape)}, but "
                f"{self._first[0]} has {self._first[1]}; every sample of a data set needs "
                "the same shape"
            )
        return _sample_item(features, record.label, record.domain, record.path)


def _sample_item(features: torch.Tensor, label: int, domain: int, path: str) -> dict[str, Any]:
    """The item of every kdkit dataset: ``{"features", "label", "domain", "path"}``."""
    return {"features": features, "label": label, "domain": domain, "path": path}


class ArrayDataset(Dataset):
    """Samples held in memory: ``features[i]``, ``labels[i]``, ``domains[i]``, ``paths[i]``.

    Args:
        features: ``[N, ...]`` array or tensor (stored as float32).
        labels: ``[N]`` integer class indices.
        domains: ``[N]`` integer domain ids (default: all 0).
        paths: ``N`` unique keys (default: ``"sample-{i}"``).

    Example:
        >>> ds = ArrayDataset(np.zeros((2, 4)), [0, 1], domains=[0, 1])
        >>> ds[1]["domain"], ds[1]["path"], tuple(ds[1]["features"].shape)
        (1, 'sample-1', (4,))
    """

    def __init__(
        self,
        features: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        domains: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        paths: Sequence[str] | None = None,
    ) -> None:
        self.features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        n = self.features.shape[0]
        self.labels = [int(x) for x in np.asarray(labels).reshape(-1)]
        self.domains = [0] * n if domains is None else [int(x) for x in np.asarray(domains)]
        self.paths = [f"sample-{i}" for i in range(n)] if paths is None else list(paths)
        lengths = {len(self.labels), len(self.domains), len(self.paths)}
        if lengths != {n}:
            raise ValueError(
                f"features has {n} samples but labels/domains/paths have lengths "
                f"{len(self.labels)}/{len(self.domains)}/{len(self.paths)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _sample_item(
            self.features[index], self.labels[index], self.domains[index], self.paths[index]
        )
