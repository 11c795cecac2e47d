"""Subprocess helpers for the interruption tests of ``test_hf_hostile*.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kdkit_process(argv: list[str]) -> subprocess.Popen:
    """``python -m kdkit ARGV`` with this checkout's ``src`` first, one thread."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "kdkit", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def interrupt_when(
    process: subprocess.Popen, ready: Callable[[], bool], sig: int, timeout: float = 120.0
) -> tuple[bool, int, str]:
    """Send ``sig`` to ``process`` as soon as ``ready()``; ``(sent, returncode, stderr)``.

    ``sent`` is False if the process ended before ``ready()`` held (nothing interrupted).
    """
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if ready():
                process.send_signal(sig)
                sent = True
                break
            time.sleep(0.005)
        _, err = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return sent, process.returncode, err
