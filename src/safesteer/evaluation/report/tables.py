"""The report's tables as data (``report.json``): refusal rates per judge, classifier metrics,
judge agreement, utility and capability, assembled by :func:`build_report`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from safesteer.evaluation.metrics import is_looping
from safesteer.evaluation.report.data import (
    _CAPABILITY_SETTINGS,
    _CAPABILITY_SKIP,
    _CLASSIFIER_KEYS,
    _CONFUSION_KEYS,
    _MAX_EXAMPLES,
    RunData,
    _arrow,
    _ci,
    _dict,
    _excerpt,
    _int,
    _judges,
    _list,
    _methods,
    _metric,
    _num,
    _ordered,
    _rate,
    _scans_settings,
    subset_order,
)


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
    from safesteer.evaluation.metrics import classifier_metrics

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


def _examples_section(run: RunData, methods: Sequence[str], judges: Sequence[str]) -> list[Any]:
    """Per subset, the first prompts on which the methods' verdicts differ (under the first
    judge), with every method's response: what a change of rate looks like in text. Prompts with
    no difference fill the rest. One per subset, three when the run has one or two subsets."""
    if not judges:
        return []
    judge = judges[0]
    by_prompt: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in run.responses:
        row_id = _int(row.get("id"))
        if row_id is not None:
            key = (str(row.get("subset")), row_id)
            by_prompt.setdefault(key, {})[str(row.get("method"))] = row
    candidates: dict[str, list[tuple[bool, int]]] = {}
    for subset, row_id in sorted(by_prompt):
        per = by_prompt[(subset, row_id)]
        differ = len({_dict(r.get("judges")).get(judge) for r in per.values()}) > 1
        candidates.setdefault(subset, []).append((differ, row_id))
    per_subset = 3 if len(candidates) <= 2 else 1
    out: list[dict[str, Any]] = []
    for subset in subset_order(candidates):
        picked = sorted(candidates[subset], key=lambda c: not c[0])[:per_subset]
        for differ, row_id in picked:
            per = by_prompt[(subset, row_id)]
            first = next(iter(per.values()))
            out.append(
                {
                    "subset": subset,
                    "id": row_id,
                    "label": first.get("label"),
                    "verdicts_differ": differ,
                    "judge": judge,
                    "prompt": _excerpt(first.get("prompt"), 200),
                    "responses": [
                        {
                            "method": m,
                            "verdict": _dict(per[m].get("judges")).get(judge),
                            "response": _excerpt(per[m].get("response"), 300),
                        }
                        for m in _ordered(methods, per)
                    ],
                }
            )
    return out


def _text_quality_section(run: RunData, methods: Sequence[str]) -> dict[str, Any]:
    """Per method and subset: replies, replies stuck in a loop, and mean words. A refusal rate
    that moves because the text broke shows here."""
    counts: dict[str, dict[str, list[int]]] = {}
    for row in run.responses:
        text = row.get("response")
        if isinstance(text, str):
            slot = counts.setdefault(str(row.get("method")), {}).setdefault(
                str(row.get("subset")), [0, 0, 0]
            )
            slot[0] += 1
            slot[1] += is_looping(text)
            slot[2] += len(text.split())
    out: dict[str, dict[str, Any]] = {}
    for m in _ordered(methods, counts):
        out[m] = {
            s: {"n": n, "looping": loops, "mean_words": words / n}
            for s, (n, loops, words) in counts[m].items()
        }
    return {"methods": out}


def _answer_rate_section(run: RunData, methods: Sequence[str]) -> dict[str, Any]:
    """The length-controlled answer rate of summary.json, ``{method: {subset: {judge: block}}}``."""
    stored = _dict(run.summary.get("answer_rate"))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in _ordered(methods, stored):
        for subset, by_judge in _dict(stored.get(m)).items():
            for judge, block in _dict(by_judge).items():
                entry = _dict(block)
                out.setdefault(m, {}).setdefault(str(subset), {})[str(judge)] = {
                    "n": _int(entry.get("n")),
                    "rate": _num(entry.get("rate")),
                    "ci95": _ci(entry.get("ci95")),
                    "plain_answer_rate": _num(entry.get("plain_answer_rate")),
                    "median_length_ratio": _num(entry.get("median_length_ratio")),
                    "min_ratio": _num(entry.get("min_ratio")),
                }
    return {"methods": out}


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
        "examples": _examples_section(run, methods, judges),
        "text_quality": _text_quality_section(run, methods),
        "utility": _utility_section(run, methods),
        "answer_rate": _answer_rate_section(run, methods),
        "capability": _capability_section(run, methods),
        "notes": list(run.notes),
    }
