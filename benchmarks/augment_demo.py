"""Why the demo's augmentation rows lost to CE (#25), and which augmentation to use instead.

Everything here runs on a validation split carved from the demo's training data
(:func:`kdkit.demo.data.carve_validation`: 20 % of every (domain, split) group of
``train`` and ``teacher_train``, seed 1), never on ``test``; teachers and students are
trained as in ``kdkit demo`` (:func:`kdkit.demo.run.train_teachers`,
:func:`~kdkit.demo.run.train_students`), without the ``val`` samples.

1. **Views**: the MLP teacher, trained on clean (un-augmented) data, classifies augmented
   views of the ``val`` samples, per domain (mean over ``--draws`` draws of the
   augmentation). "agree" is how often its prediction on the view equals its prediction
   on the clean image, i.e. how often cached logits of the clean image still name the
   class the teacher sees in the view.
2. **Grid**: students with the live, consistent MLP teacher under each augmentation of
   :data:`GRID` (and without augmentation = KD of the demo), ``--seeds`` seeds each;
   validation accuracy per domain, mean ± std over seeds.  The best live setting by
   validation target mean is printed last.

Run: ``PYTHONPATH=src python benchmarks/augment_demo.py [--seeds 3] [--draws 5]`` (3
carves: about 3 min of CPU time on one core; 546 s wall on the loaded, shared 2-core
machine).  Results are recorded in docs/decisions.md, "Augmentation in the demo (#25)".
``--student_epochs`` and ``--grid "a;b"`` (augmentations separated by ``;``) narrow it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.cache import dump_teacher_logits
from kdkit.demo.data import DOMAIN_NAMES, carve_validation, make_demo_data
from kdkit.demo.report import mean_std, summarize
from kdkit.demo.run import (
    AUGMENT_BEFORE,
    TEACHERS,
    DemoConfig,
    common_settings,
    train_students,
    train_teachers,
)
from kdkit.demo.views import view_accuracy

VIEWS: list[str] = [
    "noise:0.02",
    "noise:0.05",
    "noise:0.1",
    "noise:0.2",
    "shift:0.125",
    "specaugment:0.125",
    "mixup:0.2",
    "noise:0.05,shift:0.125",
    ",".join(AUGMENT_BEFORE),
    "kdkit.demo.views:gain_offset",
]
"""Augmentations whose views the teacher classifies (the demo's old setting included)."""

GRID: list[str] = [
    "noise:0.02",
    "noise:0.05",
    "noise:0.1",
    "noise:0.2",
    "shift:0.125",
    "noise:0.05,shift:0.125",
    "noise:0.2,shift:0.125",
    "specaugment:0.125",
    "mixup:0.2",
    "mixup:1.0",
    "kdkit.demo.views:gain_offset",
    "kdkit.demo.views:gain_offset,noise:0.02",
]
"""Augmentations of the grid's live-teacher students (beside KD without augmentation)."""

_KEYS = [f"acc/domain_{d}" for d in DOMAIN_NAMES] + ["target_acc"]
_HEADER = ["setting", *DOMAIN_NAMES.values(), "target mean"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _fold(args: argparse.Namespace, out: Path, fold: int) -> tuple[dict, dict]:
    """One validation fold: view accuracies of the teacher and the students' final metrics."""
    config = DemoConfig(
        output_dir=str(out),
        seeds=args.seeds,
        progress=False,
        student_epochs=args.student_epochs,
    )
    data = carve_validation(make_demo_data(seed=0), seed=fold)
    common = common_settings(config)
    teachers, _ = train_teachers(
        config, out, data, common, specs={"mlp": TEACHERS["mlp"]}, eval_split="val"
    )
    val = data.subset("val")
    views = {
        spec or "clean": view_accuracy(
            teachers["mlp"], val.features, val.labels, val.domains, spec, draws=args.draws
        )
        for spec in [None, *VIEWS]
    }
    conditions: dict[str, dict[str, Any]] = {
        "CE only": {},
        "KD, no augment": {"live": ["mlp"]},
        f"KD + {','.join(AUGMENT_BEFORE)}, cached logits": {
            "teacher": ["mlp"],
            "augment": AUGMENT_BEFORE,
        },
    }
    grid = GRID if args.grid is None else args.grid.split(";")
    conditions.update({f"live + {spec}": {"live": ["mlp"], "augment": spec} for spec in grid})
    cache = out / "cache"
    dump_teacher_logits(teachers, data.subset(), cache, progress=False)
    _, finals = train_students(
        config, out, data, common, cache, teachers, conditions=conditions, eval_split="val"
    )
    return views, finals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=3, help="validation carves (seeds 1..N)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--margin", type=float, default=0.05, help="label-keeping margin")
    parser.add_argument("--student_epochs", type=int, help="default: the demo's (40)")
    parser.add_argument("--grid", help="';'-separated augmentations instead of GRID")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # as the demo: tiny models
    start = time.perf_counter()
    views: dict[str, list[dict[str, float]]] = {}
    finals: dict[str, list[dict[str, float]]] = {}
    for fold in range(1, args.folds + 1):
        with tempfile.TemporaryDirectory() as tmp:
            fold_views, fold_finals = _fold(args, Path(tmp), fold)
        for name, metrics in fold_views.items():
            views.setdefault(name, []).append(metrics)
        for name, runs in fold_finals.items():
            finals.setdefault(name, []).extend(runs)
    view_mean = {n: {k: v[0] for k, v in s.items()} for n, s in summarize(views).items()}
    clean = view_mean["clean"]
    # Label-keeping: on every device the teacher's accuracy on the views stays within
    # the margin of its clean accuracy (the criterion tests/test_demo_augment.py pins).
    keeps = {
        n: all(m[k] >= clean[k] - args.margin for k in _KEYS if k.startswith("acc/"))
        for n, m in view_mean.items()
    }
    view_rows = [
        [
            n,
            *[f"{100 * m[k]:.1f}" for k in _KEYS],
            f"{100 * m['agree']:.1f}",
            "yes" if keeps[n] else "no",
        ]
        for n, m in view_mean.items()
    ]
    summary = summarize(finals)
    # Paired with KD without augmentation: the same fold, seed, initialisation and order.
    base = np.array([m["target_acc"] for m in finals["KD, no augment"]])
    paired = {
        n: (float(np.mean(d)), float(np.std(d)), int(np.sum(d > 0)))
        for n, ms in finals.items()
        for d in [np.array([m["target_acc"] for m in ms]) - base]
    }
    grid_rows = [
        [
            name,
            *[mean_std(stats[k]) for k in _KEYS],
            f"{100 * paired[name][0]:+.1f} ± {100 * paired[name][1]:.1f} ({paired[name][2]}/{len(base)})",
        ]
        for name, stats in summary.items()
    ]
    live = {n: s for n, s in summary.items() if n.startswith("live + ")}
    allowed = {n: s for n, s in live.items() if keeps.get(n.removeprefix("live + "), False)}
    best = max(allowed, key=lambda n: allowed[n]["target_acc"][0])
    best_any = max(live, key=lambda n: live[n]["target_acc"][0])
    ref = summary["KD, no augment"]["target_acc"]
    result = {
        "views": view_mean,
        "keeps_labels": keeps,
        "grid": {n: {k: list(s[k]) for k in _KEYS} for n, s in summary.items()},
        "paired_target_vs_kd": paired,
        "runs": finals,
        "best_label_keeping": best,
        "best_any": best_any,
        "seeds": args.seeds,
        "folds": args.folds,
        "wall_s": time.perf_counter() - start,
    }
    runs = args.seeds * args.folds
    print(
        f"Teacher (MLP) accuracy (%) on views of val, mean over {args.folds} folds x "
        f"{args.draws} draws (agree: = its clean prediction; keeps: every device within "
        f"{100 * args.margin:g} points of clean)\n"
    )
    print(_table([*_HEADER, "agree", "keeps"], view_rows))
    print(
        f"\nStudents, val accuracy (%), mean ± std over {runs} runs ({args.folds} folds x {args.seeds} seeds)\n"
    )
    print(_table([*_HEADER, "target vs KD, paired (runs better)"], grid_rows))
    print(
        f"\nbest label-keeping live setting by val target mean: {best} "
        f"({mean_std(allowed[best]['target_acc'])}); best of all live: {best_any} "
        f"({mean_std(live[best_any]['target_acc'])}); KD without augment {mean_std(ref)}; "
        f"{result['wall_s']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
