"""The report scaffolding the two demos share (kdkit.demo.report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdkit.demo.report import (
    bash_block,
    figure,
    image_grid,
    image_lines,
    markdown_table,
    mean_std,
    quick_note,
    settings_line,
    summarize,
    write_json,
    write_report,
)


def test_summarize_is_mean_and_population_std_over_seeds():
    summary = summarize({"a": [{"acc": 0.5, "ppl": 2.0}, {"acc": 0.7, "ppl": 4.0}]})
    assert summary == {"a": {"acc": pytest.approx((0.6, 0.1)), "ppl": (3.0, 1.0)}}


def test_mean_std_and_markdown_table():
    assert mean_std((0.1234, 0.005)) == "12.3 ± 0.5"
    assert mean_std((217.971, 14.123), ".2f", scale=1) == "217.97 ± 14.12"
    table = markdown_table("note", ["model", "x"], [["a", "1.0"], ["long name", "2.0 ± 0.1"]])
    assert table.splitlines() == [
        "note",
        "",
        "| model     | x         |",
        "|-----------|-----------|",
        "| a         | 1.0       |",
        "| long name | 2.0 ± 0.1 |",
    ]


def test_write_report_lays_out_sections(tmp_path):
    settings = settings_line(True, 2, "students 3 steps", 1.25)
    assert settings == "Settings: quick (CI) 2 seed(s), students 3 steps; wall time 1.2 s."
    sections = [
        ("Results", [*quick_note("steps", "kdkit demo --lm"), "table"]),
        ("Plots", image_lines(["a.png"])),
        ("CLI", bash_block(["kdkit demo"])),
    ]
    path = write_report(tmp_path, "title", settings, sections)
    assert path == tmp_path / "report.md"
    assert path.read_text(encoding="utf-8") == (
        f"# title\n\n{settings}\n\n## Results\n\n"
        "**--quick**: a few steps to exercise the pipeline in CI; these numbers are not "
        "meaningful. Run `kdkit demo --lm` for the real comparison.\n\ntable\n\n"
        "## Plots\n\n![a.png](a.png)\n\n## CLI\n\n```bash\nkdkit demo\n```\n"
    )


def test_write_json(tmp_path):
    write_json(tmp_path / "r.json", {"a": (1.0, 0.0)})
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text) == {"a": [1.0, 0.0]}


def test_figure_saves_a_png_with_labels(tmp_path):
    pytest.importorskip("matplotlib")
    with figure(tmp_path / "f.png", height=3, legend=8, xlabel="step", title="t") as ax:
        ax.plot([1, 2], [3, 4], label="line")
    assert ax.get_xlabel() == "step" and ax.get_title() == "t"
    assert ax.get_legend() is not None
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_figure_saves_nothing_when_drawing_fails(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(KeyError), figure(tmp_path / "f.png"):
        raise KeyError("no such metric")
    assert not (tmp_path / "f.png").exists()


def test_image_grid_saves_a_png_and_checks_its_labels(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    cells = [[np.zeros((8, 8)), np.ones((8, 8))], [np.eye(8), np.full((8, 8), 2.0)]]
    path = image_grid(tmp_path / "g.png", cells, ["r0", "r1"], ["a", "b"], vmin=0.0, vmax=1.0)
    assert path == tmp_path / "g.png" and path.read_bytes()[:4] == b"\x89PNG"
    width, height = Image.open(path).size
    assert width > height  # 2 columns + row labels are wider than 2 rows + titles
    with pytest.raises(ValueError, match="1 row and 2 column labels for a grid of \\[2, 2\\]"):
        image_grid(tmp_path / "h.png", cells, ["r0"], ["a", "b"], vmin=0.0, vmax=1.0)
    assert not (tmp_path / "h.png").exists()
