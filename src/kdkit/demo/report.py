"""The report scaffolding both demos share: seed summaries, the markdown results table,
figures, ``report.md`` from its sections and ``results.json``.

What each demo says (its wording, sections and plotted data) stays in its own module
(:mod:`kdkit.demo.run`, :mod:`kdkit.demo.lm`); matplotlib is imported only when a figure
is drawn.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

Summary = dict[str, dict[str, tuple[float, float]]]
"""Per condition and metric: ``(mean, std)`` over seeds."""


def summarize(finals: dict[str, list[dict[str, float]]]) -> Summary:
    """Mean and (population) std over seeds of each condition's final metrics."""
    return {
        name: {
            k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms])))
            for k in ms[0]
        }
        for name, ms in finals.items()
    }


def mean_std(stat: tuple[float, float], fmt: str = ".1f", scale: float = 100) -> str:
    """``"mean ± std"`` of ``stat``, both times ``scale`` (percent by default)."""
    return f"{scale * stat[0]:{fmt}} ± {scale * stat[1]:{fmt}}"


def markdown_table(note: str, header: list[str], rows: list[list[str]]) -> str:
    """``note``, a blank line and a markdown table with padded columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([note, "", line(header), sep, *[line(r) for r in rows]])


@contextlib.contextmanager
def figure(
    path: Path, height: float = 4, legend: int | None = None, **labels: Any
) -> Iterator[Any]:
    """The axes of a 7-inch-wide figure to draw on; after the ``with`` block, ``labels``
    (``ax.set`` keywords: xlabel, ylabel, title, ...) are set, a legend of font size
    ``legend`` added unless that is ``None``, and the figure saved to ``path`` (PNG, 100 dpi)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, height))
    ax = fig.add_subplot()
    yield ax
    ax.set(**labels)
    if legend is not None:
        ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def image_grid(
    path: Path,
    cells: list[list[np.ndarray]],
    row_labels: list[str],
    column_labels: list[str],
    *,
    vmin: float,
    vmax: float,
    title: str | None = None,
) -> Path:
    """Save ``cells`` (rows of 2-D arrays) as a grid of grey-scale images on one fixed
    scale ``[vmin, vmax]``, with a label per row (left) and per column (top); PNG, 100 dpi.

    Raises:
        ValueError: when the labels do not match the grid's rows and columns.
    """
    if len(cells) != len(row_labels) or any(len(r) != len(column_labels) for r in cells):
        raise ValueError(
            f"image_grid: {len(row_labels)} row and {len(column_labels)} column labels for "
            f"a grid of {[len(r) for r in cells]} images per row"
        )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * len(column_labels) + 1.5, 1.2 * len(row_labels) + 0.6))
    axes = fig.subplots(len(row_labels), len(column_labels), squeeze=False)
    for i, row in enumerate(cells):
        for j, image in enumerate(row):
            ax = axes[i][j]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column_labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def settings_line(quick: bool, seeds: int, budget: str, wall: float) -> str:
    """The report's first line: quick or not, seeds, the training ``budget``, wall time."""
    return (
        f"Settings: {'quick (CI) ' if quick else ''}{seeds} seed(s), {budget}; "
        f"wall time {wall:.1f} s."
    )


def quick_note(unit: str, command: str) -> list[str]:
    """The warning paragraph of a ``--quick`` report (a few ``unit`` of training)."""
    return [
        f"**--quick**: a few {unit} to exercise the pipeline in CI; these numbers are not "
        f"meaningful. Run `{command}` for the real comparison.",
        "",
    ]


def image_lines(plots: list[str]) -> list[str]:
    """Markdown images of the PNG files ``plots`` (next to ``report.md``)."""
    return [f"![{p}]({p})" for p in plots]


def bash_block(lines: list[str]) -> list[str]:
    """``lines`` as a fenced bash code block."""
    return ["```bash", *lines, "```"]


def write_report(
    out: Path, title: str, settings: str, sections: list[tuple[str, list[str]]]
) -> Path:
    """Write ``out/report.md``: ``# title``, the settings line, then each ``## heading``
    with its lines; return its path."""
    lines = [f"# {title}", "", settings, ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", *body, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with a final newline."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
