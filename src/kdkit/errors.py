"""kdkit's own exception types (each one a standard exception, so plain ``except`` works)."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input that can only be seen once a run starts: a probe forward or the first step.

    Raised for a live teacher whose outputs do not fit the student, a ``feature_kd`` module
    name that does not exist or a feature shape no projection can map, an augmentation that
    changes the batch size or returns non-finite values.  It is usage, not a failure of the
    run: the command line exits with status 2 for it (status 1 for other run errors).
    """
