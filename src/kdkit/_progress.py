"""The optional tqdm progress bar (tqdm is an optional dependency)."""

from __future__ import annotations

from typing import Any


def optional_tqdm(enabled: bool, **kwargs: Any) -> Any | None:
    """``tqdm(**kwargs)`` when ``enabled`` and tqdm is installed, else ``None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(**kwargs)
