"""Subprocess helpers for the interruption tests of ``test_hf_hostile*.py``."""

from __future__ import annotations

import contextlib
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


def torchrun_process(target: list[str], **env_extra: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 TARGET`` (gloo, CPU) as a process group."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        **env_extra,
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.Popen(
        [*command, "--nproc_per_node=2", *target],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def rank_pid(agent: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the children of the torchrun ``agent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rpartition(")")[2].split()[1])
            if parent != agent:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (``/proc/PID/stat`` field 22), its identity against reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as ended, a stopped process as alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill_workers(workers: dict[int, str | None]) -> None:
    """SIGKILL the workers (their own sessions, so by pid) still running as themselves."""
    for pid, started in workers.items():
        if started is not None and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_rank_when(
    process: subprocess.Popen,
    rank: int,
    ready: Callable[[], bool],
    sig: int,
    timeout: float = 240.0,
) -> tuple[bool, float, int, str]:
    """Send ``sig`` to the worker of ``rank`` once ``ready()``; wait for the whole job.

    Returns ``(sent, seconds from the signal until the other rank had exited, the job's
    returncode, stderr)``.  A stopped worker is SIGKILLed once the other has exited
    (torchrun's agent would wait 30 s); everything is SIGKILLed past ``timeout``.
    """
    deadline = time.monotonic() + timeout
    sent, survived, at = False, float("inf"), 0.0
    workers: dict[int, str | None] = {}
    survivor = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            pid = rank_pid(process.pid, rank) if ready() else None
            if pid is not None:
                survivor = rank_pid(process.pid, 1 - rank)
                workers = {p: _start_time(p) for p in (pid, survivor) if p is not None}
                os.kill(pid, sig)
                sent, at = True, time.monotonic()
                break
            time.sleep(0.005)
        while sent and time.monotonic() < deadline:
            if survivor is None or not _alive(survivor):
                survived = time.monotonic() - at
                break
            time.sleep(0.05)
        if sent and sig == signal.SIGSTOP:
            time.sleep(1.0)
            _kill_workers(workers)
        try:
            _, err = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            _kill_workers(workers)
            os.killpg(process.pid, signal.SIGKILL)
            _, err = process.communicate()
    finally:
        _kill_workers(workers)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return sent, survived, process.returncode, err
