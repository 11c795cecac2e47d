r"""Sparse top-k teacher outputs: :class:`SparseLogits` and the capture maths.

A sparse teacher keeps, per position, only its ``K`` most probable classes.  With
teacher logits :math:`t \in \mathbb{R}^V` and the capture temperature :math:`T_c`:

.. math::

    \log q = \mathrm{log\_softmax}(t / T_c) \quad \text{(over the full vocabulary)}, \qquad
    I = \mathrm{topk}(\log q, K), \qquad
    \log r = \log\Big(1 - \sum_{k \in I} q_k\Big) = \mathrm{logsumexp}_{j \notin I} \log q_j .

The log-probabilities are normalised over **all** ``V`` classes before the top-k is
taken (a softmax over the ``K`` kept logits alone would overstate every kept
probability).  The tail log mass :math:`\log r` is the log-sum-exp of the classes left
out, which is exact and stable even when the tail is tiny (no ``log(1 - 0.99999...)``);
it is ``-inf`` when ``K = V`` or the tail underflows.

Shape (``[B, L, ...]`` for sequences, ``[B, ...]`` for classification):

* ``indices``: int64 ``[B, L, K]`` (``[B, K]``) -- class ids in ``[0, V)``, distinct per position;
* ``logprobs``: float ``[B, L, K]`` -- :math:`\log q_k` at :math:`T_c`, sorted descending;
* ``tail_logprob``: float ``[B, L]`` -- :math:`\log r`;
* ``mask``: bool ``[B, L]`` -- real positions (samples shorter than the batch's longest
  are padded with a harmless valid distribution: indices ``0..K-1``, uniform over them);
* ``vocab_size`` ``V``, ``temperature`` :math:`T_c` and, when read from a cache, the
  normalised sample ``keys`` (used to name a sample in error messages).

The losses (:func:`kdkit.kd_loss`, :func:`kdkit.compute_student_loss`,
:func:`kdkit.compute_confidence_weights`) accept a :class:`SparseLogits` wherever they
take teacher logits; their maths is in :mod:`kdkit.losses.sparse`.

Example:
    >>> import torch
    >>> t = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> s = sparse_topk(t, 2)
    >>> s.indices.tolist(), [round(v, 4) for v in s.logprobs.exp()[0].tolist()]
    ([[0, 1]], [0.6439, 0.2369])
    >>> round(float(s.tail_logprob.exp()[0]), 4)  # 1 - 0.6439 - 0.2369
    0.1192
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SparseLogits", "sparse_topk", "tail_logprob"]


def tail_logprob(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_k q_k)`` as the log-sum-exp of the classes not in ``indices``.

    ``log_probs`` ``[..., V]`` normalised over ``V``; ``indices`` ``[..., K]``; result ``[...]``.
    """
    rest = log_probs.scatter(-1, indices, -math.inf)
    return torch.logsumexp(rest, dim=-1)


