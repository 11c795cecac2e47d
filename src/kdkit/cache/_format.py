"""On-disk format of the teacher-logit cache: names, key rules, hashing, durable writes.

Described for users in ``docs/cache-format.md``.  Nothing here ever unpickles: data files
are raw little-endian arrays, keys are UTF-8 text, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdkit._io import READ_BLOCK, atomic_write, blake2b_hex, file_blocks, fsync_dir
from kdkit._validation import FUSION_STRATEGIES, check_fusion_weights

FORMAT_NAME = "kdkit-teacher-logits"
FORMAT_VERSION = 2
"""Written when a cache holds sequences or sparse teachers; plain dense ``[N, C]`` caches
are still written as version 1 (byte-identical to older kdkit), and both are read."""
DENSE_FORMAT_VERSION = 1
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
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest is a few hundred bytes per teacher; larger files are refused unread."""
FENCE = 16
"""Entries of the sorted key index per fence post (see :func:`lookup_hashes`)."""
BLOCK_ROWS = 1 << 16
"""Rows copied (or fused) at a time when a dump merges into new files."""
MAX_ROWS = 2**40
MAX_CLASSES = 2**31
MAX_TOP_K = 2**16
INDEX_DTYPES: dict[str, str] = {"uint16": "<u2", "int32": "<i4"}
TAIL_DTYPE = "<f4"


def index_dtype_for(num_classes: int) -> str:
    """The index dtype of a sparse teacher with ``num_classes`` classes (the smallest fitting)."""
    return "uint16" if num_classes <= 1 << 16 else "int32"


def sparse_record_dtype(top_k: int, index_dtype: str, dtype: str) -> np.dtype:
    """One stored position of a sparse teacher: ``indices [K]``, ``logprobs [K]``, ``tail``."""
    return np.dtype(
        [
            ("indices", INDEX_DTYPES[index_dtype], (top_k,)),
            ("logprobs", DTYPES[dtype], (top_k,)),
            ("tail", TAIL_DTYPE),
        ]
    )


def is_sparse(info: dict[str, Any]) -> bool:
    """Whether a manifest teacher entry is a sparse top-k teacher."""
    return info.get("kind", "dense") == "sparse"


def position_dtype(info: dict[str, Any]) -> np.dtype:
    """The numpy dtype of one stored position of a teacher (from its manifest entry):
    ``(dtype, (C,))`` for a dense teacher (so a file maps as ``[P, C]``), the record of
    :func:`sparse_record_dtype` for a sparse one (a file maps as ``[P]``)."""
    if is_sparse(info):
        return sparse_record_dtype(int(info["top_k"]), info["index_dtype"], info["dtype"])
    return np.dtype((DTYPES[info["dtype"]], (int(info["num_classes"]),)))


def position_bytes(info: dict[str, Any]) -> int:
    """Bytes of one stored position of a teacher (plain integer arithmetic: a manifest may
    claim sizes no numpy dtype can hold)."""
    value = np.dtype(DTYPES[info["dtype"]]).itemsize
    if is_sparse(info):
        index = np.dtype(INDEX_DTYPES[info["index_dtype"]]).itemsize
        return int(info["top_k"]) * (index + value) + np.dtype(TAIL_DTYPE).itemsize
    return int(info["num_classes"]) * value


def num_positions(manifest: dict[str, Any]) -> int:
    """Stored positions ``P``: ``num_samples`` without a position axis, else the total."""
    positions = manifest.get("positions")
    return int(manifest["num_samples"]) if positions is None else int(positions["num_positions"])


class CacheError(ValueError):
    """A teacher-logit cache on disk is missing, truncated, altered or inconsistent."""


class MissingFileError(CacheError):
    """A file named by the manifest does not exist (deleted, or replaced by a later dump)."""


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
        text = str(key.item())
    else:
        text = str(key)
    return posixpath.normpath(text.replace("\\", "/"))


