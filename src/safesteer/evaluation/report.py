"""Reports of an evaluation run: Markdown and JSON tables and PNG figures, from files only.

`safesteer eval` writes ``settings.json``, ``responses.jsonl`` and ``summary.json`` into a run
directory. :func:`write_report` reads them (it never loads a model) and writes ``report.md``,
``report.json`` and the figures next to them. Rates and Avg are percentages (0-100); classifier
metrics are fractions (0-1). Every optional part of the input may be missing: the matching table
or figure is left out and the Markdown says why.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safesteer.evaluation.suites import SCANS_TABLE2
from safesteer.models.layers import compact_ranges

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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

SETTINGS_FILE = "settings.json"
RESPONSES_FILE = "responses.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOT_FILES = {
    "refusal_rates": "refusal_rates.png",
    "layer_cosines": "layer_cosines.png",
    "score_hist": "score_hist.png",
    "roc": "roc.png",
}
DPI = 120

# Column order of SCANS Table 2, then the paired sets the main table omits, then SafeSwitch's sets.
TABLE2_SUBSETS = SCANS_TABLE2
_KNOWN_ORDER = (
    *TABLE2_SUBSETS,
    "harmfulq",
    "heldout-harmless",
    "sorry-bench-eval",
    "trustllm-misuse-eval",
    "trustllm-jailbreak-eval",
    "trustllm-exaggerated-safety",
)
_CLASSIFIER_KEYS = ("precision", "recall", "f1", "accuracy", "auroc", "auprc", "auprc_safe")
_CONFUSION_KEYS = ("tp", "fp", "tn", "fn")
_OPTIONS_SHOWN_ELSEWHERE = frozenset({"suite", "methods", "judges", "model"})
_CAPABILITY_SETTINGS = frozenset(
    {
        "batch_size",
        "seed",
        "limit",
        "window",
        "max_windows",
        "max_new_tokens",
        "max_prompt_tokens",
        "max_document_tokens",
        "k_shot",
        "limit_per_subject",
        "repetition_penalty",
        "n_shots_reduced",
        "n_text_tokens",
        "n_documents_truncated",
    }
)
_CAPABILITY_SKIP = frozenset(
    {"per_subject", "samples", "intervention", "per_pair", "subjects", "answer_token_ids"}
)
_MAX_EXAMPLES = 5
_MAX_FLAT_TICKS = 12
_MAX_HIST_PANELS = 6


class ReportError(ValueError):
    """A run directory cannot be reported on: a file is missing or malformed."""


@dataclass
class RunData:
    """The files of one run directory, parsed."""

    run_dir: Path
    summary: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    responses: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    artifact_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


class _SkipPlot(Exception):
    """A figure has no data; the message says which."""


# --------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); rerun `safesteer eval`.") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{lineno} is not valid JSON ({exc}).") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(run_dir: str | Path, artifact_dir: str | Path | None = None) -> RunData:
    """Read a run directory written by `safesteer eval` (and optionally a SCANS artifact's
    ``manifest.json``, used for the threshold and layers when ``settings.json`` lacks them)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(
            f"{root} is not a directory; write a run directory with `safesteer eval` first."
        )
    summary_path = root / SUMMARY_FILE
    if not summary_path.is_file():
        raise ReportError(
            f"{root} has no {SUMMARY_FILE}: it is not a finished `safesteer eval` run directory. "
            "Run `safesteer eval` with this output directory first."
        )
    run = RunData(run_dir=root, summary=_read_json(summary_path))
    settings_path = root / SETTINGS_FILE
    if settings_path.is_file():
        run.settings = _read_json(settings_path)
    else:
        run.notes.append(f"{SETTINGS_FILE} is missing; settings are not shown.")
    responses_path = root / RESPONSES_FILE
    if responses_path.is_file():
        run.responses = _read_jsonl(responses_path)
    else:
        run.notes.append(f"{RESPONSES_FILE} is missing; figures and examples need it.")
    if artifact_dir is not None:
        run.artifact_dir = Path(artifact_dir)
        manifest_path = run.artifact_dir / "manifest.json"
        if not manifest_path.is_file():
            raise ReportError(f"{run.artifact_dir} is not a safesteer artifact (no manifest.json).")
        run.manifest = _read_json(manifest_path)
    return run


