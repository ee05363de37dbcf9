"""Reports of an evaluation run: Markdown and JSON tables and PNG figures, from files only.

`safesteer eval` writes ``settings.json``, ``responses.jsonl`` and ``summary.json`` into a run
directory. :func:`write_report` reads them (it never loads a model) and writes ``report.md``,
``report.json`` and the figures next to them. Rates and Avg are percentages (0-100); classifier
metrics are fractions (0-1). Every optional part of the input may be missing: the matching table
or figure is left out and the Markdown says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safesteer.evaluation.report.data import (
    PLOT_FILES,
    REPORT_JSON,
    REPORT_MD,
    TABLE2_SUBSETS,
    ReportError,
    RunData,
    _jsonable,
    load_run,
    subset_order,
)
from safesteer.evaluation.report.plots import (
    _plot_layer_cosines,
    _plot_rates,
    _plot_roc,
    _plot_score_hist,
    _SkipPlot,
)
from safesteer.evaluation.report.tables import build_report
from safesteer.evaluation.report.text import render_markdown, render_table

__all__ = [
    "PLOT_FILES",
    "TABLE2_SUBSETS",
    "ReportError",
    "RunData",
    "build_report",
    "load_run",
    "render_markdown",
    "render_table",
    "subset_order",
    "write_report",
]


# --------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dir: str | Path, *, artifact_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the figures into ``run_dir``.

    Returns name -> path of what was written: ``markdown``, ``json`` and one entry per figure
    drawn (``refusal_rates``, ``layer_cosines``, ``score_hist``, ``roc``). A figure without data
    is skipped (a stale file of that name is removed) and the Markdown says why. Raises
    :class:`ReportError` when the run directory lacks ``summary.json`` or a file is malformed.
    """
    run = load_run(run_dir, artifact_dir)
    report = build_report(run)
    root = run.run_dir
    figures: dict[str, str | None] = {}
    skipped: dict[str, str] = {}
    info: dict[str, Any] = {}
    written: dict[str, Path] = {}
    plots = {
        "refusal_rates": lambda p: _plot_rates(report, p),
        "layer_cosines": lambda p: _plot_layer_cosines(run, report, p),
        "score_hist": lambda p: _plot_score_hist(run, report, p),
        "roc": lambda p: _plot_roc(run, report, p),
    }
    for name, draw in plots.items():
        path = root / PLOT_FILES[name]
        try:
            info[name] = draw(path)
        except _SkipPlot as exc:
            skipped[name] = str(exc)
            figures[name] = None
            path.unlink(missing_ok=True)
            continue
        figures[name] = PLOT_FILES[name]
        written[name] = path
    report["figures"] = figures
    report["skipped_figures"] = skipped
    report["figure_info"] = info
    md_path = root / REPORT_MD
    md_path.write_text(render_markdown(report), encoding="utf-8")
    json_path = root / REPORT_JSON
    json_path.write_text(
        json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    return {"markdown": md_path, "json": json_path, **written}
