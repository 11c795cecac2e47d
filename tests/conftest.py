"""Shared test configuration."""

import os
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


def _native_or_skip() -> None:
    from kdkit.losses.kernels import native

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.info().get('reason')}")


@pytest.fixture(params=["native", "torch"])
def kernel_backend(request, monkeypatch):
    """Run a test once per CPU row-pass backend (``KDKIT_KERNEL``); yields its name.

    The native case is skipped (not failed) where no C compiler is installed; the torch
    case is the fallback such a machine takes.  Triton: tests/losses/test_kernels.py.
    """
    if request.param == "native":
        _native_or_skip()
    monkeypatch.setenv("KDKIT_KERNEL", request.param)
    return request.param