# --------------------------------------------------------------------------------------------
# Small helpers


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: object) -> float | None:
    """A finite number, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _int(value: object) -> int | None:
    num = _num(value)
    return None if num is None else int(num)


def _ci(value: object) -> tuple[float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = _num(value[0]), _num(value[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: Sequence[float] | None, digits: int = 1) -> str:
    return "" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _fmt_value_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{_fmt(value)} {_fmt_ci(ci)}".rstrip()


def _compact_layers(layers: Sequence[int]) -> str:
    """``[10, 11, 12, 15]`` -> ``10–12, 15``."""
    if not layers:
        return "–"
    return compact_ranges(sorted(set(layers)), dash="–")


def _excerpt(text: object, limit: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _escape_cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _ordered(preferred: Iterable[str], found: Iterable[str]) -> list[str]:
    """``preferred`` (those found), then the rest of ``found`` in order of appearance."""
    found_list = list(dict.fromkeys(found))
    head = [x for x in dict.fromkeys(preferred) if x in found_list]
    return head + [x for x in found_list if x not in head]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


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


def subset_order(subsets: Iterable[str]) -> list[str]:
    """SCANS Table 2's order, then HarmfulQ, held-out harmless and SafeSwitch's sets, then the
    rest alphabetically."""
    unique = set(subsets)
    known = [s for s in _KNOWN_ORDER if s in unique]
    return known + sorted(unique.difference(_KNOWN_ORDER))


def _arrow(label: str | None, metric: str) -> str:
    """↓ when a lower value is better, ↑ when higher is; '' for an unknown label."""
    if label not in ("safe", "unsafe"):
        return ""
    lower_is_better = (label == "safe") == (metric != "compliance")
    return "↓" if lower_is_better else "↑"


def _rate(entry: Mapping[str, Any], metric: str) -> tuple[float | None, tuple[float, float] | None]:
    """The subset's refusal (or compliance) rate and CI, derived from the other when missing."""
    refusal, compliance = _num(entry.get("refusal_rate")), _num(entry.get("compliance_rate"))
    r_ci, c_ci = _ci(entry.get("refusal_ci95")), _ci(entry.get("compliance_ci95"))
    if metric == "compliance":
        value = compliance if compliance is not None else None if refusal is None else 100 - refusal
        ci = c_ci or (None if r_ci is None else (100 - r_ci[1], 100 - r_ci[0]))
    else:
        value = refusal if refusal is not None else None if compliance is None else 100 - compliance
        ci = r_ci or (None if c_ci is None else (100 - c_ci[1], 100 - c_ci[0]))
    return value, ci


# --------------------------------------------------------------------------------------------
# Structured report


def _methods(run: RunData) -> list[str]:
    results = _dict(run.summary.get("results"))
    listed = [str(m) for m in _list(run.summary.get("methods"))]
    found = [*results, *(str(r.get("method")) for r in run.responses if r.get("method"))]
    return _ordered(listed, [*listed, *found])


def _judges(run: RunData) -> list[str]:
    listed = [str(j) for j in _list(run.summary.get("judges"))]
    found = [j for m in _dict(run.summary.get("results")).values() for j in _dict(m)]
    return _ordered(listed, [*listed, *found])


def _metric(run: RunData) -> str:
    metric = run.summary.get("metric")
    return "compliance" if metric == "compliance" else "refusal"


def _scans_settings(run: RunData) -> dict[str, Any]:
    """settings.json's ``scans`` block, filled in from the artifact manifest where missing."""
    merged: dict[str, Any] = {}
    if run.manifest is not None:
        merged.update(_dict(run.manifest.get("settings")))
    merged.update({k: v for k, v in _dict(run.settings.get("scans")).items() if v is not None})
    return merged


def _layers(value: object) -> list[int]:
    return [int(x) for x in _list(value) if _num(x) is not None]


