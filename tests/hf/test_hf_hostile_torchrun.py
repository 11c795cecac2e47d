"""Reliability III (#22) item 5: ``dump-teacher --data`` and ``distill-lm`` under torchrun
(2 CPU ranks, gloo) when one rank is killed (or stopped) mid-way.

The surviving rank exits with an error within a bounded time -- at once when the rank
dies (its sockets close and torchrun's agent stops the job), within ``KDKIT_DIST_TIMEOUT``
seconds when it hangs -- and the re-run finishes with the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from kdkit.cli import main

pytest.importorskip("transformers")

from hf_testing import lm_samples, tiny_llama
from hostile_testing import kill_rank_when, torchrun_process

BOUND = 30.0
"""Seconds from the kill until the other rank has exited that the tests allow (5 s of
KDKIT_DIST_TIMEOUT for a hung rank, plus start-up and slack for a loaded machine)."""


def _ids(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "train.jsonl"
    records = [{"input_ids": s["input_ids"]} for s in lm_samples(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "teacher"
    tiny_llama(2, seed=1).save_pretrained(path)
    return path


def _chunks(cache: Path) -> int:
    try:
        return len(json.loads((cache / ".partial" / "journal.json").read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def _files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dump_with_a_rank_killed_or_hung_fails_in_bounded_time_and_resumes(
    tmp_path, teacher_dir, one_torch_thread, how
):
    data = _ids(tmp_path, 160)
    argv = ["dump-teacher", "--data", str(data), "--teacher", f"t={teacher_dir}"]
    argv += ["--top_k", "5", "--batch_size", "1", "--checkpoint_rows", "8", "--no-progress"]
    cache = tmp_path / "cut"
    process = torchrun_process(
        ["-m", "kdkit", *argv, "--cache", str(cache)], KDKIT_DIST_TIMEOUT="5"
    )
    sent, seconds, status, err = kill_rank_when(
        process, 1, lambda: _chunks(cache) >= 1, getattr(signal, how)
    )
    assert sent, f"the dump ended before its first chunk: {err[-3000:]}"
    assert status != 0 and seconds < BOUND, (status, seconds, err[-3000:])
    if how == "SIGSTOP":  # the survivor's wait ends at the process-group timeout
        assert "rank 0: the other ranks stopped answering" in err, err[-3000:]
    assert not (cache / "manifest.json").exists()
    # the re-run (one process here) adopts the committed chunks: the uninterrupted cache
    assert main([*argv, "--cache", str(cache)]) == 0
    assert main([*argv, "--cache", str(tmp_path / "whole")]) == 0
    assert _files(cache) == _files(tmp_path / "whole")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_distill_lm_with_a_rank_killed_fails_in_bounded_time_and_resumes(
    tmp_path, teacher_dir, one_torch_thread
):
    data = _ids(tmp_path, 8)
    argv = ["-m", "kdkit", "distill-lm", "--data", str(data), "--teacher_model", str(teacher_dir)]
    argv += ["--student_from_teacher", "2", "--per_device_train_batch_size", "2"]
    argv += ["--max_steps", "6", "--save_steps", "2", "--logging_steps", "50"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = torchrun_process([*argv, "--output_dir", str(whole)])
    _, _, status, err = kill_rank_when(done, 1, lambda: False, signal.SIGKILL)
    assert status == 0, err[-3000:]
    process = torchrun_process([*argv, "--output_dir", str(cut)], KDKIT_DIST_TIMEOUT="5")
    ready = lambda: (cut / "checkpoint-2" / "trainer_state.json").is_file()  # noqa: E731
    sent, seconds, status, err = kill_rank_when(process, 1, ready, signal.SIGKILL)
    assert sent, f"the run ended before its first checkpoint: {err[-3000:]}"
    assert status != 0 and seconds < BOUND, (status, seconds, err[-3000:])
    assert not (cut / "model.safetensors").exists()
    resumed = torchrun_process([*argv, "--output_dir", str(cut), "--resume"])
    _, _, status, err = kill_rank_when(resumed, 1, lambda: False, signal.SIGKILL)
    assert status == 0, err[-3000:]
    want, got = _weights(whole), _weights(cut)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


@pytest.mark.parametrize("value", ["0", "-1", "x", "inf", "nan"])
def test_a_bad_process_group_timeout_is_one_line_naming_the_variable(monkeypatch, value):
    from kdkit.train.torchrun import dist_timeout

    monkeypatch.setenv("KDKIT_DIST_TIMEOUT", value)
    with pytest.raises(
        ValueError, match=f"KDKIT_DIST_TIMEOUT must be a number of seconds > 0, got '{value}'"
    ):
        dist_timeout()


def test_the_process_group_timeout_reaches_both_commands(monkeypatch, tmp_path):
    import datetime

    import transformers

    from kdkit.hf.recipe import LMDistillConfig, _training_arguments
    from kdkit.train.torchrun import dist_timeout

    monkeypatch.delenv("KDKIT_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == datetime.timedelta(minutes=30)
    monkeypatch.setenv("KDKIT_DIST_TIMEOUT", "2.5")
    assert dist_timeout() == datetime.timedelta(seconds=2.5)
    args = _training_arguments(transformers, LMDistillConfig(), tmp_path)
    assert args.ddp_timeout == 3  # whole seconds, rounded up
