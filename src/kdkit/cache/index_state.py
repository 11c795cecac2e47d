"""What the base classes of :class:`~kdkit.cache.index.CacheIndex` may use of it.

:class:`IndexState` declares, for the type checker only, the attributes and methods that
:class:`~kdkit.cache.lookup.KeyLookup`, :class:`~kdkit.cache.reads.RecordReads` and
:class:`~kdkit.cache.verify.IndexVerification` use of the index they are mixed into, so
that they need not import :mod:`kdkit.cache.index` (which imports them).  At run time it is
an empty class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

__all__ = ["IndexState"]


class IndexState:
    """The state of an opened cache that its base classes share (declarations only)."""

    path: Path
    manifest: dict[str, Any]
    _maps: dict[str, np.ndarray]
    _index: np.ndarray | None
    _fence: np.ndarray | None
    _memo: dict[str, int]

    if TYPE_CHECKING:

        @property
        def teachers(self) -> tuple[str, ...]: ...

        @property
        def num_samples(self) -> int: ...

        @property
        def num_positions(self) -> int: ...

        @property
        def is_sequence(self) -> bool: ...

        def is_sparse(self, teacher: str) -> bool: ...

        def offsets(self) -> np.ndarray: ...

        def keys(self) -> list[str]: ...

        def _key_index(self) -> np.ndarray: ...

        def _file(self, name: str, *, reopened: bool = True) -> np.ndarray: ...

        def read_sparse(self, teacher: str, positions: np.ndarray) -> np.ndarray: ...
