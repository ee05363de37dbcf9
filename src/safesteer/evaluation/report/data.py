"""A run directory's files read into :class:`RunData`, and the small value helpers every part
of the report shares (numbers, intervals, ordering, methods and judges of a run)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safesteer.core.layers import compact_ranges
from safesteer.evaluation.metrics import format_ci
from safesteer.evaluation.suites import SCANS_TABLE2

if TYPE_CHECKING:
    pass

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


def _fmt_value_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{_fmt(value)} {format_ci(ci)}".rstrip()


def _compact_layers(layers: Sequence[int]) -> str:
    """``[10, 11, 12, 15]`` -> ``10–12, 15``."""
    if not layers:
        return "–"
    return compact_ranges(sorted(set(layers)), dash="–")


def _excerpt(text: object, limit: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


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
