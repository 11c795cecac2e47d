"""The native CPU backend: ``native.c`` compiled at first use, cached on disk, called by ctypes.

``native.c`` is plain C (no Python or torch headers), so the system C compiler builds it
in about a second.  The shared library is cached in :func:`cache_dir` under a name keyed
by the hash of the source, the compiler (path, size, modification time) and the flags,
so the compile is paid once per machine.  Safety rules for the cache:

* the library is written atomically (compiled to a temporary file in the cache
  directory, then renamed), under a lock file so that concurrent first calls build once;
* a library is loaded only if it lies in kdkit's cache directory, is a regular file
  owned by this user and not writable by others, and its SHA-256 equals the digest
  recorded (in a sidecar file written after the build, before the rename) -- kdkit never
  loads a library it did not build;
* any failure (no compiler, compile error, foreign or corrupt file) makes
  :func:`load` return ``None`` with the reason in :func:`info`, and the caller falls
  back to the torch-ops backend.

Threads: the kernel splits rows over ``torch.get_num_threads()`` threads, once per call.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BATCH_VALUES",
    "LOSS_CODES",
    "available",
    "batch_pass",
    "cache_dir",
    "info",
    "load",
    "row_pass",
    "scale_rows",
    "supports",
]

ABI = 4
"""Must equal ``KDKIT_ABI`` of native.c."""

FLAGS: tuple[str, ...] = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
    "-shared",
    "-std=c11",
    "-pthread",
)
"""Compiler flags (``-fopenmp-simd`` enables the simd pragmas only, not the OpenMP
runtime; no ``-ffast-math``, which would drop the inf/NaN semantics the kernel relies on).  ``-march=native`` makes the library specific to this CPU, so the CPU's flags
are part of the cache key."""

LOSS_CODES = {"kldiv": 0, "soft_ce": 1, "reverse_kl": 2, "jsd": 3}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
BLOCK_ELEMENTS = 1 << 16
"""Rows are handed to threads in blocks of about this many elements."""

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "lib": None, "info": {}}


def cache_dir() -> Path:
    """``$KDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdkit``, else ``~/.cache/kdkit``; plus ``kernels``."""
    root = os.environ.get("KDKIT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "kdkit") if xdg else os.path.join("~", ".cache", "kdkit")
    return Path(root).expanduser().resolve() / "kernels"


def _source() -> bytes:
    return resources.files("kdkit.losses.kernels").joinpath("native.c").read_bytes()


def _compiler() -> str | None:
    name = os.environ.get("CC") or "cc"
    return shutil.which(name) or (shutil.which("gcc") if name == "cc" else None)


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor()


def _key(source: bytes, compiler: str) -> str:
    st = os.stat(compiler)
    h = hashlib.sha256(source)
    for part in (
        os.path.realpath(compiler),
        str(st.st_size),
        str(st.st_mtime_ns),
        " ".join(FLAGS),
        platform.machine(),
        _cpu_flags(),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:20]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trusted(path: Path, directory: Path) -> bool:
    """True if ``path`` is kdkit's own build: in ``directory``, ours, digest matches."""
    try:
        st = os.lstat(path)
        digest = (path.parent / (path.name + ".sha256")).read_text().strip()
    except OSError:
        return False
    return (
        path.parent.resolve() == directory
        and stat.S_ISREG(st.st_mode)
        and (not hasattr(os, "getuid") or st.st_uid == os.getuid())
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and _sha256(path) == digest
    )


