"""``kdkit cache info|verify PATH``: the cache's piece of the command line.

The ``kdkit`` entry point (:mod:`kdkit.cli.main`) calls :func:`add_subcommands`; every subcommand
sets ``func(args) -> int`` (the exit status) with ``parser.set_defaults``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdkit.cache import CacheError, load_cache_index, position_bytes, verify_cache

__all__ = ["add_subcommands", "cache_info", "cache_verify"]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def cache_info(args: argparse.Namespace) -> int:
    """Print the manifest summary of the cache at ``args.path``; 0, or 1 if unreadable."""
    try:
        index = load_cache_index(args.path)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m: dict[str, Any] = index.manifest
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"cache:       {index.path}")
    print(f"format:      {m['format']} v{m['format_version']} (kdkit {m.get('kdkit_version')})")
    print(f"samples:     {index.num_samples}")
    if index.is_sequence:
        print(f"positions:   {index.num_positions} (sequences, flat with per-sample offsets)")
    print(f"size:        {_size(total)} in {len(m['files'])} files")
    rule = m.get("key_normalization")
    print(f"keys:        {rule.get('rule') if isinstance(rule, dict) else rule}")
    print("teachers:")
    for name, t in sorted(m["teachers"].items()):
        fused = ""
        if t.get("fused"):
            fused = f"  fused {t['fused']['strategy']} of {', '.join(t['fused']['teachers'])}"
        nbytes = m["files"][t["file"]]["bytes"]
        per = position_bytes(t)
        if t.get("kind") == "sparse":
            kind = (
                f"sparse top_k={t['top_k']} of {t['num_classes']} classes, {t['index_dtype']} "
                f"indices, {t['dtype']} log-probs, T_capture={t['capture_temperature']:g}"
            )
        else:
            kind = f"{t['num_classes']} classes, {t['dtype']}, dense"
        print(f"  {name}: {kind}, {_size(nbytes)} ({per} bytes/position){fused}")
    default = m.get("default_fusion")
    if default:
        print(f"default:     {default}")
    return 0


def cache_verify(args: argparse.Namespace) -> int:
    """Check every checksum of the cache at ``args.path``; 0 if intact, 1 with the reason."""
    try:
        index = verify_cache(args.path)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"OK: {index.num_samples} samples, teachers {', '.join(index.teachers)}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cache info PATH`` and ``cache verify PATH`` on ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser(prog="kdkit")
        >>> add_subcommands(parser.add_subparsers(dest="command", required=True))
        >>> args = parser.parse_args(["cache", "verify", "/some/cache"])
        >>> args.func is cache_verify, args.path
        (True, '/some/cache')
    """
    cache = subparsers.add_parser("cache", help="inspect and verify a teacher-logit cache")
    commands = cache.add_subparsers(dest="cache_command", required=True)
    info = commands.add_parser("info", help="print the manifest summary of a cache")
    info.add_argument("path", help="cache directory")
    info.set_defaults(func=cache_info)
    verify = commands.add_parser("verify", help="check every file's size and checksum")
    verify.add_argument("path", help="cache directory")
    verify.set_defaults(func=cache_verify)
