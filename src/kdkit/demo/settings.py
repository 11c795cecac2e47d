"""The checks both demos' settings (:class:`~kdkit.demo.run.DemoConfig`,
:class:`~kdkit.demo.lm.LMDemoConfig`) run in ``__post_init__``."""

from __future__ import annotations

from typing import Any


def check_counts(config: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` at the first of the ``names`` fields that is no integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_output_dir(output_dir: Any) -> None:
    """Raise ``ValueError`` unless ``output_dir`` is a non-empty string."""
    if not isinstance(output_dir, str) or not output_dir:
        raise ValueError(f"output_dir must be a non-empty path, got {output_dir!r}")
