"""The summary of ``safesteer eval``: rates per judge with bootstrap CIs, response lengths, the
printed table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from safesteer.evaluation.answer_rate import answer_rate_section
from safesteer.evaluation.eval_options import EvalOptions
from safesteer.evaluation.judges.base import Verdict, agreement, is_judged
from safesteer.evaluation.metrics import (
    classifier_metrics,
    count_empty,
    format_ci,
    pooled_avg,
    pooled_avg_ci,
    refusal_rate_ci,
    refusal_rates,
)
from safesteer.evaluation.suites import Suite, benchmark_of

# --------------------------------------------------------------------------------------------
# summary


def _judge_block(
    rows: Sequence[dict[str, Any]], judge: str, suite: Suite, n_boot: int, seed: int
) -> dict[str, Any]:
    verdicts = [r["judges"].get(judge) for r in rows]
    labels = [r["label"] for r in rows]
    subsets = [r["subset"] for r in rows]
    rates = refusal_rates(labels, subsets, verdicts)
    block: dict[str, Any] = {"subsets": {}, "benchmarks": {}}
    for subset, info in rates.items():
        members = [v for v, s in zip(verdicts, subsets, strict=True) if s == subset]
        rate = info["refusal_rate"]
        ci = (
            refusal_rate_ci(members, n_boot=n_boot, seed=seed)
            if rate is not None and n_boot
            else None
        )
        block["subsets"][subset] = {
            **info,
            "benchmark": benchmark_of(subset),
            "refusal_ci95": list(ci) if ci else None,
            "compliance_rate": None if rate is None else 100.0 - rate,
        }
    by_bench: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subsets):
        by_bench[benchmark_of(s)].append(i)
    for bench, idx in by_bench.items():
        block["benchmarks"][bench] = _avg_with_ci(
            [labels[i] for i in idx], [verdicts[i] for i in idx], n_boot, seed
        )
    main = [i for i, s in enumerate(subsets) if s in suite.main_subsets] or list(range(len(rows)))
    main_avg = _avg_with_ci([labels[i] for i in main], [verdicts[i] for i in main], n_boot, seed)
    block["main_avg"], block["main_avg_ci95"] = main_avg["avg"], main_avg["avg_ci95"]
    block["main_subsets"] = sorted({subsets[i] for i in main})
    block["pooled_avg"] = _avg_with_ci(labels, verdicts, 0, seed)["avg"]
    block["n_empty"] = count_empty(verdicts)
    block["n_unparsable"] = sum(1 for v in verdicts if v is None)
    weighted: dict[str, float] = {}
    for name, weights in suite.weighted.items():
        parts = [
            (w, block["subsets"][s]["compliance_rate"])
            for s, w in weights.items()
            if s in block["subsets"]
        ]
        if len(parts) == len(weights) and all(rate is not None for _, rate in parts):
            weighted[name] = sum(w * rate for w, rate in parts) / sum(w for w, _ in parts)
    if weighted:
        block["weighted"] = weighted
    return block


def _avg_with_ci(
    labels: list[str], verdicts: list[Verdict], n_boot: int, seed: int
) -> dict[str, Any]:
    if not any(is_judged(v) for v in verdicts):
        return {"avg": None, "avg_ci95": None}
    avg = pooled_avg(labels, verdicts)
    ci = pooled_avg_ci(labels, verdicts, n_boot=n_boot, seed=seed) if n_boot else None
    return {"avg": avg, "avg_ci95": list(ci) if ci else None}


def response_lengths(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean response length in words per subset (answer rates are read beside it: an answer rate
    that rises while answers shrink to a few words is not an improvement)."""
    words: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        words[r["subset"]].append(len(str(r["response"]).split()))
    return {s: {"n": len(w), "mean_words": sum(w) / len(w)} for s, w in words.items() if w}


