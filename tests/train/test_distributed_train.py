"""Distributed distillation (kdkit.losses.distributed, kdkit.train.torchrun): 2 CPU processes with gloo vs 1 process.

Every multi-process test bounds its own time (``_spawn``/``_torchrun`` kill the workers on
a timeout) and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit.cache import dump_teacher_logits
from kdkit.cli import main
from kdkit.data import ManifestRecord, write_manifest
from kdkit.losses.distributed import compute_student_loss_distributed
from kdkit.losses.kd import STUDENT_LOSS_STATS, KDLossConfig, compute_student_loss
from kdkit.sparse import sparse_topk
from kdkit.train.torchrun import init_from_env
from torchrun_testing import run_torchrun

SPAWN_TIMEOUT = 60.0

# --- helpers -------------------------------------------------------------------------


def _spawn(fn, args: tuple, nprocs: int = 2, timeout: float = SPAWN_TIMEOUT) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; kill them all on a timeout."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)


def _init_worker(rank: int, store: str, world_size: int = 2) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


# --- the globally normalised loss ----------------------------------------------------

N, C, D_IN = 10, 5, 4
# Rank 0's share of the global batch of N samples (rank 1 gets the rest), and which
# samples receive KD (domain mask) in each case.
CASES = {
    "even": (5, [True, False] * 5),
    "uneven": (7, [True] * 6 + [False] * 3 + [True]),  # ranks hold 6 and 1 KD samples
    "rank1_none": (4, [True, False, True, True] + [False] * 6),  # rank 1: no KD sample
    "rank0_none": (3, [False] * 3 + [True] * 7),  # rank 0: no KD sample
}
WEIGHTINGS = ("none", "pmax", "threshold")


def _kd_config(weighting: str, **overrides) -> KDLossConfig:
    values = {
        "temperature": 2.0,
        "kd_alpha": 0.7,
        "kd_weighting": weighting,
        "confidence_threshold": 0.3,
    }
    return KDLossConfig(**{**values, **overrides})


def _problem(case: str):
    """The global batch of a case: model, inputs, teacher logits, targets, mask."""
    gen = torch.Generator().manual_seed(1234)
    model = torch.nn.Linear(D_IN, C).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    teacher = 2.0 * torch.randn(N, C, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, C, (N,), generator=gen)
    mask = torch.tensor(CASES[case][1])
    return model, x, teacher, targets, mask


def _run_cases(model_wrap, rank_slice, loss_fn, cases, epoch):
    """{(case, weighting): (loss, stats, grads)} for every case."""
    results = {}
    for case in cases:
        for weighting in WEIGHTINGS:
            model, x, teacher, targets, mask = _problem(case)
            part = rank_slice(case)
            net = model_wrap(model)
            logits = net(x[part])
            loss, stats = loss_fn(
                logits, teacher[part], targets[part], _kd_config(weighting), epoch, mask[part]
            )
            loss.backward()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            results[(case, weighting)] = (loss.detach(), stats, grads)
    return results


SPARSE_CASES = [("bucket", False), ("renormalize", False), ("bucket", True), ("renormalize", True)]
"""(sparse_tail, retemper) of the cached top-k teacher cases; retemper trains at 3, not 2."""


def _run_sparse_cases(part: slice, loss_fn):
    """{(tail, retemper): (loss, stats, student grad)} with a cached top-3 teacher (the
    'uneven' case, one position the cache lacks), over the positions ``part``."""
    _, _, teacher, targets, mask = _problem("uneven")
    student = torch.randn(N, C, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    covered = torch.ones(N, dtype=torch.bool)
    covered[3] = False
    targets[3] = -100
    sparse = sparse_topk(teacher[part], 3, 2.0, mask=covered[part])
    results = {}
    for tail, retemper in SPARSE_CASES:
        config = _kd_config("pmax", temperature=3.0 if retemper else 2.0)
        s = student[part].clone().requires_grad_()
        options = {"sparse_tail": tail, "retemper": retemper}
        loss, stats = loss_fn(s, sparse, targets[part], config, 5.0, mask[part], **options)
        (grad,) = torch.autograd.grad(loss, s)
        results[(tail, retemper)] = (loss.detach(), stats, grad)
    return results


def _dump_problem(n: int = 19):
    torch.manual_seed(7)
    teachers = {"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)}
    data = [{"features": torch.randn(4), "path": f"clips//{i}.wav"} for i in range(n)]
    kwargs = {"batch_size": 4, "checkpoint_rows": 6, "progress": False}
    kwargs["ensembles"] = {"ens": {"teachers": ["a", "b"]}}
    return teachers, data, kwargs


class _RankOneFails(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y[:1] if dist.get_rank() == 1 else y


def _worker(rank: int, store: str, out: str, dump_argv: list[str]) -> None:
    """Everything the 2-process tests need, in one spawn (process start-up dominates)."""
    _init_worker(rank, store)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        def rank_slice(case):
            split = CASES[case][0]
            return slice(0, split) if rank == 0 else slice(split, N)

        results = {
            epoch: _run_cases(
                lambda m: DDP(m), rank_slice, compute_student_loss_distributed, CASES, epoch
            )
            for epoch in EPOCHS
        }
        split = CASES["uneven"][0]
        sparse_part = slice(0, split) if rank == 0 else slice(split, N)
        results["sparse"] = _run_sparse_cases(sparse_part, compute_student_loss_distributed)
        # Invalid input on rank 1 only: both ranks raise, neither hangs.
        s, t = torch.randn(3, C), torch.randn(3, C)
        y = torch.tensor([0, 1, 7 if rank == 1 else 2])
        try:
            compute_student_loss_distributed(s, t, y, _kd_config("none"))
            results["bad_input"] = "no error"
        except ValueError as exc:
            results["bad_input"] = str(exc)
        dist.barrier()
        # The sharded dump: 5 batches of <= 4 over 2 ranks, committed by rank 0.
        teachers, data, kwargs = _dump_problem()
        index = dump_teacher_logits(teachers, data, Path(out).parent / "sharded", **kwargs)
        results["dump"] = (index.num_samples, list(index.teachers))
        # A teacher failing on rank 1 only: both ranks raise, nothing is committed.
        try:
            failed = Path(out).parent / "failed"
            dump_teacher_logits(_RankOneFails(), data, failed, batch_size=4, progress=False)
            results["dump_error"] = "no error"
        except (ValueError, RuntimeError) as exc:
            results["dump_error"] = f"{type(exc).__name__}: {exc}"
        # The CLI in an initialised process group (as under torchrun): also sharded.
        results["cli_dump"] = main(dump_argv)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


EPOCHS = (5.0, 0.0)  # alpha 0.7; and the warmup (alpha 0, CE only)


def _dump_argv(manifest: Path, weights: Path, cache: Path) -> list[str]:
    argv = ["dump-teacher", "--manifest", str(manifest), "--cache", str(cache)]
    argv += ["--teacher", f"t={weights}", "--model", "kdkit.models:mlp", "--batch_size", "7"]
    return [*argv, "--model_kwargs", '{"hidden": [4]}', "--no-progress"]


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> Path:
    from safetensors.torch import save_model

    from kdkit.models import mlp

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "w.safetensors"
    save_model(mlp((5,), 2, hidden=(4,)), str(path))
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, manifest, teacher_weights):
    root = tmp_path_factory.mktemp("two_ranks")
    out = str(root / "results")
    dump_argv = _dump_argv(manifest, teacher_weights, root / "cli_cache")
    _spawn(_worker, (str(root / "store"), out, dump_argv))
    return root, [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("epoch", EPOCHS)
def test_two_ranks_equal_one_rank(two_ranks, epoch):
    reference = _run_cases(
        lambda m: m, lambda case: slice(0, N), compute_student_loss, CASES, epoch
    )
    ranks = [two_ranks[1][r][epoch] for r in range(2)]
    for key, (ref_loss, ref_stats, ref_grads) in reference.items():
        losses = [ranks[r][key][0] for r in range(2)]
        # DDP averages: the mean of the per-rank losses is the global loss.
        assert abs(float(sum(losses) / 2) - float(ref_loss)) < 1e-6, key
        for r in range(2):
            _, stats, grads = ranks[r][key]
            assert sorted(stats) == sorted(STUDENT_LOSS_STATS)
            for name in STUDENT_LOSS_STATS:
                assert abs(stats[name] - ref_stats[name]) < 1e-6, (key, name)
            for g, ref in zip(grads, ref_grads):
                assert (g - ref).abs().max() < 1e-6, key


def test_two_ranks_with_a_sparse_teacher_equal_one_rank(two_ranks):
    reference = _run_sparse_cases(slice(0, N), compute_student_loss)
    ranks = [two_ranks[1][r]["sparse"] for r in range(2)]
    for key, (ref_loss, ref_stats, ref_grad) in reference.items():
        losses = [ranks[r][key][0] for r in range(2)]
        torch.testing.assert_close(sum(losses) / 2, ref_loss, rtol=1e-12, atol=0)
        for r in range(2):
            for name in STUDENT_LOSS_STATS:
                assert ranks[r][key][1][name] == pytest.approx(ref_stats[name], rel=1e-12), key
        # L_r = R * (rank r's share): its logits' gradient is R times the global one.
        grads = torch.cat([ranks[0][key][2], ranks[1][key][2]]) / 2
        torch.testing.assert_close(grads, ref_grad, rtol=1e-12, atol=1e-15)
    renormalised = reference[("renormalize", False)][1]["kd_loss"]
    assert renormalised != pytest.approx(reference[("bucket", False)][1]["kd_loss"], rel=1e-6)


def test_without_process_group_it_is_compute_student_loss():
    for case in CASES:
        for weighting in WEIGHTINGS:
            _, _, teacher, targets, mask = _problem(case)
            s = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
            a = compute_student_loss(s, teacher, targets, _kd_config(weighting), 3, mask)
            b = compute_student_loss_distributed(
                s, teacher, targets, _kd_config(weighting), 3, mask
            )
            assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_invalid_input_on_one_rank_raises_on_every_rank(two_ranks):
    assert "invalid input on another rank" in two_ranks[1][0]["bad_input"]
    assert "out of range" in two_ranks[1][1]["bad_input"]


def test_sharded_dump_equals_single_process_dump(two_ranks, tmp_path):
    root, ranks = two_ranks
    teachers, data, kwargs = _dump_problem()
    index = dump_teacher_logits(teachers, data, tmp_path / "single", **kwargs)
    assert ranks[0]["dump"] == ranks[1]["dump"] == (19, list(index.teachers))
    sharded = root / "sharded"
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in sharded.iterdir())  # no .partial left
    for name in names:  # data files and manifest, byte for byte
        assert (sharded / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_init_from_env_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_from_env("cpu")
    assert (env.rank, env.world_size, env.enabled, env.is_main) == (0, 1, False, True)
    env.barrier()
    env.close()


# --- train-student under torchrun ----------------------------------------------------

TORCHRUN_TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parents[2]


def _torchrun(args: list[str], timeout: float = TORCHRUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m kdkit ARGS``."""
    return run_torchrun(["-m", "kdkit", *args], timeout)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A tiny generated data set: .npy files, a JSONL manifest, 3 domains, 2 splits."""
    root = tmp_path_factory.mktemp("data")
    (root / "x").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(50):
        x = rng.normal(size=5).astype(np.float32)
        np.save(root / "x" / f"{i}.npy", x)
        split = "test" if i % 5 == 0 else "train"
        records.append(ManifestRecord(f"x/{i}.npy", int(x[0] > 0), i % 3, split))
    return write_manifest(root / "manifest.jsonl", records)


def test_sharded_dump_error_on_one_rank_raises_on_every_rank(two_ranks):
    root, ranks = two_ranks
    assert ranks[0]["dump_error"].startswith("ValueError: rank 1: ValueError: teacher 'teacher'")
    assert ranks[1]["dump_error"].startswith("RuntimeError: the sharded dump failed on rank 0")
    assert not (root / "failed" / "manifest.json").exists()


def test_dump_teacher_cli_sharded_equals_single_process(
    two_ranks, manifest, teacher_weights, tmp_path
):
    root, ranks = two_ranks
    assert ranks[0]["cli_dump"] == ranks[1]["cli_dump"] == 0
    assert main(_dump_argv(manifest, teacher_weights, tmp_path / "single")) == 0
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (root / "cli_cache").iterdir())
    for name in names:
        single = (tmp_path / "single" / name).read_bytes()
        assert (root / "cli_cache" / name).read_bytes() == single, name


@pytest.fixture(scope="module")
def teacher_cache(two_ranks) -> Path:
    return two_ranks[0] / "cli_cache"  # dumped by 2 ranks through the CLI


def test_train_student_under_torchrun_then_resume_on_one_rank(tmp_path, manifest, teacher_cache):
    out = tmp_path / "student"
    argv = ["train-student", "--manifest", str(manifest), "--cache", str(teacher_cache)]
    argv += ["--output_dir", str(out), "--epochs", "3", "--batch_size", "8", "--no-progress"]
    argv += ["--model_kwargs", '{"hidden": [8]}', "--kd_on", "target", "--source_domain", "0"]
    argv += ["--kd_weighting", "pmax", "--seed", "3"]
    result = _torchrun([*argv, "--stop_after_epoch", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("stopped after epoch 2") == 1  # rank 0 only reports
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]  # one writer: rank 0
    # 40 training samples, 2 ranks x 20 samples = 3 steps of <= 8 per rank and epoch.
    assert epochs[-1]["global_step"] == 6 and 0 < epochs[-1]["coverage"] < 1
    assert "eval/acc" in epochs[-1]
    assert json.loads((out / "checkpoints" / "last.json").read_text())["epoch"] == 1

    # The checkpoint holds the plain module's weights: resume on one process.
    assert main([*argv, "--resume"]) == 0
    history = json.loads((out / "checkpoints" / "last.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert json.loads((out / "results.json").read_text())["completed"] is True