def sparse_topk(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> SparseLogits:
    """The top-``k`` of ``log_softmax(logits / temperature)`` over the full vocabulary.

    Computed in float32 (float64 stays float64).  ``logits`` ``[..., V]`` must be finite
    (the cache's dump checks that first, naming the samples); ``1 <= k <= V``.

    Example:
        >>> s = sparse_topk(torch.randn(3, 5, 11), 4)
        >>> s.indices.shape, s.tail_logprob.shape, s.vocab_size
        (torch.Size([3, 5, 4]), torch.Size([3, 5]), 11)
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 1:
        got = (
            f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else logits
        )
        raise TypeError(f"sparse_topk: logits must be a floating tensor [..., V], got {got!r}")
    v = int(logits.shape[-1])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"sparse_topk: k must be an integer in [1, V={v}], got {k!r}")
    t = temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
        raise ValueError(f"sparse_topk: temperature must be a finite number > 0, got {t!r}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(logits.detach().to(dtype) / temperature, dim=-1)
    values, indices = log_q.topk(k, dim=-1, sorted=True)
    tail = tail_logprob(log_q, indices)
    if mask is None:
        mask = torch.ones(values.shape[:-1], dtype=torch.bool, device=values.device)
    return SparseLogits(indices, values, tail, int(logits.shape[-1]), float(temperature), mask)


@dataclasses.dataclass(frozen=True)
class SparseLogits:
    """Top-k teacher log-probabilities of a batch (see the module docstring for the maths).

    Attributes:
        indices: int64 ``[B, L, K]`` (``[B, K]`` without a position axis).
        logprobs: float ``[B, L, K]``: log-probabilities over the full vocabulary.
        tail_logprob: float ``[B, L]``: log of the probability outside ``indices``.
        vocab_size: ``V``, the teacher's class count.
        temperature: the capture temperature :math:`T_c` of ``logprobs``.
        mask: bool ``[B, L]``: True at real positions.
        keys: the samples' normalised cache keys (``None`` if not read from a cache).

    Example:
        >>> s = sparse_topk(torch.randn(2, 7), 3)
        >>> s.top_k, s.positions_shape, s.to("cpu").vocab_size
        (3, torch.Size([2]), 7)
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    vocab_size: int
    temperature: float = 1.0
    # ``None`` (all positions real) is replaced by an all-True mask in ``__post_init__``, so
    # every reader sees a tensor; the annotation says what the attribute holds.
    mask: torch.Tensor = None  # type: ignore[assignment]
    keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("indices", "logprobs", "tail_logprob"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"SparseLogits.{name} must be a tensor")
        idx, lp, tail = self.indices, self.logprobs, self.tail_logprob
        if idx.ndim < 1 or idx.shape != lp.shape or tail.shape != idx.shape[:-1]:
            raise ValueError(
                "SparseLogits needs indices and logprobs [..., K] of one shape and tail_logprob "
                f"[...]; got indices {tuple(idx.shape)}, logprobs {tuple(lp.shape)}, "
                f"tail_logprob {tuple(tail.shape)}"
            )
        if idx.dtype != torch.int64 or not lp.is_floating_point() or not tail.is_floating_point():
            raise TypeError(
                "SparseLogits needs int64 indices and floating logprobs/tail_logprob, got "
                f"{idx.dtype}, {lp.dtype}, {tail.dtype}"
            )
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise TypeError(f"SparseLogits.vocab_size must be an int, got {self.vocab_size!r}")
        if not 1 <= idx.shape[-1] <= self.vocab_size:
            raise ValueError(
                f"SparseLogits top_k={idx.shape[-1]} must be in [1, vocab_size={self.vocab_size}]"
            )
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
            raise ValueError(f"SparseLogits.temperature must be a finite number > 0, got {t!r}")
        if self.mask is None:
            object.__setattr__(self, "mask", torch.ones_like(tail, dtype=torch.bool))
        elif self.mask.shape != tail.shape or self.mask.dtype != torch.bool:
            raise ValueError(
                f"SparseLogits.mask must be bool {tuple(tail.shape)}, got {self.mask.dtype} "
                f"{tuple(self.mask.shape)}"
            )
        if self.keys is not None and not isinstance(self.keys, tuple):
            raise TypeError(
                f"SparseLogits.keys must be None or a tuple, got {type(self.keys).__name__}"
            )

    # -- shape ---------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return int(self.indices.shape[-1])

    @property
    def positions_shape(self) -> torch.Size:
        """``[B, L]`` (``[B]``): the shape of the positions (the student logits' ``shape[:-1]``)."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.logprobs.device

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense logits this stands for: ``[B, L, V]``."""
        return torch.Size([*self.positions_shape, self.vocab_size])

    def to(self, *args: Any, **kwargs: Any) -> SparseLogits:
        """Move every tensor like :meth:`torch.Tensor.to` (a dtype applies to the floats only)."""

        # Integer tensors never pass through a dtype (float16 cannot hold index 2049).
        devices = [a.device if isinstance(a, torch.Tensor) else a for a in args]
        where: list[Any] = [a for a in devices if not isinstance(a, torch.dtype)]
        where_kw: dict[str, Any] = {k: v for k, v in kwargs.items() if k != "dtype"}
        every: list[Any] = list(args)
        every_kw: dict[str, Any] = dict(kwargs)

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(*every, **every_kw)
            return t.to(*where, **where_kw)

        return dataclasses.replace(
            self,
            indices=move(self.indices),
            logprobs=move(self.logprobs),
            tail_logprob=move(self.tail_logprob),
            mask=move(self.mask),
        )

    def pin_memory(self) -> SparseLogits:
        """Pinned copies (what ``DataLoader(pin_memory=True)`` calls)."""
        return dataclasses.replace(
            self,
            indices=self.indices.pin_memory(),
            logprobs=self.logprobs.pin_memory(),
            tail_logprob=self.tail_logprob.pin_memory(),
            mask=self.mask.pin_memory(),
        )

    def detach(self) -> SparseLogits:
        return dataclasses.replace(
            self, logprobs=self.logprobs.detach(), tail_logprob=self.tail_logprob.detach()
        )

    # -- per sample / batching ------------------------------------------------------------
    def unbind(self) -> list[SparseLogits]:
        """One :class:`SparseLogits` per sample, without the batch axis: ``[L_i, K]`` trimmed
        to the sample's real positions for sequences, ``[K]`` for classification."""
        if self.indices.ndim < 2:
            raise ValueError("SparseLogits.unbind needs a batch axis: indices [B, ..., K]")
        seq = self.indices.ndim >= 3
        lengths = self.mask.sum(dim=-1).tolist() if seq else None
        out = []
        for i in range(self.indices.shape[0]):
            sl = slice(0, int(lengths[i])) if lengths is not None else slice(None)
            out.append(
                SparseLogits(
                    self.indices[i][sl] if seq else self.indices[i],
                    self.logprobs[i][sl] if seq else self.logprobs[i],
                    self.tail_logprob[i][sl] if seq else self.tail_logprob[i],
                    self.vocab_size,
                    self.temperature,
                    self.mask[i][sl] if seq else self.mask[i],
                    None if self.keys is None else (self.keys[i],),
                )
            )
        return out

    @staticmethod
    def stack(items: Sequence[SparseLogits]) -> SparseLogits:
        """Batch per-sample items (from :meth:`unbind` or a dataset), padding sequences to
        the longest; the inverse of :meth:`unbind` (the collation of DataLoader batches).

        Example:
            >>> lengths = torch.tensor([[2], [5], [4]])
            >>> s = sparse_topk(torch.randn(3, 5, 9), 2, mask=torch.arange(5) < lengths)
            >>> s2 = SparseLogits.stack(s.unbind())
            >>> s2.mask.sum(-1).tolist(), s2.indices.shape
            ([2, 5, 4], torch.Size([3, 5, 2]))
        """
        if not items:
            raise ValueError("SparseLogits.stack needs at least one item")
        first = items[0]
        want = (first.vocab_size, first.temperature, first.top_k, first.indices.ndim)
        for it in items:
            got = (it.vocab_size, it.temperature, it.top_k, it.indices.ndim)
            if got != want:
                raise ValueError(
                    "SparseLogits.stack: items differ in (vocab_size, temperature, top_k, ndim): "
                    f"{want} vs {got}"
                )
        keys = None
        if all(it.keys is not None and len(it.keys) == 1 for it in items):
            keys = tuple(it.keys[0] for it in items if it.keys is not None)
        if first.indices.ndim == 1:  # classification items [K]
            return SparseLogits(
                torch.stack([it.indices for it in items]),
                torch.stack([it.logprobs for it in items]),
                torch.stack([it.tail_logprob for it in items]),
                first.vocab_size,
                first.temperature,
                torch.stack([it.mask for it in items]),
                keys,
            )
        length = max(it.indices.shape[0] for it in items)
        padded = [it.with_length(length) for it in items]
        return SparseLogits(
            torch.stack([it.indices for it in padded]),
            torch.stack([it.logprobs for it in padded]),
            torch.stack([it.tail_logprob for it in padded]),
            first.vocab_size,
            first.temperature,
            torch.stack([it.mask for it in padded]),
            keys,
        )

    def with_length(self, length: int) -> SparseLogits:
        """The positions axis (the one before ``K``) padded or cut to ``length``.

        Padding positions get the harmless valid distribution of the module docstring
        (indices ``0..K-1``, uniform over them, no tail) and ``mask`` False; cutting
        drops positions past ``length`` (``ValueError`` if one of them is real).

        Example:
            >>> s = sparse_topk(torch.randn(2, 3, 9), 2)
            >>> s.with_length(5).mask.sum(-1).tolist(), s.with_length(5).indices.shape
            ([3, 3], torch.Size([2, 5, 2]))
        """
        if self.indices.ndim < 2:
            raise ValueError("SparseLogits.with_length needs a positions axis: indices [..., L, K]")
        have = self.indices.shape[-2]
        if length == have:
            return self
        if length < have:
            if bool(self.mask[..., length:].any()):
                raise ValueError(
                    f"SparseLogits.with_length({length}) would drop real positions "
                    f"(it holds {have})"
                )
            return dataclasses.replace(
                self,
                indices=self.indices[..., :length, :],
                logprobs=self.logprobs[..., :length, :],
                tail_logprob=self.tail_logprob[..., :length],
                mask=self.mask[..., :length],
            )
        k, lead, dev = self.top_k, self.indices.shape[:-2], self.device
        extra = length - have
        indices = torch.arange(k, device=dev).expand(*lead, extra, k)
        logprobs = torch.full(
            (*lead, extra, k), -math.log(k), dtype=self.logprobs.dtype, device=dev
        )
        tail = torch.full((*lead, extra), -math.inf, dtype=self.tail_logprob.dtype, device=dev)
        mask = torch.zeros((*lead, extra), dtype=torch.bool, device=dev)
        return dataclasses.replace(
            self,
            indices=torch.cat([self.indices, indices], dim=-2),
            logprobs=torch.cat([self.logprobs, logprobs], dim=-2),
            tail_logprob=torch.cat([self.tail_logprob, tail], dim=-1),
            mask=torch.cat([self.mask, mask], dim=-1),
        )

    def dense_logprobs(self, fill: str = "uniform") -> torch.Tensor:
        """``[..., V]`` log-probabilities with the tail spread uniformly over the ``V - K``
        classes left out (``fill='uniform'``) or dropped (``'zero'``: ``-inf`` there).

        For inspection and tests; it materialises ``[..., V]``.
        """
        v, k = self.vocab_size, self.top_k
        base: float | torch.Tensor = -math.inf
        if fill == "uniform" and v > k:
            base = self.tail_logprob - math.log(v - k)
        elif fill not in ("uniform", "zero"):
            raise ValueError(f"fill must be 'uniform' or 'zero', got {fill!r}")
        out = torch.empty((*self.positions_shape, v), dtype=self.logprobs.dtype, device=self.device)
        if isinstance(base, torch.Tensor):
            out.copy_(base.unsqueeze(-1).expand_as(out))
        else:
            out.fill_(base)
        return out.scatter(-1, self.indices, self.logprobs)
