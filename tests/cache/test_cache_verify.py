"""Tests of verify_cache and the ``kdkit cache info|verify`` command."""

import argparse

import pytest
from cache_testing import (
    _dumped,
)

from kdkit.cache import (
    CacheError,
    load_cache_index,
    verify_cache,
)
from kdkit.cli.cache import add_subcommands


def test_verify_detects_altered_and_truncated_files(tmp_path):
    index, fname = _dumped(tmp_path)
    verify_cache(tmp_path)
    index.verify()
    path = tmp_path / fname
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{fname!r}.*does not match its blake2b checksum"):
        verify_cache(tmp_path)
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(CacheError, match=rf"{fname!r}.*has 236 bytes, expected 240"):
        load_cache_index(tmp_path)
    keys_file = tmp_path / index.manifest["keys"]["file"]
    keys_file.unlink()
    with pytest.raises(CacheError, match=rf"{keys_file.name!r} is missing"):
        verify_cache(tmp_path)
    assert issubclass(CacheError, ValueError)


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="kdkit")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_info_and_verify(tmp_path, capsys):
    _, fname = _dumped(tmp_path)
    assert _run_cli(["cache", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "samples:     12" in out and "a: 5 classes, float32" in out
    assert _run_cli(["cache", "verify", str(tmp_path)]) == 0
    assert "OK: 12 samples" in capsys.readouterr().out
    with open(tmp_path / fname, "r+b") as f:
        f.write(b"\x01\x02")
    assert _run_cli(["cache", "verify", str(tmp_path)]) == 1
    assert fname in capsys.readouterr().err
    assert _run_cli(["cache", "info", str(tmp_path / "missing")]) == 1
