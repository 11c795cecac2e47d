r"""Row-pass kernels of the fused KD path: one contract, three backends.

**The row pass.**  For ``n`` rows of student and teacher logits it computes, per row
``i``, the divergence and its gradient with respect to the student logits:

.. math::

    \text{loss\_out}_i = T^2 \, D(p_{t,i}, p_{s,i}), \qquad
    \text{grad\_out}_i = \partial\, \text{loss\_out}_i / \partial s_i,

with :math:`p = \mathrm{softmax}(x / T)` over the last dimension and ``D`` one of

* ``'kldiv'``: :math:`\mathrm{KL}(p_t \| p_s)`; ``'soft_ce'``: :math:`H(p_t, p_s)`
  (both have the gradient :math:`T (p_s - p_t)`);
* ``'reverse_kl'``: :math:`\mathrm{KL}(p_s \| p_t)`, gradient
  :math:`T\, p_s (\log p_s - \log p_t - \mathrm{KL}(p_s \| p_t))`;
* ``'jsd'`` with :math:`0 < \beta < 1`: :math:`\beta\, \mathrm{KL}(p_t \| m) +
  (1 - \beta)\, \mathrm{KL}(p_s \| m)`, :math:`m = \beta p_t + (1 - \beta) p_s`
  (``log m`` by logaddexp), gradient
  :math:`T (1 - \beta)\, p_s (\log p_s - \log m - \mathrm{KL}(p_s \| m))`.
  ``beta`` 0 and 1 are exactly ``'kldiv'`` and ``'reverse_kl'`` (see :func:`canonical`).

Terms whose left-hand probability is exactly zero contribute exactly zero, in value and
gradient, so ``-inf`` (masked) classes give no NaN.  This is the formula of
``kdkit.losses.kd``'s reference path.

Shapes and dtypes (:func:`row_pass`):

* ``student``, ``teacher``: ``[n, C]``, same floating dtype (float32, float64, bfloat16,
  float16), same device; the teacher is treated as a constant;
* ``loss_out``: ``[n]`` in the compute dtype (float32 for half and float32 inputs,
  float64 when asked; contiguous);
* ``grad_out``: ``[n, C]`` in the student's dtype, contiguous, or ``None`` (value only).

It runs on any chunk of rows on its own, so a fused linear path (``hidden @ W.T`` chunk
by chunk) calls it per chunk of logits.

**Backends** (:func:`select_backend`):

* ``'native'``: the C kernel of ``native.c``, compiled at first use and cached
  (:mod:`kdkit.losses.kernels.native`); CPU tensors;
* ``'triton'``: a Triton kernel (:mod:`kdkit.losses.kernels.triton_kernel`); CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests); float32 compute only
  (float64 compute goes to torch ops);
* ``'torch'``: torch ops (:mod:`kdkit.losses.kernels.torch_ops`); always available.

``'auto'`` (default) takes Triton for CUDA tensors if ``triton`` imports, the native
kernel for CPU tensors if it builds/loads, else torch ops -- and torch ops always under
``torch.compile`` and, on CPU, above ``T = NATIVE_MAX_TEMPERATURE`` (100).  The environment variable ``KDKIT_KERNEL`` (``auto``, ``native``,
``torch``, ``triton``) sets the default for the process; a ``backend=`` argument wins.
A backend asked for by name that cannot run (no compiler, triton missing) raises; inputs
it does not handle (e.g. mixed dtypes for ``'native'``) go to torch ops.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from kdkit.losses.kernels import native, torch_ops

__all__ = [
    "BACKENDS",
    "KERNEL_ENV",
    "Backend",
    "canonical",
    "is_compiling",
    "row_pass",
    "select_backend",
    "triton_available",
]

BACKENDS: tuple[str, ...] = ("auto", "native", "torch", "triton")
"""Accepted backend names (``KDKIT_KERNEL`` or ``backend=``)."""

KERNEL_ENV = "KDKIT_KERNEL"
"""Environment variable naming the default backend."""


class Backend(NamedTuple):
    """A row-pass implementation: ``row_pass`` has the signature of :func:`row_pass`
    (plus ``workspace=``); ``chunked`` backends want row chunks and a reused workspace."""

    name: str
    row_pass: Callable[..., None]
    chunked: bool


TORCH = Backend("torch", torch_ops.row_pass, chunked=True)
NATIVE = Backend("native", native.row_pass, chunked=False)


def canonical(loss_type: str, beta: float) -> str:
    """``'jsd'`` at ``beta`` 0 / 1 is exactly ``'kldiv'`` / ``'reverse_kl'`` (TRL's convention)."""
    if loss_type == "jsd" and beta in (0.0, 1.0):
        return "kldiv" if beta == 0.0 else "reverse_kl"
    return loss_type


def triton_available() -> bool:
    """True if ``triton`` is installed (it is imported only when used)."""
    return importlib.util.find_spec("triton") is not None


def _triton(student: torch.Tensor, teacher: torch.Tensor, dtype: torch.dtype) -> Backend:
    from kdkit.losses.kernels import triton_kernel

    if triton_kernel.supports(student, teacher, dtype):
        return Backend("triton", triton_kernel.row_pass, chunked=False)
    return TORCH


def is_compiling() -> bool:
    """True while torch.compile traces (``torch.compiler.is_compiling`` needs torch >= 2.3)."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is None:  # torch 2.1/2.2
        return bool(torch._dynamo.is_compiling())
    return bool(compiling())


NATIVE_MAX_TEMPERATURE: float = 100.0
"""``'auto'`` leaves temperatures above this to torch ops: there KL ~ 1/T**2 is a small
difference of O(1) log-probabilities, and torch ops' divide-first formulation is measured
~10x closer to an extended-precision value at T = 1e6 (docs/performance.md)."""


def select_backend(
    student: torch.Tensor,
    teacher: torch.Tensor,
    dtype: torch.dtype,
    backend: str | None = None,
    *,
    temperature: float | None = None,
) -> Backend:
    """The backend for these inputs (rules in the module docstring).

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: a backend asked for by name that cannot run here.
    """
    name = backend if backend is not None else os.environ.get(KERNEL_ENV, "auto") or "auto"
    if name not in BACKENDS:
        source = "backend" if backend is not None else KERNEL_ENV
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "torch" or is_compiling():
        return TORCH
    on_cuda = student.device.type == "cuda"
    if name == "triton" or (name == "auto" and on_cuda and triton_available()):
        if not triton_available():
            raise RuntimeError(
                "backend 'triton' needs the triton package: pip install kdkit[triton]"
            )
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        return _triton(student, teacher, dtype)
    high_temperature = temperature is not None and temperature > NATIVE_MAX_TEMPERATURE
    if name == "auto" and high_temperature:
        return TORCH
    if native.supports(student, teacher, dtype):
        if name == "native" and not native.available():
            raise RuntimeError(f"the native kernel is not available: {native.info().get('reason')}")
        if native.available():
            return NATIVE
    return TORCH


def row_pass(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    beta: float,
    loss_out: torch.Tensor,
    grad_out: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    **kwargs: Any,
) -> str:
    """Per-row loss and student gradient of one chunk of rows, written in place.

    Args:
        student: Student logits ``[n, C]`` (not modified; no autograd is involved).
        teacher: Teacher logits ``[n, C]``, same dtype and device.
        temperature: ``T > 0``.
        loss_type: ``'kldiv'``, ``'soft_ce'``, ``'reverse_kl'`` or ``'jsd'``.
        beta: ``jsd_beta`` in [0, 1] (ignored unless ``loss_type='jsd'``).
        loss_out: ``[n]``, float32 or float64 (the compute dtype): ``T**2 * D`` per row.
        grad_out: ``[n, C]`` in the student's dtype, or ``None``: ``d loss_out_i / d s_i``.
        backend: ``'auto'``, ``'native'``, ``'torch'`` or ``'triton'`` (default:
            ``$KDKIT_KERNEL``, else ``'auto'``).

    Returns:
        The name of the backend that ran.

    Inputs are trusted (validated by the public losses); no ``check_finite``.

    Example:
        >>> s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[3.0, 0.5, -2.0]])
        >>> loss, grad = torch.empty(1), torch.empty(1, 3)
        >>> _ = row_pass(s, t, 1.0, "kldiv", 0.5, loss, grad)
        >>> round(loss.item(), 6)
        0.034678
    """
    chosen = select_backend(student, teacher, loss_out.dtype, backend, temperature=temperature)
    chosen.row_pass(
        student,
        teacher,
        temperature,
        canonical(loss_type, beta),
        beta,
        loss_out,
        grad_out,
        **kwargs,
    )
    return chosen.name
