"""Shared test configuration."""

import os
import sys
from pathlib import Path

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
