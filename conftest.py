"""Repository-level pytest configuration (doctest collection of src/kdkit)."""

import importlib.util
import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, and other packages (e.g.
# transformers, imported by tests/hf) may import triton first: without CUDA, decide it
# here, before any test module is imported, so the Triton tests run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Needs the optional triton package, and must be imported only after TRITON_INTERPRET is
# decided (tests/losses/test_triton_kernel.py); it has no doctests.
collect_ignore = ["src/kdkit/losses/kernels/triton_kernel.py"]

# ``--doctest-modules`` imports every module under ``src/kdkit``; ``kdkit.hf`` needs
# ``transformers`` (``pip install 'kdkit[hf]'``), so without it the package is not
# collected (its tests under ``tests/hf/`` skip through ``pytest.importorskip``).
collect_ignore_glob = [] if importlib.util.find_spec("transformers") else ["src/kdkit/hf/*"]