def _build(source: bytes, compiler: str, target: Path) -> None:
    """Compile ``source`` to ``target`` atomically (temp file + rename), digest first."""
    directory = target.parent
    fd, tmp_c = tempfile.mkstemp(dir=directory, prefix=".native-", suffix=".c")
    with os.fdopen(fd, "wb") as f:
        f.write(source)
    tmp_so = tmp_c[:-2] + ".so.tmp"
    try:
        proc = subprocess.run(
            [compiler, *FLAGS, "-o", tmp_so, tmp_c, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({proc.returncode}): {proc.stderr.strip()}")
        os.chmod(tmp_so, 0o755)
        digest = _sha256(Path(tmp_so))
        fd, tmp_digest = tempfile.mkstemp(dir=directory, prefix=".native-", suffix=".sha256")
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_digest, 0o644)
        os.replace(tmp_digest, str(target) + ".sha256")
        os.replace(tmp_so, target)
    finally:
        for leftover in (tmp_c, tmp_so):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


ARGTYPES: list[Any] = [
    ctypes.c_void_p,  # student
    ctypes.c_void_p,  # teacher
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # classes
    ctypes.c_int,  # dtype code
    ctypes.c_int,  # compute: 0 float, 1 double
    ctypes.c_double,  # temperature
    ctypes.c_double,  # grad_scale: a factor of grad_out only
    ctypes.c_int,  # loss code
    ctypes.c_double,  # beta
    ctypes.c_void_p,  # loss_out
    ctypes.c_void_p,  # grad_out or NULL
    ctypes.c_int,  # threads
    ctypes.c_int64,  # block elements
]
"""ctypes signature of ``kdkit_row_pass`` in native.c."""


BATCH_ARGTYPES: list[Any] = [
    ctypes.c_void_p,  # student [n, C]
    ctypes.c_void_p,  # teacher [n, C]
    ctypes.c_void_p,  # targets [n] int64, or NULL
    ctypes.c_void_p,  # keep [n] uint8, or NULL
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # classes
    ctypes.c_int,  # dtype code (float32 or float64: also the compute type)
    ctypes.c_double,  # temperature
    ctypes.c_int,  # loss code
    ctypes.c_double,  # beta
    ctypes.c_double,  # alpha
    ctypes.c_int,  # weighting: 0 none, 1 pmax, 2 threshold
    ctypes.c_double,  # threshold
    ctypes.c_int64,  # ignore_index
    ctypes.c_void_p,  # norm: 2 doubles (N, W), or NULL
    ctypes.c_void_p,  # grad_out [n, C] or NULL
    ctypes.c_void_p,  # values_out, BATCH_VALUES doubles
]
"""ctypes signature of ``kdkit_batch_pass`` in native.c."""

BATCH_VALUES: tuple[str, ...] = (
    "ce_sum",
    "kd_sum",
    "valid_count",
    "kd_weight_sum",
    "selected_count",
    "confidence_sum",
    "correct",
    "out_of_range",
    "bad_student",
    "bad_teacher",
    "infinite_kd",
    "norm_count",
    "norm_weight",
    "loss",
)
"""The values ``kdkit_batch_pass`` writes, in order (``BV_*`` of native.c)."""

_WEIGHTINGS = {"none": 0, "pmax": 1, "threshold": 2}


def batch_pass(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor | None,
    keep: torch.Tensor | None,
    *,
    temperature: float,
    loss_type: str,
    beta: float,
    alpha: float,
    weighting: str,
    threshold: float,
    ignore_index: int,
    normaliser: torch.Tensor | tuple[float, float] | None,
    grad_out: torch.Tensor | None,
) -> list[float]:
    """The small-batch pass of native.c: the student loss of one batch and its gradient.

    ``student``, ``teacher``: contiguous CPU ``[n, C]`` of one dtype, float32 or float64
    (the compute dtype); ``targets``: contiguous int64 ``[n]`` or ``None`` (no CE, every
    row valid); ``keep``: contiguous bool ``[n]`` or ``None``; ``loss_type`` canonical
    (:func:`kdkit.losses.kernels.canonical`); ``normaliser``: the ``(N, W)`` to divide
    by (floats, or a float64 CPU tensor whose first two entries are read by the kernel:
    no host read here), or ``None`` for the batch's own; the values returned name the
    ``(N, W)`` used.  ``grad_out`` (contiguous, the student's
    dtype) receives ``d loss / d student``.  Returns :data:`BATCH_VALUES` as floats.
    The caller (:mod:`kdkit.losses.small_batch`) checks :func:`available` first.
    """
    lib = load()
    assert lib is not None  # the caller checked available()
    values = (ctypes.c_double * len(BATCH_VALUES))()
    norm: Any = None
    if isinstance(normaliser, torch.Tensor):
        norm = normaliser.data_ptr()
    elif normaliser is not None:
        norm = (ctypes.c_double * 2)(*normaliser)
    status = lib.kdkit_batch_pass(
        student.data_ptr(),
        teacher.data_ptr(),
        None if targets is None else targets.data_ptr(),
        None if keep is None else keep.data_ptr(),
        student.shape[0],
        student.shape[1],
        _DTYPE_CODES[student.dtype],
        temperature,
        LOSS_CODES[loss_type],
        beta,
        alpha,
        _WEIGHTINGS[weighting],
        threshold,
        ignore_index,
        norm,
        None if grad_out is None else grad_out.data_ptr(),
        values,
    )
    if status != 0:
        raise (MemoryError if status > 0 else TypeError)(
            f"native batch pass failed with status {status} for dtype {student.dtype}"
        )
    return list(values)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.kdkit_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.kdkit_abi()}, expected {ABI}")
    fn = lib.kdkit_row_pass
    fn.restype = ctypes.c_int
    fn.argtypes = ARGTYPES
    batch = lib.kdkit_batch_pass
    batch.restype = ctypes.c_int
    batch.argtypes = BATCH_ARGTYPES
    if lib.kdkit_batch_values() != len(BATCH_VALUES):
        raise RuntimeError(f"{path} returns {lib.kdkit_batch_values()} batch values")
    scale = lib.kdkit_scale_rows
    scale.restype = ctypes.c_int
    scale.argtypes = [
        ctypes.c_void_p,  # grad [n, C], bfloat16 or float16
        ctypes.c_void_p,  # scale [n], float32
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,  # dtype code
        ctypes.c_int,  # threads
        ctypes.c_int64,  # block elements
    ]
    return lib