def normalize_keys(keys: Iterable[object]) -> list[str]:
    """:func:`normalize_key` of each of ``keys`` (the already-normal ``str`` keys of a batch
    are passed through without a function call; the test is the same as in
    :func:`normalize_key`)."""
    return [
        k
        if type(k) is str
        and k
        and "\\" not in k
        and "//" not in k
        and "/." not in k
        and k[0] != "."
        and k[-1] != "/"
        else normalize_key(k)
        for k in keys
    ]


def is_file_name(name: object) -> bool:
    """Whether ``name`` is a plain file name kdkit may use inside a cache (no path)."""
    return isinstance(name, str) and _FILE_NAME.fullmatch(name) is not None


def check_teacher_name(name: object) -> str:
    """Raise unless ``name`` is usable as a teacher name (it becomes part of a file name)."""
    if not isinstance(name, str) or not _TEACHER_NAME.fullmatch(name):
        raise ValueError(
            "teacher names must be 1-128 characters from [A-Za-z0-9_.-] not starting with "
            f"'.' or '-', got {name!r}"
        )
    return name


def hash_keys(keys: Sequence[str]) -> np.ndarray:
    """BLAKE2b-128 of each normalised key as ``uint64 [N, 2]`` (high word first for sorting)."""
    if not keys:
        return np.zeros((0, 2), dtype=np.uint64)
    blake2b = hashlib.blake2b
    blob = b"".join([blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys])
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64).reshape(-1, 2)


def shown(items: Sequence[object], limit: int = 5) -> str:
    """The first few items of a list for an error message."""
    head = ", ".join(repr(x) for x in items[:limit])
    return head + (", ..." if len(items) > limit else "")


def file_checksum(path: Path) -> str:
    """Streamed BLAKE2b (64-byte digest) of a file, hex."""
    return blake2b_hex(file_blocks(path))


def file_entry(root: Path, name: str) -> dict[str, Any]:
    """The manifest's ``files`` entry of ``root / name``: its size and checksum."""
    path = root / name
    return {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}


def lookup_hashes(index: np.ndarray, hashes: np.ndarray, fence: np.ndarray) -> np.ndarray:
    """Look up key hashes ``uint64 [B, 2]`` in a sorted hash index; the values found.

    ``index`` is ``uint64 [3, N]``: high words (sorted), low words (sorted within equal
    high words), and the value of each entry (a row number); ``fence`` is ``index[0][::FENCE]``.
    Returns ``int64 [B]``: the value of each hash, ``-1`` where absent.
    """
    n = index.shape[1]
    out = np.full(len(hashes), -1, dtype=np.int64)
    if n == 0 or len(hashes) == 0:
        return out
    high = index[0]
    # The fence narrows each search to one window of FENCE sorted entries, read at once:
    # far fewer cache/TLB misses than a binary search over the whole memory map.
    query = hashes[:, 0]
    start = np.maximum(np.searchsorted(fence, query, side="left") - 1, 0) * FENCE
    window = np.minimum(start[:, None] + np.arange(FENCE), n - 1)
    below = (high[window] < query[:, None]).sum(axis=1)
    pos = np.minimum(start + below, n - 1)  # leftmost entry >= query (if any)
    hit = (high[pos] == hashes[:, 0]) & (index[1][pos] == hashes[:, 1])
    out[hit] = index[2][pos[hit]].astype(np.int64)
    # Rare: another key shares the high word; compare the low word among all of them.
    shared = ~hit & (high[pos] == hashes[:, 0])
    for i in np.nonzero(shared)[0]:
        stop = int(np.searchsorted(high, hashes[i, 0], side="right"))
        lows = np.asarray(index[1][pos[i] : stop])
        match = np.nonzero(lows == hashes[i, 1])[0]
        if match.size:
            out[i] = int(index[2][pos[i] + match[0]])
    return out


