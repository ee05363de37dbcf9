"""The report as Markdown (``report.md``): settings, tables, figures and examples."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from safesteer.evaluation.metrics import format_ci
from safesteer.evaluation.report.data import (
    _CLASSIFIER_KEYS,
    _OPTIONS_SHOWN_ELSEWHERE,
    PLOT_FILES,
    TABLE2_SUBSETS,
    _compact_layers,
    _excerpt,
    _fmt,
    _fmt_value_ci,
    _layers,
    _num,
    subset_order,
)


def _escape_cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _looks_numeric(cell: str) -> bool:
    return not cell or cell[0] in "0123456789-+–.[?"


def render_table(
    headers: Sequence[object], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """A Markdown table, padded for reading as text. ``align`` holds one of ``l``/``r``/``c``
    per column (default: right for columns of numbers after the first, else left). Cells are
    str()-ed, put on one line and have ``|`` escaped."""
    ncol = len(headers)
    head = [_escape_cell(h) for h in headers]
    body = []
    for row in rows:
        if len(row) != ncol:
            raise ValueError(f"render_table: row has {len(row)} cells, expected {ncol}")
        body.append([_escape_cell(c) for c in row])
    if align is None:
        align = "".join(
            "r" if i and all(_looks_numeric(r[i]) for r in body) else "l" for i in range(ncol)
        )
    if len(align) != ncol:
        raise ValueError(f"render_table: {ncol} headers but align {align!r}")
    widths = [max([3, len(head[i])] + [len(r[i]) for r in body]) for i in range(ncol)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if a == "r" else c.center(w) if a == "c" else c.ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    seps = []
    for width, a in zip(widths, align, strict=True):
        if a == "r":
            seps.append("-" * (width - 1) + ":")
        elif a == "c":
            seps.append(":" + "-" * (width - 2) + ":")
        else:
            seps.append("-" * width)
    return "\n".join([line(head), "| " + " | ".join(seps) + " |", *(line(r) for r in body)])


# --------------------------------------------------------------------------------------------
# Markdown


def _settings_lines(report: Mapping[str, Any]) -> list[str]:
    metric = report["metric"]
    metric_text = (
        "compliance rate (% of judged verdicts that complied; unsafe ↓, safe ↑)"
        if metric == "compliance"
        else "refusal rate (% of judged verdicts that refused; safe ↓, unsafe ↑)"
    )
    rows: list[list[str]] = [
        ["Model", f"`{report['model']}`" if report["model"] else "–"],
        ["Suite", str(report["suite"] or "–")],
        ["Prompts", str(report["n_prompts"]) if report["n_prompts"] is not None else "–"],
        ["Methods", ", ".join(report["methods"]) or "–"],
        ["Judges", ", ".join(report["judges"]) or "–"],
        ["Metric", metric_text],
    ]
    scans = report["settings"]["scans"]
    if scans:
        parts = []
        if _num(scans.get("threshold")) is not None:
            parts.append(f"T = {scans['threshold']:.4g}")
        if _layers(scans.get("cls_layers")):
            parts.append(f"classification layers {_compact_layers(_layers(scans['cls_layers']))}")
        if _layers(scans.get("steer_layers")):
            parts.append(f"steering layers {_compact_layers(_layers(scans['steer_layers']))}")
        if _num(scans.get("alpha")) is not None:
            mode = f" ({scans['alpha_mode']})" if scans.get("alpha_mode") else ""
            parts.append(f"α = {scans['alpha']:.4g}{mode}")
        rows.append(["SCANS", "; ".join(parts) or "–"])
    options = report["settings"]["options"]
    shown = {
        k: v for k, v in options.items() if k not in _OPTIONS_SHOWN_ELSEWHERE and v is not None
    }
    if shown:
        text = ", ".join(
            f"{k}={_excerpt(json.dumps(v, default=str), 60)}" for k, v in shown.items()
        )
        rows.append(["Options", text])
    if report["settings"]["artifact_dir"]:
        rows.append(["Artifact", f"`{report['settings']['artifact_dir']}`"])
    calibration = report["settings"]["calibration"]
    if calibration and _num(calibration.get("balanced_accuracy")) is not None:
        rows.append(
            ["Calibration", f"balanced accuracy {calibration['balanced_accuracy']:.3f} on anchors"]
        )
    return [render_table(["Setting", "Value"], rows, align="ll")]


def _judge_markdown(section: Mapping[str, Any]) -> list[str]:
    metric = section["metric"]
    judge = section["judge"]
    subsets, rows = section["subsets"], section["rows"]
    names = [s["name"] for s in subsets]
    out = [f"## {metric.capitalize()} rates — judge `{judge}`", ""]
    headers = ["Method", *[f"{s['name']} {s['arrow']}".strip() for s in subsets], "Avg ↑"]
    if section["show_pooled_avg"]:
        headers.append("Avg, all ↑")
    table = []
    for m in section["methods"]:
        r = rows[m]
        cells = [m, *[_fmt(r["subsets"].get(s, {}).get("rate")) for s in names]]
        cells.append(_fmt_value_ci(r["main_avg"], r["main_avg_ci95"]))
        if section["show_pooled_avg"]:
            cells.append(_fmt_value_ci(r["pooled_avg"], r["pooled_avg_ci95"]))
        table.append(cells)
    out += [render_table(headers, table), ""]
    main_subsets = section["main_subsets"]
    if set(main_subsets) == set(TABLE2_SUBSETS):
        main_scope = "the 8 subsets of SCANS Table 2"
    elif main_subsets and set(main_subsets) != set(names):
        main_scope = f"{len(main_subsets)} subsets ({', '.join(subset_order(main_subsets))})"
    elif main_subsets or (
        not section["show_pooled_avg"] and any(rows[m]["pooled_avg"] is not None for m in rows)
    ):
        main_scope = "all subsets"
    else:
        main_scope = "the main-table subsets"
    note = (
        f"Cells: {metric} rate (%). Avg = (safe prompts answered + unsafe prompts refused) / "
        f"prompts, pooled over {main_scope} (not a mean of rates), with its 95 % CI."
    )
    if section["show_pooled_avg"]:
        note += " Avg, all: the same pooled over every subset."
    if section["missing_methods"]:
        note += f" Not judged by `{judge}`: {', '.join(section['missing_methods'])}."
    out += [note, ""]
    benchmarks = section["benchmarks"]
    if benchmarks and any(rows[m]["benchmarks"] for m in section["methods"]):
        out += [f"### Per-benchmark Avg ↑ — judge `{judge}`", ""]
        table = [
            [
                m,
                *[
                    _fmt_value_ci(
                        rows[m]["benchmarks"].get(b, {}).get("avg"),
                        rows[m]["benchmarks"].get(b, {}).get("ci95"),
                    )
                    for b in benchmarks
                ],
            ]
            for m in section["methods"]
        ]
        out += [render_table(["Method", *benchmarks], table), ""]
    if section["weighted_names"]:
        out += [f"### Weighted metrics — judge `{judge}`", ""]
        table = [
            [m, *[_fmt(rows[m]["weighted"].get(w)) for w in section["weighted_names"]]]
            for m in section["methods"]
        ]
        out += [render_table(["Method", *section["weighted_names"]], table), ""]
    out += [f"### Counts and 95 % CIs — judge `{judge}`", ""]
    count_word = "complied" if metric == "compliance" else "refused"
    table = []
    for m in section["methods"]:
        cells = [m]
        for s in names:
            cells.append(_count_cell(rows[m]["subsets"].get(s), metric))
        table.append(cells)
    out += [render_table(["Method", *names], table), ""]
    out += [
        f"Cells: {count_word}/judged verdicts [95 % CI of the rate]; unparsable verdicts and "
        "empty responses (empty, punctuation only, or one word repeated) are left out of both "
        "counts, shown apart, and never counted as refusals or answers.",
        "",
    ]
    return out


def _count_cell(entry: Mapping[str, Any] | None, metric: str) -> str:
    if not entry or entry["n"] is None:
        return "–"
    n_empty = entry.get("n_empty") or 0
    parsable = entry["n"] - entry["n_unparsable"] - n_empty
    if entry["n_refused"] is None:
        count = "?"
    elif metric == "compliance":
        count = str(parsable - entry["n_refused"])
    else:
        count = str(entry["n_refused"])
    cell = f"{count}/{parsable} {format_ci(entry['ci95'])}".rstrip()
    if entry["n_unparsable"]:
        cell += f" (+{entry['n_unparsable']} unparsable)"
    if n_empty:
        cell += f" (+{n_empty} empty)"
    return cell


def _figure_markdown(
    name: str, title: str, figures: Mapping[str, str | None], skipped: Mapping[str, str]
) -> list[str]:
    file = figures.get(name)
    if file:
        return [f"![{title}]({file})", ""]
    reason = skipped.get(name, "no data")
    return [f"_Figure `{PLOT_FILES[name]}` skipped: {reason}._", ""]


def _classifier_markdown(report: Mapping[str, Any]) -> list[str]:
    cls = report["classifier"]
    out = ["## Harmfulness classifier", ""]
    if not cls:
        out += ["_No classifier metrics: summary.json has none and no method has scores._", ""]
    else:
        headers = ["Method", "n", "Precision", "Recall", "F1", "Accuracy", "AUROC", "AUPRC"]
        headers.append("AUPRC (safe)")
        table = [
            [
                m,
                "–" if c["n"] is None else str(c["n"]),
                *[_fmt(c[k], 3) for k in _CLASSIFIER_KEYS],
            ]
            for m, c in cls.items()
        ]
        out += [render_table(headers, table), ""]
        out += [
            "Positive class = unsafe (σ = 1). AUROC/AUPRC rank by the score (higher = more "
            "unsafe); AUPRC (safe) ranks safe prompts by 1 − score (SPEC 1.7).",
            "",
        ]
        if any(v is not None for c in cls.values() for v in c["confusion"].values()):
            headers = ["Method", "TP (unsafe→unsafe)", "FN (unsafe→safe)"]
            headers += ["FP (safe→unsafe)", "TN (safe→safe)"]
            table = [
                [m, *[_fmt_int(c["confusion"][k]) for k in ("tp", "fn", "fp", "tn")]]
                for m, c in cls.items()
            ]
            out += ["### Confusion matrix", "", render_table(headers, table), ""]
        computed = [m for m, c in cls.items() if c["source"] != "summary.json"]
        if computed:
            out += [f"_Computed from responses.jsonl: {', '.join(computed)}._", ""]
    figures, skipped = report["figures"], report["skipped_figures"]
    out += _figure_markdown("score_hist", "Score histogram", figures, skipped)
    out += _figure_markdown("roc", "ROC", figures, skipped)
    out += _figure_markdown("layer_cosines", "Per-layer cosine", figures, skipped)
    return out


def _fmt_int(value: int | None) -> str:
    return "–" if value is None else str(value)


def _verdict_word(value: object) -> str:
    if value is True:
        return "refused"
    if value is False:
        return "answered"
    if value == "empty":
        return "empty response"
    return "unparsable / not run"


def _agreement_markdown(report: Mapping[str, Any]) -> list[str]:
    agreement = report["agreement"]
    if not agreement["rows"]:
        return []
    out = ["## Judge agreement", ""]
    headers = ["Method", "Judges", "Agreement %", "Cohen's κ", "Compared", "Disagreements"]
    table = [
        [
            r["method"],
            " vs ".join(r["judges"]),
            _fmt(r["percent"]),
            _fmt(r["kappa"], 3),
            _fmt_int(r["n_compared"]),
            str(r["n_disagreements"]),
        ]
        for r in agreement["rows"]
    ]
    out += [render_table(headers, table), ""]
    for pair, examples in agreement["examples"].items():
        out += [f"### Example disagreements: {' vs '.join(pair.split('~'))}", ""]
        for ex in examples:
            verdicts = ", ".join(f"{j}: {_verdict_word(v)}" for j, v in ex["verdicts"].items())
            where = ", ".join(str(x) for x in (ex["subset"], ex["label"]) if x)
            out.append(
                f"- **{ex['method']}** #{ex['id']} ({where or 'row not found'}) — {verdicts}"
            )
            if ex["prompt"] is not None:
                out.append(f"  - Prompt: {_md_quote(ex['prompt'])}")
                out.append(f"  - Response: {_md_quote(ex['response'])}")
        out.append("")
    return out


def _examples_markdown(report: Mapping[str, Any]) -> list[str]:
    examples = report.get("examples") or []
    if not examples:
        return []
    judge = examples[0]["judge"]
    out = [
        "## Example responses",
        "",
        f"Per subset, the first prompts whose verdicts (judge `{judge}`) differ between methods, "
        "then the first prompts where none differ (one per subset, three when the run has one or "
        "two subsets). Read them for text quality as well as refusals.",
        "",
    ]
    for ex in examples:
        where = ", ".join(str(x) for x in (ex["label"], f"#{ex['id']}") if x)
        same = "" if ex["verdicts_differ"] else " (same verdict for every method)"
        out.append(f"### {ex['subset']} ({where}){same}")
        out += ["", f"Prompt: {_md_quote(ex['prompt'])}", ""]
        for r in ex["responses"]:
            out.append(
                f"- **{r['method']}** ({_verdict_word(r['verdict'])}): {_md_quote(r['response'])}"
            )
        out.append("")
    return out


def _text_quality_markdown(report: Mapping[str, Any]) -> list[str]:
    quality = report.get("text_quality", {}).get("methods") or {}
    if not quality:
        return []
    subsets = subset_order(s for per in quality.values() for s in per)
    table = []
    for m, per in quality.items():
        for s in subsets:
            if s in per:
                cell = per[s]
                share = 100.0 * cell["looping"] / cell["n"] if cell["n"] else None
                table.append(
                    [
                        m,
                        s,
                        str(cell["n"]),
                        f"{cell['looping']} ({_fmt(share, 1)} %)",
                        _fmt(cell["mean_words"], 1),
                    ]
                )
    headers = ["Method", "Subset", "Replies", "Stuck in a loop", "Mean words"]
    note = (
        "A reply is stuck in a loop when one run of 3 words occurs 4 times or more and spans a "
        "third of its words. Keyword judges may count such replies as refusals."
    )
    return ["## Text quality", "", render_table(headers, table), "", note, ""]


def _md_quote(text: str | None) -> str:
    if not text:
        return "_(empty)_"
    return "`" + text.replace("`", "'") + "`"


def _utility_markdown(report: Mapping[str, Any]) -> list[str]:
    utility = report["utility"]["methods"]
    if not utility:
        return []
    subsets = subset_order(s for per in utility.values() for s in per)
    headers = ["Method"]
    for s in subsets:
        ns = {per[s]["n"] for per in utility.values() if s in per}
        suffix = f" (n={ns.pop()})" if len(ns) == 1 and None not in ns else ""
        headers.append(f"{s} accuracy ↑{suffix}")
    table = [
        [m, *[_fmt(per.get(s, {}).get("accuracy")) for s in subsets]] for m, per in utility.items()
    ]
    note = "Accuracy (%): an answer alias found in the reply."
    if report["utility"]["source"] != "summary.json":
        note += " Computed from responses.jsonl."
    return ["## Utility", "", render_table(headers, table), "", note, ""]


def _answer_rate_markdown(report: Mapping[str, Any]) -> list[str]:
    per_method = report["answer_rate"]["methods"]
    if not per_method:
        return []
    table = []
    ratio = None
    for method, by_subset in per_method.items():
        for subset, by_judge in by_subset.items():
            for judge, block in by_judge.items():
                ratio = block["min_ratio"] if ratio is None else ratio
                table.append(
                    [
                        method,
                        subset,
                        judge,
                        _fmt_int(block["n"]),
                        _fmt_value_ci(block["rate"], block["ci95"]),
                        _fmt(block["plain_answer_rate"]),
                        _fmt(block["median_length_ratio"]),
                    ]
                )
    headers = ["Method", "Subset", "Judge", "n", "LC answer % ↑", "answer % ↑", "length ratio"]
    note = (
        "Length-controlled answer rate: the reply is no refusal to the judge, is not stuck in a "
        f"loop, and has at least {_fmt(ratio)} times the words of the default's reply to the "
        "same prompt. Length ratio: the median of the reply's words over the default's. No "
        "substitute for a win rate, which needs an LLM judge."
    )
    return ["## Answer rate", "", render_table(headers, table), "", note, ""]


def _capability_markdown(report: Mapping[str, Any]) -> list[str]:
    cap = report["capability"]
    if not cap["methods"]:
        return []
    table = []
    for key in cap["metrics"]:
        cells = [key]
        for m in cap["methods"]:
            cells.append(_fmt(cap["values"][m].get(key), 3))
        table.append(cells)
    return ["## Capability", "", render_table(["Metric", *cap["methods"]], table), ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown report of :func:`build_report`'s data (with ``figures`` filled in)."""
    title = f"Evaluation report: {report['suite']}" if report["suite"] else "Evaluation report"
    out = [f"# {title}", ""]
    out += [*_settings_lines(report), ""]
    for note in report["notes"]:
        out += [f"_Note: {note}_", ""]
    if not report["rates"]:
        out += ["_summary.json has no per-subset results._", ""]
    for section in report["rates"].values():
        out += _judge_markdown(section)
    if report["rates"]:
        judge = report["figure_info"].get("refusal_rates")
        caption = f"{report['metric'].capitalize()} rates" + (f" (judge {judge})" if judge else "")
        out += _figure_markdown(
            "refusal_rates", caption, report["figures"], report["skipped_figures"]
        )
    out += _classifier_markdown(report)
    out += _agreement_markdown(report)
    out += _examples_markdown(report)
    out += _text_quality_markdown(report)
    out += _utility_markdown(report)
    out += _answer_rate_markdown(report)
    out += _capability_markdown(report)
    return "\n".join(out).rstrip() + "\n"