def _load_uncached() -> tuple[ctypes.CDLL | None, dict[str, Any]]:
    start = time.perf_counter()
    details: dict[str, Any] = {"compiled": False}
    compiler = _compiler()
    if compiler is None:
        return None, {**details, "reason": "no C compiler found (set CC)"}
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        source = _source()
        target = directory / f"kdkit_native_{_key(source, compiler)}.so"
        details["path"] = str(target)
        if not _trusted(target, directory):
            import fcntl  # POSIX only; native.c needs a POSIX system anyway

            with open(directory / ".build.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _trusted(target, directory):  # another process may have built it
                    _build(source, compiler, target)
                    details["compiled"] = True
                if not _trusted(target, directory):
                    raise RuntimeError(f"{target} does not match its recorded digest")
        lib = _open(target)
    except Exception as error:  # any failure means: use the torch-ops backend
        return None, {**details, "reason": f"{type(error).__name__}: {error}"}
    details["seconds"] = time.perf_counter() - start
    return lib, details


def load() -> ctypes.CDLL | None:
    """The native library (built on first use), or ``None`` if it cannot be had."""
    if not _state["loaded"]:
        with _lock:
            if not _state["loaded"]:
                _state["lib"], _state["info"] = _load_uncached()
                _state["loaded"] = True
    return _state["lib"]


def available() -> bool:
    """True if the native library loads (compiling it on first use)."""
    return load() is not None


def info() -> dict[str, Any]:
    """How the last :func:`load` went: ``path``, ``compiled``, ``seconds`` or ``reason``."""
    load()
    return dict(_state["info"])


def supports(student: torch.Tensor, teacher: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if the kernel handles these inputs (CPU, same supported dtype, float32/64 compute)."""
    return (
        student.device.type == "cpu"
        and teacher.device.type == "cpu"
        and student.dtype == teacher.dtype
        and student.dtype in _DTYPE_CODES
        and dtype in (torch.float32, torch.float64)
    )


def row_pass(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    beta: float,
    loss_out: torch.Tensor,
    grad_out: torch.Tensor | None,
    *,
    workspace: object = None,
    grad_scale: float = 1.0,
) -> None:
    """The row pass (see :func:`kdkit.losses.kernels.row_pass`) by the native kernel;
    ``grad_scale`` multiplies ``grad_out`` (not ``loss_out``) inside the pass."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"the native kernel is not available: {info().get('reason')}")
    student = student.contiguous()
    teacher = teacher.contiguous()
    num_rows, num_classes = student.shape
    status = lib.kdkit_row_pass(
        student.data_ptr(),
        teacher.data_ptr(),
        num_rows,
        num_classes,
        _DTYPE_CODES[student.dtype],
        int(loss_out.dtype == torch.float64),
        float(temperature),
        float(grad_scale),
        LOSS_CODES[loss_type],
        float(beta),
        loss_out.data_ptr(),
        None if grad_out is None else grad_out.data_ptr(),
        torch.get_num_threads(),
        BLOCK_ELEMENTS,
    )
    if status != 0:
        raise (MemoryError if status > 0 else TypeError)(
            f"native row pass failed with status {status} for dtype {student.dtype}"
        )


def scale_rows(grad: torch.Tensor, scale: torch.Tensor) -> bool:
    """``grad[i] *= scale[i]`` in float32 for a contiguous half ``grad [n, C]`` on CPU, one
    rounding and one call; returns False (nothing done) where the kernel does not apply."""
    lib = load()
    if (
        lib is None
        or grad.device.type != "cpu"
        or grad.dtype not in (torch.bfloat16, torch.float16)
        or not grad.is_contiguous()
    ):
        return False
    scale = scale.detach().to(device="cpu", dtype=torch.float32).contiguous()
    status = lib.kdkit_scale_rows(
        grad.data_ptr(),
        scale.data_ptr(),
        grad.shape[0],
        grad.shape[1],
        _DTYPE_CODES[grad.dtype],
        torch.get_num_threads(),
        BLOCK_ELEMENTS,
    )
    return status == 0