def interventions(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per subset, how many rows a method acted on: ``flagged`` (SafeSwitch's refusal head took
    over), ``steered`` (scans+safeswitch steered away from refusal), ``towards`` (steered
    towards it) and ``released`` (stage 1's flag vetoed by the second gate), out of ``n``.
    Only the columns a method records are counted; a method that records none gets no entry."""
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        acted = {
            k: r.get(k)
            for k in ("flagged", "steered", "towards", "released")
            if r.get(k) is not None
        }
        if not acted:
            continue
        entry = counts.setdefault(r["subset"], {"n": 0})
        entry["n"] += 1
        for key, value in acted.items():
            entry[key] = entry.get(key, 0) + bool(value)
    return counts


def summarise(rows: Sequence[dict[str, Any]], suite: Suite, options: EvalOptions) -> dict[str, Any]:
    """Rates, Avgs with bootstrap intervals, classifier quality and judge agreement per method."""
    methods = [m for m in options.methods if any(r["method"] == m for r in rows)]
    summary: dict[str, Any] = {
        "suite": suite.name,
        "metric": suite.metric,
        "n_prompts": len({r["id"] for r in rows}),
        "methods": methods,
        "judges": options.judges,
        "results": {},
        "classifier": {},
        "agreement": {},
        "utility": {},
        "lengths": {},
        "answer_rate": {},
        "interventions": {},
    }
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["id"])
        summary["results"][method] = {
            judge: _judge_block(mine, judge, suite, options.bootstrap, options.seed)
            for judge in options.judges
        }
        scored = [r for r in mine if r["score"] is not None]
        summary["classifier"][method] = (
            classifier_metrics(
                [r["label"] for r in scored],
                [r["score"] for r in scored],
                ["unsafe" if r["sigma"] > 0 else "safe" for r in scored],
            )
            if scored
            else None
        )
        pairs: dict[str, Any] = {}
        for i, a in enumerate(options.judges):
            for b in options.judges[i + 1 :]:
                result = agreement(
                    [r["judges"].get(a) for r in mine], [r["judges"].get(b) for r in mine]
                )
                pairs[f"{a}~{b}"] = {
                    "percent": result["percent_agreement"],
                    "kappa": result["kappa"],
                    "n_compared": result["n_compared"],
                    "disagreements": [mine[k]["id"] for k in result["disagreements"]],
                }
        summary["agreement"][method] = pairs
        utility: dict[str, Any] = {}
        for subset in dict.fromkeys(r["subset"] for r in mine):  # graded sets (TriviaQA)
            graded = [r for r in mine if r["subset"] == subset and r.get("correct") is not None]
            if graded:
                accuracy = 100.0 * sum(bool(r["correct"]) for r in graded) / len(graded)
                utility[subset] = {"n": len(graded), "accuracy": accuracy}
        if utility:
            summary["utility"][method] = utility
        summary["lengths"][method] = response_lengths(mine)
        acted = interventions(mine)
        if acted:
            summary["interventions"][method] = acted
    ordered = [r for m in methods for r in rows if r["method"] == m]
    summary["answer_rate"] = answer_rate_section(
        ordered, options.judges, options.bootstrap, options.seed
    )
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """One table per judge: methods × subsets, plus the main Avg."""
    for judge in summary["judges"]:
        first = next(iter(summary["results"].values()), {}).get(judge)
        if first is None:
            continue
        subsets = list(first["subsets"])
        word = "compliance" if summary["metric"] == "compliance" else "refusal"
        table = Table(title=f"{summary['suite']}: {word} % ({judge} judge)")
        table.add_column("method")
        for subset in subsets:
            table.add_column(subset, justify="right")
        table.add_column("main Avg", justify="right")
        table.add_column("empty", justify="right")  # degenerate responses: in no rate or Avg
        for method, by_judge in summary["results"].items():
            block = by_judge[judge]
            cells = []
            for subset in subsets:
                info = block["subsets"].get(subset, {})
                value = info.get(f"{word}_rate")
                cells.append("-" if value is None else f"{value:.2f}")
            avg = block["main_avg"]
            table.add_row(
                method, *cells, "-" if avg is None else f"{avg:.2f}", str(block.get("n_empty", 0))
            )
        Console().print(table)
        for method, by_subset in summary.get("answer_rate", {}).items():
            for subset, by_judge in by_subset.items():
                rate = by_judge.get(judge)
                if rate is not None:
                    interval = format_ci(rate["ci95"])
                    Console().print(
                        f"{subset} {method}: length-controlled answer rate {rate['rate']:.1f} %"
                        f"{' ' if interval else ''}{interval} ({judge} judge; answer rate "
                        f"{rate['plain_answer_rate']:.1f} %, median length ratio "
                        f"{rate['median_length_ratio']:.2f})"
                    )
