"""On-disk format of the teacher-logit cache: names, key rules, hashing, atomic writes.

Described for users in ``docs/cache-format.md``.  Nothing here ever unpickles: data files
are raw little-endian arrays, keys are UTF-8 text, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "kdkit-teacher-logits"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_DIR = ".partial"
JOURNAL = "journal.json"
DTYPES: dict[str, str] = {"float16": "<f2", "float32": "<f4"}
FLOAT16_MAX = 65504.0
CHECKSUM = "blake2b"
KEY_HASH = "blake2b-128"
KEY_NORMALIZATION = {
    "version": 1,
    "rule": "key = str(key) (os.fspath for path objects); every '\\' becomes '/'; "
    "then posixpath.normpath; keys must not contain '\\n' or '\\r'",
}
_TEACHER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_READ_BLOCK = 1 << 22


class CacheError(ValueError):
    """A teacher-logit cache on disk is missing, truncated, altered or inconsistent."""


def normalize_key(key: object) -> str:
    """The normalised form of a sample key, used both when dumping and when looking up.

    ``str(key)`` (``os.fspath`` for path objects, ``int`` for 0-d integer tensors), every
    backslash replaced by ``/``, then ``posixpath.normpath`` (``a//b/./c`` -> ``a/b/c``).
    The rule is recorded in the cache manifest.

    Example:
        >>> normalize_key("data\\\\clips//a/./b.wav")
        'data/clips/a/b.wav'
        >>> normalize_key(7)
        '7'
    """
    if isinstance(key, str):
        if (
            key
            and "\\" not in key
            and "//" not in key
            and "/." not in key
            and key[0] != "."
            and key[-1] != "/"
        ):
            return key  # already normal: normpath would return it unchanged
        text = key
    elif isinstance(key, os.PathLike):
        text = os.fspath(key)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
    elif hasattr(key, "item") and getattr(key, "ndim", None) == 0:
        text = str(key.item())  # type: ignore[union-attr]
    else:
        text = str(key)
    return posixpath.normpath(text.replace("\\", "/"))


def check_teacher_name(name: object) -> str:
    """Raise unless ``name`` is usable as a teacher name (it becomes part of a file name)."""
    if not isinstance(name, str) or not _TEACHER_NAME.match(name):
        raise ValueError(
            "teacher names must be 1-128 characters from [A-Za-z0-9_.-] not starting with "
            f"'.' or '-', got {name!r}"
        )
    return name


def hash_keys(keys: Sequence[str]) -> np.ndarray:
    """BLAKE2b-128 of each normalised key as ``uint64 [N, 2]`` (high word first for sorting)."""
    if not keys:
        return np.zeros((0, 2), dtype=np.uint64)
    blob = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64).reshape(-1, 2)


def shown(items: Sequence[object], limit: int = 5) -> str:
    """The first few items of a list for an error message."""
    head = ", ".join(repr(x) for x in items[:limit])
    return head + (", ..." if len(items) > limit else "")


def file_checksum(path: Path) -> str:
    """Streamed BLAKE2b (64-byte digest) of a file, hex."""
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` via a temporary file, fsync, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_durably(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as UTF-8 JSON, then fsync the directory."""
    write_bytes_durably(path, [json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")])
    fsync_dir(path.parent)


def write_keys_text(path: Path, keys: Sequence[str]) -> None:
    """Write keys one per line (UTF-8) durably."""
    write_bytes_durably(path, ["".join(k + "\n" for k in keys).encode("utf-8")])


def read_keys_text(path: Path, expected: int) -> list[str]:
    """Read a keys file written by :func:`write_keys_text`; raise :class:`CacheError` if wrong."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CacheError(f"cannot read keys file {path.name!r} in {path.parent}: {e}") from e
    keys = text.split("\n")
    if keys[-1] != "" or len(keys) - 1 != expected:
        raise CacheError(
            f"keys file {path.name!r} in {path.parent} holds {len(keys) - 1} lines, "
            f"the manifest expects {expected}"
        )
    return keys[:-1]


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json``; raise :class:`CacheError` if unusable."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{cache_dir} is not a kdkit teacher-logit cache: {MANIFEST} is missing "
            "(a dump that never finished leaves no manifest; run dump_teacher_logits again to resume)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{MANIFEST} in {cache_dir} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{MANIFEST} in {cache_dir} is not a {FORMAT_NAME!r} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{cache_dir} uses cache format version {version!r}; this kdkit reads version "
            f"{FORMAT_VERSION}"
        )
    for field in ("num_samples", "teachers", "files", "keys"):
        if field not in manifest:
            raise CacheError(f"{MANIFEST} in {cache_dir} lacks the field {field!r}")
    for name in manifest["files"]:
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise CacheError(f"{MANIFEST} in {cache_dir} names an invalid data file {name!r}")
    named = [manifest["keys"].get("file"), manifest["keys"].get("index")]
    named += [t.get("file") for t in manifest["teachers"].values()]
    unlisted = [n for n in named if n not in manifest["files"]]
    if unlisted:
        raise CacheError(
            f"{MANIFEST} in {cache_dir} uses files without a checksum entry: {unlisted!r}"
        )
    for name, info in manifest["teachers"].items():
        check_teacher_name(name)
        if info.get("dtype") not in DTYPES:
            raise CacheError(
                f"teacher {name!r} in {cache_dir} has unknown dtype {info.get('dtype')!r}"
            )
    return manifest


def expected_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """The byte size every data file must have, derived from shapes in the manifest."""
    n = int(manifest["num_samples"])
    sizes = {manifest["keys"]["index"]: 3 * 8 * n}
    for info in manifest["teachers"].values():
        itemsize = np.dtype(DTYPES[info["dtype"]]).itemsize
        sizes[info["file"]] = n * int(info["num_classes"]) * itemsize
    return sizes


def check_files(cache_dir: Path, manifest: dict[str, Any], *, checksums: bool) -> None:
    """Raise :class:`CacheError` naming the first missing, truncated or altered file."""
    sizes = expected_sizes(manifest)
    for name, info in sorted(manifest["files"].items()):
        path = cache_dir / name
        if not path.is_file():
            raise CacheError(f"cache file {name!r} is missing from {cache_dir}")
        size = path.stat().st_size
        want = sizes.get(name, info["bytes"])
        if size != info["bytes"] or size != want:
            raise CacheError(
                f"cache file {name!r} in {cache_dir} has {size} bytes, expected {want} "
                "(truncated or altered)"
            )
        if checksums and file_checksum(path) != info[CHECKSUM]:
            raise CacheError(
                f"cache file {name!r} in {cache_dir} does not match its {CHECKSUM} checksum "
                "(altered or corrupted)"
            )
