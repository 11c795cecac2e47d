"""The torchrun environment: detect a ``torchrun`` launch and set up the process group.

:func:`init_from_env` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by
``torchrun``) and returns a :class:`DistributedEnv`; used by ``kdkit train-student`` and
``kdkit dump-teacher``.  Everything builds on :mod:`torch.distributed`; kdkit manages no
processes itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["TIMEOUT_ENV", "DistributedEnv", "dist_timeout", "init_from_env"]

TIMEOUT_ENV: str = "KDKIT_DIST_TIMEOUT"
"""Seconds a rank waits in a collective (barrier, gather, all-reduce) for the others before
it fails with an error; default 1800.  A rank that dies is noticed sooner (its sockets
close, or torchrun's agent stops the job); this bounds the wait for one that hangs."""


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: Global rank (0 without torchrun).
        world_size: Number of processes (1 without torchrun).
        local_rank: Rank on this host (selects the GPU).
        device: The device this rank computes on.
        owns_group: True if :func:`init_from_env` created the process group (and
            :meth:`close` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, which logs, evaluates and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init_from_env` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def dist_timeout() -> datetime.timedelta:
    """The process-group timeout: :data:`TIMEOUT_ENV` seconds (a number > 0), else 30 min.

    Raises:
        ValueError: the variable is set to something else than a number > 0 (named).
    """
    value = os.environ.get(TIMEOUT_ENV)
    if value is None or value == "":
        return datetime.timedelta(minutes=30)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(
            f"environment variable {TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}"
        )
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: str | torch.device = "cpu") -> DistributedEnv:
    """Detect a torchrun launch and initialise the process group.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``).  With a world
    size above 1 it initialises the default process group -- NCCL for CUDA devices (each
    rank takes ``cuda:LOCAL_RANK``), gloo otherwise, with the timeout of
    :func:`dist_timeout` -- unless one is already initialised
    (then it is reused and not destroyed by :meth:`DistributedEnv.close`).  Without
    torchrun it returns a single-process :class:`DistributedEnv` on ``device``.

    Example:
        >>> env = init_from_env("cpu")  # not under torchrun
        >>> env.enabled, env.is_main
        (False, True)
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", 0)
        owns = False
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        owns = world_size > 1
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if owns:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=dist_timeout(),
        )
    return DistributedEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, owns_group=owns
    )
