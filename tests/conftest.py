"""Shared test configuration."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# tests/reference.py is imported by tests and benchmarks as ``reference``.
sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60
)
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=60,
    derandomize=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch intra-op thread, restoring the previous count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HOLDER = """
import sys, time
from kdkit._lock import directory_lock
with directory_lock(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(120)
"""
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of ``tmp_path / 'dir'``; yields (directory, process)."""
    directory = tmp_path / "dir"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield directory, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _native_or_skip() -> None:
    from kdkit.losses.kernels import native

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.info().get('reason')}")


@pytest.fixture(params=["native", "torch"])
def kernel_backend(request, monkeypatch):
    """Run a test once per CPU row-pass backend (``KDKIT_KERNEL``); yields its name.

    The native case is skipped (not failed) where no C compiler is installed; the torch
    case is the fallback such a machine takes.  Triton: tests/test_kernels.py.
    """
    if request.param == "native":
        _native_or_skip()
    monkeypatch.setenv("KDKIT_KERNEL", request.param)
    return request.param