def _judge_section(run: RunData, judge: str, methods: Sequence[str]) -> dict[str, Any] | None:
    metric = _metric(run)
    results = _dict(run.summary.get("results"))
    present = [m for m in methods if isinstance(_dict(results.get(m)).get(judge), dict)]
    if not present:
        return None
    info: dict[str, dict[str, Any]] = {}
    for m in present:
        for name, entry in _dict(results[m][judge].get("subsets")).items():
            slot = info.setdefault(str(name), {"label": None, "benchmark": None, "n": None})
            entry = _dict(entry)
            for key in ("label", "benchmark"):
                if slot[key] is None and isinstance(entry.get(key), str):
                    slot[key] = entry[key]
            if slot["n"] is None:
                slot["n"] = _int(entry.get("n"))
    order = subset_order(info)
    subsets = [
        {
            "name": s,
            "label": info[s]["label"],
            "benchmark": info[s]["benchmark"],
            "arrow": _arrow(info[s]["label"], metric),
            "n": info[s]["n"],
        }
        for s in order
    ]
    bench_seen = [info[s]["benchmark"] for s in order if info[s]["benchmark"]]
    bench_found = [b for m in present for b in _dict(results[m][judge].get("benchmarks"))]
    benchmarks = _ordered(bench_seen, [*bench_seen, *sorted(set(bench_found) - set(bench_seen))])
    rows: dict[str, Any] = {}
    for m in present:
        res = _dict(results[m][judge])
        subset_rows: dict[str, Any] = {}
        for s in order:
            entry = _dict(_dict(res.get("subsets")).get(s))
            if not entry:
                continue
            value, ci = _rate(entry, metric)
            subset_rows[s] = {
                "rate": value,
                "ci95": ci,
                "n": _int(entry.get("n")),
                "n_refused": _int(entry.get("n_refused")),
                "n_unparsable": _int(entry.get("n_unparsable")) or 0,
                "n_empty": _int(entry.get("n_empty")) or 0,
            }
        bench_rows = {
            b: {"avg": _num(_dict(e).get("avg")), "ci95": _ci(_dict(e).get("avg_ci95"))}
            for b, e in _dict(res.get("benchmarks")).items()
        }
        weighted = {str(k): _num(v) for k, v in _dict(res.get("weighted")).items()}
        rows[m] = {
            "subsets": subset_rows,
            "benchmarks": bench_rows,
            "main_avg": _num(res.get("main_avg")),
            "main_avg_ci95": _ci(res.get("main_avg_ci95")),
            "pooled_avg": _num(res.get("pooled_avg")),
            "pooled_avg_ci95": _ci(res.get("pooled_avg_ci95")),
            "weighted": weighted,
        }
    show_pooled = any(
        r["pooled_avg"] is not None
        and (r["main_avg"] is None or abs(r["pooled_avg"] - r["main_avg"]) > 1e-9)
        for r in rows.values()
    )
    weighted_names = list(dict.fromkeys(k for r in rows.values() for k in r["weighted"]))
    main_subsets = {
        str(s) for m in present for s in _list(_dict(results[m][judge]).get("main_subsets"))
    }
    return {
        "judge": judge,
        "metric": metric,
        "subsets": subsets,
        "benchmarks": benchmarks,
        "methods": present,
        "missing_methods": [m for m in methods if m not in present],
        "show_pooled_avg": show_pooled,
        "main_subsets": subset_order(main_subsets),
        "weighted_names": weighted_names,
        "rows": rows,
    }


def _rows_by_method(run: RunData) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in run.responses:
        out.setdefault(str(row.get("method")), []).append(row)
    return out


def _scored(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, str, int | None]]:
    """(score, label, sigma) of rows with a finite score and a safe/unsafe label."""
    out = []
    for row in rows:
        score, label = _num(row.get("score")), row.get("label")
        if score is not None and label in ("safe", "unsafe"):
            sigma = row.get("sigma")
            out.append((score, str(label), sigma if sigma in (1, -1) else None))
    return out


