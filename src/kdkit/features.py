"""Feature (hint) distillation: match intermediate student features to a teacher's.

For each pair ``STUDENT_MODULE:TEACHER_MODULE[:WEIGHT]`` (module names as in
``named_modules()``) the outputs of both modules are captured with forward hooks, the
student's go through a learned projection ``P`` and the loss is

.. math:: L_{feat} = \\sum_{pairs} w \\cdot \\ell(P(s), t)

with ``\\ell`` = ``'mse'`` (mean squared error over every element) or ``'cosine'``
(``1 - cos(P(s), t)`` along the feature/channel axis 1, averaged over the batch and any
spatial positions).  The teacher's features are detached; ``P`` is trained with the
student.  ``P`` is created from the observed shapes (batch axis excluded):

* ``[D_s]`` -> ``[D_t]``: ``nn.Linear(D_s, D_t)``;
* ``[C_s, L]`` -> ``[C_t, L]`` or ``[C_s, H, W]`` -> ``[C_t, H, W]``: a 1x1 convolution
  (``Conv1d``/``Conv2d``, kernel 1); the spatial sizes must be equal.

Any other pair of shapes is an :class:`~kdkit.errors.InputError` naming both.

Use it in your own loop::

    distiller = FeatureDistiller(["1:3:0.5"], loss="mse")
    distiller.setup(student, teacher, example_batch)  # hooks + projections
    optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()])
    for x, y in loader:
        with distiller.capture():
            logits = student(x)
            with torch.no_grad():
                teacher_logits = teacher(x)
            feat_loss, stats = distiller.loss()
        (F.cross_entropy(logits, y) + feat_loss).backward()
        ...

Example:
    >>> torch.manual_seed(0) and None
    >>> student = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> distiller = FeatureDistiller(["0:0"]).setup(student, teacher, torch.zeros(2, 4))
    >>> distiller.projections["0"]
    Linear(in_features=3, out_features=8, bias=True)
    >>> with distiller.capture():
    ...     _ = student(torch.ones(2, 4)); _ = teacher(torch.ones(2, 4))
    ...     loss, stats = distiller.loss()
    >>> sorted(stats)
    ['feature_loss', 'feature_loss/0']
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdkit._modes import eval_mode
from kdkit.errors import InputError

__all__ = [
    "FEATURE_LOSSES",
    "FeatureDistiller",
    "FeaturePair",
    "feature_loss",
    "find_module",
    "make_projection",
    "parse_feature_pair",
]

FEATURE_LOSSES: tuple[str, ...] = ("mse", "cosine")
"""Accepted values of the feature loss."""


@dataclass(frozen=True)
class FeaturePair:
    """One ``student:teacher[:weight]`` pair (``teacher`` may be ``NAME/module``)."""

    student: str
    teacher: str
    weight: float = 1.0


def parse_feature_pair(text: str | FeaturePair) -> FeaturePair:
    """Parse ``"STUDENT_MODULE:TEACHER_MODULE[:WEIGHT]"``.

    Example:
        >>> parse_feature_pair("layer2:big/blocks.3:0.5")
        FeaturePair(student='layer2', teacher='big/blocks.3', weight=0.5)
    """
    if isinstance(text, FeaturePair):
        return text
    if not isinstance(text, str):
        raise TypeError(f"feature_kd entries must be strings, got {text!r}")
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ValueError(f"feature_kd must be STUDENT_MODULE:TEACHER_MODULE[:WEIGHT], got {text!r}")
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise ValueError(f"feature_kd {text!r}: the weight must be a number") from None
        if not (weight >= 0 and weight < float("inf")):
            raise ValueError(f"feature_kd {text!r}: the weight must be finite and >= 0")
    return FeaturePair(parts[0], parts[1], weight)


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """``model``'s submodule ``name``; an :class:`InputError` listing close names if absent."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f"; close names: {close}" if close else ""
    raise InputError(
        f"{role} has no module {name!r}{hint} (all: {names[:20]}{' ...' if len(names) > 20 else ''})"
    )


