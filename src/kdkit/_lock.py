"""Exclusive directory locks: one kdkit writer per output or cache directory.

:func:`directory_lock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``DIR/.kdkit.lock``
and writes the holder's pid into it.  A second writer gets :class:`DirectoryLockedError`
naming that pid at once (it never waits).  ``flock`` is released by the kernel when the
holder dies, so a lock file left behind by a crash or SIGKILL never blocks the next run.
The file is removed on release; an acquirer re-checks that the file it locked is still
the one at the path (another process may have removed it in between) and retries if not.
Readers take no lock.

No kdkit imports: every layer may use this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "DirectoryLockedError", "directory_lock"]

LOCK_NAME = ".kdkit.lock"
"""The lock file in a locked directory (holds the pid of the holder)."""


class DirectoryLockedError(RuntimeError):
    """Another process holds the lock of the directory (the message names its pid)."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if needed) inside the block.

    Raises:
        DirectoryLockedError: another process holds it (``what`` says what it guards,
            e.g. ``"training run"``; the message names the holder's pid).
        NotADirectoryError: ``directory`` exists and is not a directory.
    """
    import fcntl

    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryLockedError(
                f"{root} is in use by another kdkit {what} ({_holder(path)}); wait for it "
                "to finish or use another directory"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
