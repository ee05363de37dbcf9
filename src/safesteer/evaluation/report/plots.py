"""The report's PNG figures: refusal rates, per-layer cosines, score histograms and ROC curves."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
from safesteer.evaluation.report.data import RunData, _layers, _num, _ordered, _scans_settings
from safesteer.evaluation.report.tables import _rows_by_method, _scored, _threshold_applies

DPI = 120
_MAX_FLAT_TICKS = 12
_MAX_HIST_PANELS = 6


class _SkipPlot(Exception):
    """A figure has no data; the message says which."""


# --------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _colors(methods: Sequence[str]) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _plot_rates(report: Mapping[str, Any], path: Path) -> str:
    """Grouped bars of the first judge's rates (subsets × methods); returns the judge."""
    if not report["rates"]:
        raise _SkipPlot("summary.json has no per-subset results")
    judge, section = next(iter(report["rates"].items()))
    subsets, methods = section["subsets"], section["methods"]
    values = {
        m: [section["rows"][m]["subsets"].get(s["name"], {}).get("rate") for s in subsets]
        for m in methods
    }
    if not subsets or all(v is None for vals in values.values() for v in vals):
        raise _SkipPlot(f"judge `{judge}` has no rates")
    metric = section["metric"]
    colors = _colors(report["methods"])
    fig = _figure(min(18.0, max(7.5, 1.15 * min(len(subsets), _MAX_FLAT_TICKS) + 3.0)), 4.6)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        cis = [section["rows"][m]["subsets"].get(s["name"], {}).get("ci95") for s in subsets]
        heights = [math.nan if v is None else v for v in values[m]]
        low = [
            0.0 if v is None or c is None else max(0.0, v - c[0])
            for v, c in zip(values[m], cis, strict=True)
        ]
        high = [
            0.0 if v is None or c is None else max(0.0, c[1] - v)
            for v, c in zip(values[m], cis, strict=True)
        ]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(subsets))]
        ax.bar(
            xs,
            heights,
            width,
            label=m,
            color=colors.get(m),
            yerr=[low, high],
            capsize=2,
            error_kw={"elinewidth": 0.8, "alpha": 0.7},
        )
    rotate = len(subsets) > _MAX_FLAT_TICKS
    sep = " " if rotate else "\n"
    labels = [
        f"{s['name']}{sep}({s['label']} {s['arrow']})" if s["label"] else s["name"] for s in subsets
    ]
    ax.set_xticks(range(len(subsets)), labels=labels, fontsize=8)
    if rotate:
        for tick in ax.get_xticklabels():
            tick.set(rotation=35, horizontalalignment="right", rotation_mode="anchor")
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"{metric} rate (%)")
    ax.set_title(f"{metric.capitalize()} rate by subset (judge: {judge}; 95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    _save(fig, path)
    return str(judge)


def _plot_layer_cosines(run: RunData, report: Mapping[str, Any], path: Path) -> str:
    by_method = _rows_by_method(run)
    candidates = [m for m in report["methods"] if m in by_method]
    candidates = _ordered([m for m in candidates if m.lower().startswith("scans")], candidates)
    for method in candidates:
        pairs = [
            (str(r["label"]), [float(c) for c in r["layer_cosines"]])
            for r in by_method[method]
            if r.get("label") in ("safe", "unsafe")
            and isinstance(r.get("layer_cosines"), list)
            and r["layer_cosines"]
            and all(_num(c) is not None for c in r["layer_cosines"])
        ]
        if pairs:
            break
    else:
        raise _SkipPlot("no row of responses.jsonl has `layer_cosines`")
    import numpy as np

    k = Counter(len(c) for _, c in pairs).most_common(1)[0][0]
    pairs = [(lab, c) for lab, c in pairs if len(c) == k]
    layers = _layers(_scans_settings(run).get("cls_layers"))
    if len(layers) == k:
        x = np.array(layers, dtype=float)
        xlabel = "layer (classification layers)"
    else:
        x = np.arange(k, dtype=float)
        xlabel = "position in layer_cosines (cls_layers unknown)"
    order = np.argsort(x, kind="stable")
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    for label, color in (("safe", "tab:blue"), ("unsafe", "tab:red")):
        data = np.array([c for lab, c in pairs if lab == label], dtype=float)
        if data.size == 0:
            continue
        mean, std = data.mean(axis=0)[order], data.std(axis=0)[order]
        ax.plot(x[order], mean, marker="o", ms=3, color=color, label=f"{label} (n={len(data)})")
        ax.fill_between(x[order], mean - std, mean + std, color=color, alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cosine to unsafe reference")
    ax.set_title(f"Per-layer cosine to the unsafe reference (method: {method}; ±1 std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return method


def _plot_score_hist(run: RunData, report: Mapping[str, Any], path: Path) -> list[str]:
    by_method = _rows_by_method(run)
    scored = {m: _scored(by_method.get(m, [])) for m in report["methods"]}
    methods = [m for m, s in scored.items() if s][:_MAX_HIST_PANELS]
    if not methods:
        raise _SkipPlot("no row of responses.jsonl has a `score`")
    import numpy as np

    threshold = _num(_scans_settings(run).get("threshold"))
    ncols = min(3, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.6 * ncols + 0.6, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, m in zip(axes.flat, methods, strict=False):
        scores = np.array([s for s, _, _ in scored[m]], dtype=float)
        lo, hi = float(scores.min()), float(scores.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        for label, color in (("safe", "tab:blue"), ("unsafe", "tab:red")):
            vals = [s for s, lab, _ in scored[m] if lab == label]
            if vals:
                ax.hist(vals, bins=bins, alpha=0.55, color=color, label=f"{label} (n={len(vals)})")
        if threshold is not None and _threshold_applies(m, scored[m], threshold):
            ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"T = {threshold:.3g}")
        ax.set_title(f"Scores: {m}")
        ax.set_xlabel("score (higher = more unsafe)")
        ax.set_ylabel("prompts")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    _save(fig, path)
    return methods


def _plot_roc(run: RunData, report: Mapping[str, Any], path: Path) -> list[str]:
    by_method = _rows_by_method(run)
    curves = []
    for m in report["methods"]:
        scored = _scored(by_method.get(m, []))
        labels = {lab for _, lab, _ in scored}
        if labels == {"safe", "unsafe"}:
            curves.append((m, scored))
    if not curves:
        raise _SkipPlot("no method has scores for both safe and unsafe prompts")
    from sklearn.metrics import roc_auc_score, roc_curve

    colors = _colors(report["methods"])
    fig = _figure(5.4, 5.0)
    ax: Axes = fig.add_subplot()
    for m, scored in curves:
        y = [lab == "unsafe" for _, lab, _ in scored]
        s = [score for score, _, _ in scored]
        fpr, tpr, _ = roc_curve(y, s)
        auc = float(roc_auc_score(y, s))
        ax.plot(fpr, tpr, color=colors.get(m), lw=1.6, label=f"{m} (AUROC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (safe flagged unsafe)")
    ax.set_ylabel("true positive rate (unsafe flagged)")
    ax.set_title("ROC of the harmfulness score (positive = unsafe)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return [m for m, _ in curves]
