"""Exclusive locks on output and cache directories (kdkit._lock; issue 11, item 5)."""

from __future__ import annotations

import os
import signal

import pytest


def test_second_holder_is_refused_naming_the_pid_and_a_crash_frees_the_lock(holder):
    from kdkit._lock import LOCK_NAME, DirectoryLockedError, directory_lock

    directory, proc = holder
    with (
        pytest.raises(DirectoryLockedError, match=rf"in use by another kdkit x \(pid {proc.pid}\)"),
        directory_lock(directory, "x"),
    ):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (directory / LOCK_NAME).exists()  # stale: the kernel released the flock
    with directory_lock(directory, "x") as path:
        assert path.read_text().strip() == str(os.getpid())
    assert not (directory / LOCK_NAME).exists()
