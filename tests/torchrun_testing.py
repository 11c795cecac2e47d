"""``torchrun`` for the tests: 2 CPU processes (gloo), killed as a group on a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_torchrun(target: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 TARGET`` (``TARGET``: ``["-m", "kdkit",
    ...]`` or ``[script, ...]``) with ``src`` on the path, one intra-op thread and no
    inherited rank variables; the whole process group (agent and workers) is killed when
    it runs past ``timeout`` seconds (then an AssertionError with the end of stderr)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", *target]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: agent + workers
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{err[-3000:]}") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)