def make_projection(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """A linear layer or 1x1 convolution mapping features of ``student_shape`` to ``teacher_shape``.

    Shapes exclude the batch axis.

    Raises:
        InputError: no such projection (different ranks, spatial sizes, or rank > 3).
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == len(t) and len(s) in (2, 3) and s[1:] == t[1:]:
        conv = nn.Conv1d if len(s) == 2 else nn.Conv2d
        return conv(s[0], t[0], kernel_size=1)
    raise InputError(
        f"cannot map student features {list(s)} to teacher features {list(t)} (batch axis "
        "excluded): a projection maps [D] -> [D'] (linear) or [C, *spatial] -> [C', *spatial] "
        "with equal spatial sizes (1x1 conv, 1-D or 2-D); pick layers whose shapes fit"
    )


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``'mse'``: mean squared error; ``'cosine'``: mean of ``1 - cos`` along axis 1.

    Shape:
        ``student`` and ``teacher``: ``[B, D]`` or ``[B, C, *spatial]`` (equal); output ``[]``.

    Example:
        >>> feature_loss(torch.ones(2, 3), torch.ones(2, 3), "cosine").abs().item() < 1e-6
        True
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"projected student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} must have the same shape"
        )
    teacher = teacher.detach().to(student.dtype)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    raise ValueError(f"feature loss must be one of {list(FEATURE_LOSSES)}, got {kind!r}")


def _tensor_output(output: object, name: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise InputError(f"module {name!r} outputs {type(output).__name__}, not a tensor")
    return output


class FeatureDistiller(nn.Module):
    """Forward hooks on student and teacher modules, learned projections and the loss.

    Its parameters are the projections (``self.projections``, one per pair, keyed by the
    pair's position); train them with the student and keep them in its checkpoint
    (``state_dict``).  See the module docstring for the loss and an example loop.
    """

    def __init__(self, pairs: Sequence[str | FeaturePair], loss: str = "mse") -> None:
        super().__init__()
        if isinstance(pairs, str) or not pairs:
            raise ValueError(f"pairs must be a non-empty list of feature_kd entries, got {pairs!r}")
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"feature loss must be one of {list(FEATURE_LOSSES)}, got {loss!r}")
        self.pairs = [parse_feature_pair(p) for p in pairs]
        self.loss_kind = loss
        self.projections = nn.ModuleDict()
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        self._capturing = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _teacher_module(self, teachers: Mapping[str, nn.Module], pair: FeaturePair) -> nn.Module:
        name, sep, module = pair.teacher.partition("/")
        if sep and name in teachers:
            return find_module(teachers[name], module, f"teacher {name!r}")
        if len(teachers) == 1:
            (only,) = teachers
            return find_module(teachers[only], pair.teacher, f"teacher {only!r}")
        raise InputError(
            f"feature_kd {pair.student}:{pair.teacher}: with several teachers "
            f"{sorted(teachers)} name the module as TEACHER/MODULE"
        )

    def attach(
        self, student: nn.Module, teachers: nn.Module | Mapping[str, nn.Module]
    ) -> FeatureDistiller:
        """Register the forward hooks (checks every module name)."""
        if isinstance(teachers, nn.Module):
            teachers = {"teacher": teachers}
        self.detach_hooks()
        for i, pair in enumerate(self.pairs):
            s_mod = find_module(student, pair.student, "the student")
            t_mod = self._teacher_module(teachers, pair)
            self._handles.append(s_mod.register_forward_hook(self._hook("student", i)))
            self._handles.append(t_mod.register_forward_hook(self._hook("teacher", i)))
        return self

    def _hook(self, role: str, i: int) -> Callable[[nn.Module, object, object], None]:
        pair = self.pairs[i]

        def hook(module: nn.Module, args: object, output: object) -> None:
            if self._capturing:
                name = pair.student if role == "student" else pair.teacher
                out = _tensor_output(output, name)
                self._captured[(role, i)] = out if role == "student" else out.detach()

        return hook

    def detach_hooks(self) -> None:
        """Remove the hooks (the projections stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def capture(
        self, teacher_features: Mapping[tuple[str, int], torch.Tensor] | None = None
    ) -> Iterator[None]:
        """Capture the hooked outputs of the forward passes inside the block (cleared after).

        ``teacher_features`` (from :meth:`teacher_features` of an earlier block) stands in
        for the teacher's forward: the training step runs the teacher once per micro-batch,
        before the student's forwards, and hands its features over here.
        """
        self._captured.clear()
        if teacher_features:
            self._captured.update(teacher_features)
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
            self._captured.clear()

    def teacher_features(self) -> dict[tuple[str, int], torch.Tensor]:
        """The (detached) teacher features captured so far in this block."""
        return {k: v for k, v in self._captured.items() if k[0] == "teacher"}

    def setup(
        self,
        student: nn.Module,
        teachers: nn.Module | Mapping[str, nn.Module],
        example: torch.Tensor,
        *,
        seed: int | None = None,
    ) -> FeatureDistiller:
        """Attach hooks, run both models once on ``example`` (eval mode, ``no_grad``) and
        create the projections from the observed shapes, on the student's device.

        ``seed`` initialises the projections from their own RNG stream (the global torch
        RNG is left untouched).
        """
        self.attach(student, teachers)
        modules = [teachers] if isinstance(teachers, nn.Module) else list(teachers.values())
        with self.capture(), eval_mode(student, *modules), torch.no_grad():
            student(example)
            for teacher in modules:
                teacher(example)
            shapes = dict(self._captured)
        device = example.device
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for i, pair in enumerate(self.pairs):
                if ("student", i) not in shapes or ("teacher", i) not in shapes:
                    missing = pair.student if ("student", i) not in shapes else pair.teacher
                    raise InputError(f"feature_kd module {missing!r} was not called in a forward")
                s, t = shapes[("student", i)].shape[1:], shapes[("teacher", i)].shape[1:]
                try:
                    projection = make_projection(s, t)
                except InputError as exc:
                    raise InputError(f"feature_kd {pair.student}:{pair.teacher}: {exc}") from None
                self.projections[str(i)] = projection.to(device)
        return self

    def loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """``sum(w * loss(P(s), t))`` over the pairs captured, and the stats:
        ``feature_loss`` (that sum) and ``feature_loss/<student module>`` (unweighted)."""
        total, values = self.loss_terms()
        listed = values.tolist()
        stats = {f"feature_loss/{p.student}": v for p, v in zip(self.pairs, listed[1:])}
        stats["feature_loss"] = listed[0]
        return total, stats

    def loss_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum(w * loss(P(s), t)), [that sum, unweighted loss of each pair])``.

        The second is detached (:meth:`loss`'s stats, without a host transfer); both are
        means over the captured batch.
        """
        terms: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, pair in enumerate(self.pairs):
            key = str(i)
            if ("student", i) not in self._captured or ("teacher", i) not in self._captured:
                raise RuntimeError(
                    f"feature_kd pair {pair.student}:{pair.teacher} captured nothing: run the "
                    "student and the teacher inside capture()"
                )
            student = self._captured[("student", i)]
            if key not in self.projections:
                raise RuntimeError("call setup() (or build projections) before loss()")
            value = feature_loss(
                self.projections[key](student), self._captured[("teacher", i)], self.loss_kind
            )
            values.append(value.detach())
            terms.append(pair.weight * value)
        total = torch.stack(terms).sum()
        return total, torch.stack([total.detach(), *values])

    def forward(self) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss()
