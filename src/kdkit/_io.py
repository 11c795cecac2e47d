"""Low-level file helpers shared by the cache and the checkpoints: atomic writes, fsync,
streamed BLAKE2b.

No kdkit imports: every layer may use this module.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

READ_BLOCK = 1 << 22
"""Bytes read (or hashed) at a time when streaming a file."""


def fsync_file(path: Path) -> None:
    """fsync the data of the file at ``path`` (written through another descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _replace(tmp: Path, final: Path) -> Path:
    """The commit of :func:`atomic_write` (a seam for crash tests)."""
    os.replace(tmp, final)
    return final


def atomic_write(final: Path, write: Callable[[Path], object]) -> Path:
    """``write`` a temporary file ``.<name>.tmp`` next to ``final``, fsync it, rename it
    over ``final``; return ``final``.

    On any failure (an exception, Ctrl-C) the temporary file is removed and the previous
    ``final`` is left as it was; the exception propagates (an ``OSError`` such as ENOSPC
    keeps its errno).  The directory is not fsync'ed: call :func:`fsync_dir` where the
    rename itself must be durable.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        return _replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def blake2b_hex(blocks: Iterable[bytes | memoryview]) -> str:
    """BLAKE2b (64-byte digest, hex) of the concatenation of ``blocks``."""
    h = hashlib.blake2b()
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def file_blocks(path: Path, size: int = READ_BLOCK) -> Iterable[bytes]:
    """The bytes of the file at ``path``, ``size`` at a time."""
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block