def _threshold_applies(
    method: str, scored: Sequence[tuple[float, str, int | None]], t: float
) -> bool:
    """Whether SCANS' threshold explains this method's decisions (σ = 1 iff score ≥ T), or, with
    no σ recorded, whether the method is SCANS by name."""
    with_sigma = [(s, sig) for s, _, sig in scored if sig is not None]
    if with_sigma:
        return all((sig == 1) == (s >= t - 1e-9) or abs(s - t) < 1e-6 for s, sig in with_sigma)
    return method.lower().startswith("scans")


def _classifier_section(run: RunData, methods: Sequence[str]) -> dict[str, Any]:
    summary_cls = run.summary.get("classifier")
    by_method = _rows_by_method(run)
    threshold = _num(_scans_settings(run).get("threshold"))
    out: dict[str, Any] = {}
    for m in methods:
        entry: dict[str, Any] | None = None
        source = "summary.json"
        if isinstance(summary_cls, dict) and m in summary_cls:
            entry = summary_cls[m] if isinstance(summary_cls[m], dict) else None
        else:
            entry = _computed_classifier(m, _scored(by_method.get(m, [])), threshold)
            source = "responses.jsonl"
        if entry is None:
            continue
        confusion = _dict(entry.get("confusion")) or entry
        out[m] = {
            "source": source,
            "n": _int(entry.get("n")),
            **{k: _num(entry.get(k)) for k in _CLASSIFIER_KEYS},
            "confusion": {k: _int(confusion.get(k)) for k in _CONFUSION_KEYS},
        }
    return out


def _computed_classifier(
    method: str, scored: Sequence[tuple[float, str, int | None]], threshold: float | None
) -> dict[str, Any] | None:
    if not scored:
        return None
    if all(sig is not None for _, _, sig in scored):
        predictions = ["unsafe" if sig == 1 else "safe" for _, _, sig in scored]
    elif threshold is not None and _threshold_applies(method, scored, threshold):
        predictions = ["unsafe" if s >= threshold else "safe" for s, _, _ in scored]
    else:
        return None
    from safesteer.metrics import classifier_metrics

    metrics = classifier_metrics(
        [lab for _, lab, _ in scored], [s for s, _, _ in scored], predictions
    )
    return dict(metrics)


def _agreement_section(run: RunData, methods: Sequence[str]) -> dict[str, Any]:
    agreement = _dict(run.summary.get("agreement"))
    index = {(str(r.get("method")), str(r.get("id"))): r for r in run.responses}
    rows: list[dict[str, Any]] = []
    pending: dict[str, list[tuple[str, list[Any]]]] = {}
    for m in _ordered(methods, agreement):
        for pair, entry in _dict(agreement.get(m)).items():
            entry = _dict(entry)
            ids = _list(entry.get("disagreements"))
            rows.append(
                {
                    "method": m,
                    "pair": pair,
                    "judges": pair.split("~"),
                    "percent": _num(entry.get("percent")),
                    "kappa": _num(entry.get("kappa")),
                    "n_compared": _int(entry.get("n_compared")),
                    "n_disagreements": len(ids),
                }
            )
            pending.setdefault(pair, []).append((m, ids))
    examples: dict[str, list[dict[str, Any]]] = {}
    for pair, per_method in pending.items():
        judges = pair.split("~")
        picked: list[dict[str, Any]] = []
        depth = 0
        while len(picked) < _MAX_EXAMPLES and any(depth < len(ids) for _, ids in per_method):
            for m, ids in per_method:  # round robin over methods
                if depth < len(ids) and len(picked) < _MAX_EXAMPLES:
                    row = index.get((m, str(ids[depth])), {})
                    verdicts = _dict(row.get("judges"))
                    picked.append(
                        {
                            "method": m,
                            "id": ids[depth],
                            "subset": row.get("subset"),
                            "label": row.get("label"),
                            "verdicts": {j: verdicts.get(j) for j in judges},
                            "prompt": _excerpt(row.get("prompt"), 160) if row else None,
                            "response": _excerpt(row.get("response"), 240) if row else None,
                        }
                    )
            depth += 1
        if picked:
            examples[pair] = picked
    return {"rows": rows, "examples": examples}


