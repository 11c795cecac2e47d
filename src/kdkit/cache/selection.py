"""Which teachers a read returns: validating ``teacher`` / ``fusion`` / ``weights``."""

from __future__ import annotations

from collections.abc import Sequence

from kdkit.cache.index import CacheIndex
from kdkit.fusion import FUSION_STRATEGIES

__all__ = ["resolve_selection"]


def resolve_selection(
    index: CacheIndex,
    teacher: str | Sequence[str] | None,
    fusion: str | None,
    weights: Sequence[float] | None,
) -> tuple[list[str], str | None, Sequence[float] | None]:
    """Validate ``teacher``/``fusion``/``weights`` against ``index``: (teachers, strategy, weights)."""
    available = index.teachers
    if fusion is None and weights is not None:
        raise ValueError(f"weights={weights!r} need fusion='weighted_mean' (got fusion=None)")
    if teacher is None:
        if fusion is not None:
            names = [n for n in available if not index.manifest["teachers"][n].get("fused")]
            return _check_names(index, names), fusion, weights
        if len(available) == 1:
            return [available[0]], None, None
        default = index.default_fusion
        if default is None:
            raise ValueError(
                f"the cache in {index.path} holds several teachers {list(available)!r} and "
                "records no default fusion; pass teacher='<name>' for one of them, or "
                "teacher=[...] with fusion='mean' (or 'weighted_mean', 'prob_mean', "
                "'max_confidence')"
            )
        if "teacher" in default:
            return [default["teacher"]], None, None
        return list(default["teachers"]), default["strategy"], default.get("weights")
    if isinstance(teacher, str):
        if fusion is not None or weights is not None:
            raise ValueError(
                f"fusion/weights combine several teachers; got a single teacher={teacher!r} "
                f"with fusion={fusion!r}, weights={weights!r}"
            )
        return _check_names(index, [teacher]), None, None
    if not isinstance(teacher, Sequence) or not teacher:
        raise TypeError(
            f"teacher must be None, a teacher name or a non-empty list of names, got {teacher!r}"
        )
    names = _check_names(index, list(teacher))
    if fusion is None:
        if len(names) == 1:
            return names, None, None
        raise ValueError(
            f"teacher={names!r} names several teachers; pass fusion= one of {list(FUSION_STRATEGIES)!r}"
        )
    return names, fusion, weights


def _check_names(index: CacheIndex, names: list[str]) -> list[str]:
    for name in names:
        if not isinstance(name, str) or name not in index.manifest["teachers"]:
            raise KeyError(
                f"teacher {name!r} is not in the cache at {index.path}; it holds {list(index.teachers)!r}"
            )
    return names