def sorted_hash_index(hashes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``uint64 [3, N]`` index of :func:`lookup_hashes` for ``hashes`` and their ``values``."""
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))
    return np.stack([hashes[order, 0], hashes[order, 1], values[order]]).astype("<u8")


def _write_chunks(chunks: Iterable[bytes]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    return write


def write_bytes_durably(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically (:func:`kdkit._io.atomic_write`).

    An ``OSError`` (a full disk) keeps its errno and says that committed files are intact.
    """
    try:
        atomic_write(path, _write_chunks(chunks))
    except OSError as e:
        raise OSError(
            e.errno,
            f"{e.strerror or e}: could not write {path} (files already committed are intact; "
            "free the space and run the dump again to resume)",
        ) from e


def write_json_durably(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as UTF-8 JSON, then fsync the directory."""
    write_bytes_durably(path, [json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")])
    fsync_dir(path.parent)


def write_keys_text(path: Path, keys: Sequence[str]) -> None:
    """Write keys one per line (UTF-8) durably."""
    write_bytes_durably(path, ["".join(k + "\n" for k in keys).encode("utf-8")])


def read_keys_text(path: Path, expected: int, data: bytes | None = None) -> list[str]:
    """Read a keys file written by :func:`write_keys_text` (or decode its bytes ``data``);
    raise :class:`CacheError` if wrong."""
    try:
        text = (path.read_bytes() if data is None else data).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CacheError(f"cannot read keys file {path.name!r} in {path.parent}: {e}") from e
    keys = text.split("\n")
    if keys[-1] != "" or len(keys) - 1 != expected:
        raise CacheError(
            f"keys file {path.name!r} in {path.parent} holds {len(keys) - 1} lines, "
            f"the manifest expects {expected}"
        )
    return keys[:-1]


def _read_capped(path: Path, limit: int) -> bytes:
    """The bytes of ``path``; :class:`CacheError` if it holds more than ``limit`` bytes."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        del data  # not kept alive by the traceback
        raise CacheError(
            f"{path.name} in {path.parent} is larger than {limit} bytes: not a kdkit manifest "
            "(refusing to read it)"
        )
    return data


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """Load and validate ``manifest.json``; raise :class:`CacheError` if unusable.

    At most :data:`MAX_MANIFEST_BYTES` are read.  Every field the readers use is checked
    here (types, ranges, file names inside the cache), so later code can trust it.
    """
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{cache_dir} is not a kdkit teacher-logit cache: {MANIFEST} is missing "
            "(a dump that never finished leaves no manifest; run dump_teacher_logits again to resume)"
        )
    check_inside(cache_dir, MANIFEST)
    try:
        data = _read_capped(path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise CacheError(f"cannot read {MANIFEST} in {cache_dir}: {e}") from e
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CacheError(f"{MANIFEST} in {cache_dir} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{MANIFEST} in {cache_dir} is not a {FORMAT_NAME!r} manifest")
    version = manifest.get("format_version")
    if not _is_int(version, DENSE_FORMAT_VERSION, FORMAT_VERSION):
        raise CacheError(
            f"{cache_dir} uses cache format version {version!r}; this kdkit reads versions "
            f"{DENSE_FORMAT_VERSION} to {FORMAT_VERSION}"
        )
    _check_manifest_fields(manifest, f"{MANIFEST} in {cache_dir}")
    return manifest


def _check_manifest_fields(m: dict[str, Any], where: str) -> None:
    def bad(field: str, value: object, want: str) -> CacheError:
        shown_value = repr(value)
        if len(shown_value) > 80:
            shown_value = shown_value[:77] + "..."
        return CacheError(f"{where}: {field} must be {want}, got {shown_value}")

    for field in ("num_samples", "teachers", "files", "keys"):
        if field not in m:
            raise CacheError(f"{where} lacks the field {field!r}")
    if not _is_int(m["num_samples"], 0, MAX_ROWS):
        raise bad("num_samples", m["num_samples"], f"an integer in [0, {MAX_ROWS}]")
    if "generation" in m and not _is_int(m["generation"], 0, 2**62):
        raise bad("generation", m["generation"], "a non-negative integer")
    files = m["files"]
    if not isinstance(files, dict):
        raise bad("files", files, "an object {file name: {bytes, blake2b}}")
    for name, info in files.items():
        if not is_file_name(name):
            raise CacheError(f"{where} names an invalid data file {name!r}")
        if not isinstance(info, dict) or not _is_int(info.get("bytes"), 0, 2**62):
            raise bad(f"files[{name!r}]", info, "an object with 'bytes' (an integer >= 0)")
        digest = info.get(CHECKSUM)
        if not isinstance(digest, str) or not _HEX128.match(digest):
            raise bad(f"files[{name!r}][{CHECKSUM!r}]", digest, "128 hex digits")
    keys = m["keys"]
    if not isinstance(keys, dict):
        raise bad("keys", keys, "an object {file, index, hash}")
    named = [keys.get("file"), keys.get("index")]
    positions = m.get("positions")
    if positions is not None:
        if m.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{where}: positions need format_version {FORMAT_VERSION}")
        if not isinstance(positions, dict) or not _is_int(
            positions.get("num_positions"), 0, MAX_ROWS
        ):
            raise bad("positions", positions, "null or {file, num_positions (an integer >= 0)}")
        named.append(positions.get("file"))
    teachers = m["teachers"]
    if not isinstance(teachers, dict):
        raise bad("teachers", teachers, "an object {name: {...}}")
    for name, info in teachers.items():
        if not _TEACHER_NAME.fullmatch(name):
            raise CacheError(f"{where} names an invalid teacher {name!r}")
        if not isinstance(info, dict):
            raise bad(f"teachers[{name!r}]", info, "an object")
        if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            raise CacheError(f"{where}: teacher {name!r} has unknown dtype {info.get('dtype')!r}")
        if not _is_int(info.get("num_classes"), 1, MAX_CLASSES):
            raise bad(
                f"teachers[{name!r}]['num_classes']",
                info.get("num_classes"),
                f"an integer in [1, {MAX_CLASSES}]",
            )
        if info.get("kind", "dense") not in ("dense", "sparse"):
            raise bad(f"teachers[{name!r}]['kind']", info.get("kind"), "'dense' or 'sparse'")
        if is_sparse(info):
            _check_sparse_entry(name, info, m, bad)
        fused = info.get("fused")
        if fused is not None and (
            is_sparse(info) or not _is_fusion_spec(fused, teachers, allow_name=False)
        ):
            raise bad(
                f"teachers[{name!r}]['fused']", fused, "null or {teachers, strategy, weights}"
            )
        named.append(info.get("file"))
    default = m.get("default_fusion")
    if default is not None and not _is_fusion_spec(default, teachers, allow_name=True):
        raise bad(
            "default_fusion", default, "null, {'teacher': name} or {strategy, teachers, weights}"
        )
    unlisted = [n for n in named if not isinstance(n, str) or n not in files]
    if unlisted:
        raise CacheError(f"{where} uses files without a checksum entry: {unlisted!r}")
    if len(set(named)) != len(named):
        raise CacheError(f"{where} uses one file for two purposes: {named!r}")


def _check_sparse_entry(name: str, info: dict[str, Any], m: dict[str, Any], bad: Any) -> None:
    """The fields of a sparse teacher's manifest entry (``top_k``, ``index_dtype``, ...)."""
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"sparse teacher {name!r} needs format_version {FORMAT_VERSION}")
    c = info["num_classes"]
    if not _is_int(info.get("top_k"), 1, min(c, MAX_TOP_K)):
        raise bad(
            f"teachers[{name!r}]['top_k']",
            info.get("top_k"),
            f"an integer in [1, {min(c, MAX_TOP_K)}]",
        )
    if info.get("index_dtype") != index_dtype_for(c):
        raise bad(
            f"teachers[{name!r}]['index_dtype']", info.get("index_dtype"), repr(index_dtype_for(c))
        )
    t = info.get("capture_temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise bad(f"teachers[{name!r}]['capture_temperature']", t, "a finite number > 0")


def _is_fusion_spec(spec: object, teachers: dict[str, Any], *, allow_name: bool) -> bool:
    if not isinstance(spec, dict):
        return False
    if allow_name and "teacher" in spec:
        return isinstance(spec["teacher"], str) and spec["teacher"] in teachers
    members, weights, strategy = spec.get("teachers"), spec.get("weights"), spec.get("strategy")
    if not (
        strategy in FUSION_STRATEGIES
        and isinstance(members, list)
        and members
        and all(isinstance(t, str) and t in teachers for t in members)
        and not any(isinstance(teachers[t], dict) and is_sparse(teachers[t]) for t in members)
    ):
        return False
    if strategy != "weighted_mean":
        return weights is None
    try:
        check_fusion_weights(weights, len(members))
    except (TypeError, ValueError, OverflowError):  # float(10**400) overflows
        return False
    return True


def check_inside(cache_dir: Path, name: str) -> Path:
    """``cache_dir / name``; :class:`CacheError` if it is a link leading out of the cache."""
    path = cache_dir / name
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(cache_dir.resolve()):
            raise CacheError(
                f"cache file {name!r} in {cache_dir} is a symbolic link to {str(target)!r}, "
                "outside the cache: refused"
            )
    return path


def expected_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """The byte size every data file must have, derived from shapes in the manifest."""
    n = int(manifest["num_samples"])
    sizes = {manifest["keys"]["index"]: 3 * 8 * n}
    p = num_positions(manifest)
    if manifest.get("positions") is not None:
        sizes[manifest["positions"]["file"]] = 8 * (n + 1)
    for info in manifest["teachers"].values():
        sizes[info["file"]] = p * position_bytes(info)
    return sizes


def map_file(cache_dir: Path, name: str, want: int) -> np.ndarray:
    """Read-only ``uint8`` memory map of the cache file ``name`` of ``want`` bytes.

    Raises :class:`CacheError` (a :class:`MissingFileError` if absent) naming the file if
    it is missing, not a regular file (a FIFO would block), a link out of the cache, or of
    another size.  The map keeps the file's contents readable even if a later dump deletes
    the file (POSIX).
    """
    path = check_inside(cache_dir, name)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(f"cache file {name!r} in {cache_dir} is not a regular file")
        if st.st_size != want:
            raise CacheError(
                f"cache file {name!r} in {cache_dir} has {st.st_size} bytes, expected {want} "
                "(truncated or altered)"
            )
        if want == 0:
            return np.zeros(0, dtype=np.uint8)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError as e:
        raise MissingFileError(f"cache file {name!r} is missing from {cache_dir}") from e
    except OSError as e:
        raise CacheError(f"cannot open cache file {name!r} in {cache_dir}: {e}") from e
    if raw.shape[0] != want:  # replaced between stat and open
        raise CacheError(
            f"cache file {name!r} in {cache_dir} has {raw.shape[0]} bytes, expected {want} "
            "(truncated or altered)"
        )
    return raw


def file_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """The byte size of every file of the manifest; :class:`CacheError` if it contradicts
    the shapes (``num_samples``, ``num_classes``, dtypes)."""
    derived = expected_sizes(manifest)
    sizes = {}
    for name, info in sorted(manifest["files"].items()):
        want = derived.get(name, info["bytes"])
        if info["bytes"] != want:
            raise CacheError(
                f"{MANIFEST} records {info['bytes']} bytes for {name!r} but its shape "
                f"(num_samples={manifest['num_samples']}) implies {want}"
            )
        sizes[name] = want
    return sizes


def checksum_of(raw: np.ndarray) -> str:
    """Streamed BLAKE2b (64-byte digest, hex) of a mapped file."""
    return blake2b_hex(
        raw[start : start + READ_BLOCK].data for start in range(0, raw.shape[0], READ_BLOCK)
    )