def _utility_section(run: RunData, methods: Sequence[str]) -> dict[str, Any]:
    utility = run.summary.get("utility")
    out: dict[str, dict[str, Any]] = {}
    if isinstance(utility, dict):
        for m in _ordered(methods, utility):
            per = {
                str(s): {"n": _int(_dict(e).get("n")), "accuracy": _num(_dict(e).get("accuracy"))}
                for s, e in _dict(utility.get(m)).items()
            }
            if per:
                out[m] = per
        return {"source": "summary.json", "methods": out}
    counts: dict[str, dict[str, list[int]]] = {}
    for row in run.responses:
        if isinstance(row.get("correct"), bool):
            slot = counts.setdefault(str(row.get("method")), {}).setdefault(
                str(row.get("subset")), [0, 0]
            )
            slot[0] += int(row["correct"])
            slot[1] += 1
    for m in _ordered(methods, counts):
        out[m] = {s: {"n": n, "accuracy": 100.0 * c / n} for s, (c, n) in counts[m].items()}
    return {"source": "responses.jsonl", "methods": out}


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Numeric leaves of nested capability results, keyed ``a.b.c``; bulky parts are skipped
    and a ``variant`` string names its block (``perplexity[chat]``)."""
    if isinstance(value, dict):
        variant = value.get("variant")
        if isinstance(variant, str) and variant:
            prefix = f"{prefix}[{variant}]" if prefix else variant
        for key, item in value.items():
            if key not in _CAPABILITY_SKIP:
                last = prefix.rsplit(".", 1)[-1].split("[", 1)[0]
                name = prefix if key == last else f"{prefix}.{key}" if prefix else str(key)
                _flatten(name, item, out)
        return
    num = _num(value)
    if num is not None:
        out[prefix] = num


def _capability_section(run: RunData, methods: Sequence[str]) -> dict[str, Any]:
    """Numbers per method (perplexity, accuracy, ROUGE, counts), without run settings."""
    capability = _dict(run.summary.get("capability"))
    flat: dict[str, dict[str, float]] = {}
    for m in _ordered(methods, capability):
        values: dict[str, float] = {}
        _flatten("", _dict(capability.get(m)), values)
        kept = {
            k: v
            for k, v in values.items()
            if k.rsplit(".", 1)[-1].split("[", 1)[0] not in _CAPABILITY_SETTINGS
        }
        if kept:
            flat[m] = kept
    metrics = list(dict.fromkeys(k for v in flat.values() for k in v))
    return {"methods": list(flat), "metrics": metrics, "values": flat}


def build_report(run: RunData) -> dict[str, Any]:
    """Every table of the report as structured data (what ``report.json`` holds)."""
    methods = _methods(run)
    judges = _judges(run)
    scans = _scans_settings(run)
    calibration = _dict(run.manifest.get("calibration")) if run.manifest else {}
    sections = [_judge_section(run, j, methods) for j in judges]
    return {
        "run_dir": str(run.run_dir),
        "model": run.settings.get("model") or run.summary.get("model"),
        "suite": run.summary.get("suite") or run.settings.get("suite"),
        "metric": _metric(run),
        "n_prompts": _int(run.summary.get("n_prompts")),
        "methods": methods,
        "judges": judges,
        "settings": {
            "scans": scans or None,
            "options": _dict(run.settings.get("options")),
            "artifact_dir": str(run.artifact_dir) if run.artifact_dir else None,
            "calibration": calibration or None,
        },
        "rates": {s["judge"]: s for s in sections if s is not None},
        "classifier": _classifier_section(run, methods),
        "agreement": _agreement_section(run, methods),
        "utility": _utility_section(run, methods),
        "capability": _capability_section(run, methods),
        "notes": list(run.notes),
    }


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
    cell = f"{count}/{parsable} {_fmt_ci(entry['ci95'])}".rstrip()
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
    out += _utility_markdown(report)
    out += _capability_markdown(report)
    return "\n".join(out).rstrip() + "\n"


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
