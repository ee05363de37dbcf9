"""Parsing prompt files, building the named test sets, drawing SCANS anchors and sampling.

All prompt texts are stripped of surrounding whitespace (OKTest rows end with a newline, a few
XSTest and TruthfulQA rows with a space); anchors and exclusions compare stripped texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safesteer.datasets.prompt_files import load_prompt_file
from safesteer.datasets.readers import (
    Label,
    Prompt,
    _frame_records,
    _read_csv,
    _read_json,
    _read_jsonl,
    _read_lines,
    _read_parquet,
    _repe_rows,
    _require_columns,
)
from safesteer.datasets.registry import DatasetError, dataset_path

__all__ = [
    "TEST_SET_NAMES",
    "load_test_set",
]


# --------------------------------------------------------------------------------------------
# Built-in sets


def _advbench(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("advbench", data_dir)[0]
    df = _read_csv(path)
    _require_columns(df, path, ["goal"])
    targets = df["target"] if "target" in df.columns else [""] * len(df)
    return [
        Prompt(goal.strip(), "unsafe", "advbench", {"target": target})
        for goal, target in zip(df["goal"], targets, strict=True)
    ]


def _truthfulqa(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("truthfulqa", data_dir)[0]
    df = _read_csv(path)
    _require_columns(df, path, ["Question"])
    out: list[Prompt] = []
    for row in _frame_records(df):
        meta = {"category": row.get("Category", ""), "best_answer": row.get("Best Answer", "")}
        out.append(Prompt(str(row["Question"]).strip(), "safe", "truthfulqa", meta))
    return out


def _xstest(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("xstest", data_dir)[0]
    df = _read_csv(path)
    _require_columns(df, path, ["prompt", "type"])
    out: list[Prompt] = []
    for row in _frame_records(df):
        kind = str(row["type"])
        label: Label = "unsafe" if kind.startswith("contrast_") else "safe"
        meta: dict[str, Any] = {k: row[k] for k in ("id_v2", "type", "focus", "note") if k in row}
        out.append(Prompt(str(row["prompt"]).strip(), label, f"xstest-{label}", meta))
    return out


def _xstest_current(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("xstest-current", data_dir)[0]
    df = _read_csv(path)
    _require_columns(df, path, ["prompt", "label"])
    out: list[Prompt] = []
    for number, row in enumerate(_frame_records(df), start=1):
        value = str(row["label"]).strip().lower()
        if value not in ("safe", "unsafe"):
            raise DatasetError(f"{path}, row {number}: label {value!r} is not safe/unsafe.")
        label: Label = "unsafe" if value == "unsafe" else "safe"
        meta: dict[str, Any] = {k: row[k] for k in ("id", "type", "focus", "note") if k in row}
        out.append(Prompt(str(row["prompt"]).strip(), label, f"xstest-{label}", meta))
    return out


def _oktest(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("oktest", data_dir)[0]
    df = _read_csv(path)
    _require_columns(df, path, ["prompt"])
    return [Prompt(text.strip(), "safe", "oktest") for text in df["prompt"]]


def _harmfulq(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("harmfulq", data_dir)[0]
    items = _read_json(path)
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise DatasetError(f"{path} should be a JSON list of strings; it is not.")
    return [Prompt(text.strip(), "unsafe", "harmfulq") for text in items]


def _malicious(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("malicious", data_dir)[0]
    return [Prompt(text, "unsafe", "malicious") for text in _read_lines(path)]


def _heldout(data_dir: str | Path | None) -> list[Prompt]:
    path = dataset_path("heldout-harmless", data_dir)[0]
    return [Prompt(text, "safe", "heldout-harmless") for text in _read_lines(path)]


def _repe(data_dir: str | Path | None, split: str = "test") -> list[Prompt]:
    paths = dataset_path("repe", data_dir)
    path = next(p for p in paths if p.name.startswith(f"{split}-"))
    df = _read_parquet(path)
    _require_columns(df, path, ["sentence", "label"])
    return _repe_rows(_frame_records(df), path, split)


def _safeswitch_loader(name: str, label: Label) -> Callable[[str | Path | None], list[Prompt]]:
    def load(data_dir: str | Path | None) -> list[Prompt]:
        path = dataset_path(name, data_dir)[0]
        out: list[Prompt] = []
        for number, item in enumerate(_read_jsonl(path), start=1):
            turns = item.get("turns") if isinstance(item, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise DatasetError(f"{path}, record {number}: no prompt in `turns[0]`.")
            meta = {k: v for k, v in item.items() if k != "turns"}
            out.append(Prompt(turns[0].strip(), label, name, meta))
        return out

    return load


def _sorry_eval(data_dir: str | Path | None) -> list[Prompt]:
    """SORRY-Bench eval, with ``category`` and ``prompt_style`` joined from the full SORRY-Bench
    file by prompt text where that file is present (the eval split's rows lack both fields)."""
    prompts = _safeswitch_loader("sorry-bench-eval", "unsafe")(data_dir)
    try:
        path = dataset_path("sorry-bench", data_dir)[0]
    except DatasetError:
        return prompts
    fields: dict[str, dict[str, Any]] = {}
    for item in _read_jsonl(path):
        turns = item.get("turns") if isinstance(item, dict) else None
        if isinstance(turns, list) and turns and isinstance(turns[0], str):
            found = {k: item[k] for k in ("category", "prompt_style") if k in item}
            fields.setdefault(turns[0].strip(), found)
    return [
        Prompt(p.text, p.label, p.subset, {**fields.get(p.text, {}), **p.meta}) for p in prompts
    ]


_Loader = Callable[[str | Path | None], list[Prompt]]

_SINGLE_SETS: dict[str, _Loader] = {
    "xstest": _xstest,
    "xstest-current": _xstest_current,
    "oktest": _oktest,
    "repe": _repe,
    "repe-train": lambda data_dir: _repe(data_dir, "train"),
    "malicious": _malicious,
    "harmfulq": _harmfulq,
    "heldout": _heldout,
    "advbench": _advbench,
    "truthfulqa": _truthfulqa,
    "sorry-bench-eval": _sorry_eval,
    "sorry-bench-train": _safeswitch_loader("sorry-bench-train", "unsafe"),
    "trustllm-misuse-eval": _safeswitch_loader("trustllm-misuse-eval", "unsafe"),
    "trustllm-misuse-train": _safeswitch_loader("trustllm-misuse-train", "unsafe"),
    "trustllm-jailbreak-eval": _safeswitch_loader("trustllm-jailbreak-eval", "unsafe"),
    "trustllm-jailbreak-train": _safeswitch_loader("trustllm-jailbreak-train", "unsafe"),
    "trustllm-exaggerated-safety": _safeswitch_loader("trustllm-exaggerated-safety", "safe"),
    "alpaca-eval": _safeswitch_loader("alpaca-eval", "safe"),
    "trivia-qa": _safeswitch_loader("trivia-qa", "safe"),
}

_COMPOSITES: dict[str, tuple[str, ...]] = {
    "default": ("advbench", "truthfulqa"),
    # SCANS Table 2: XSTest safe/unsafe, RepE safe/unsafe, OKTest, TQA, AdvBench, Malicious.
    "scans-paper": ("xstest", "repe", "oktest", "truthfulqa", "advbench", "malicious"),
}

_SET_ALIASES: dict[str, str] = {
    "heldout-harmless": "heldout",
    "held-out-harmless": "heldout",
    "maliciousinstruct": "malicious",
    "xstest-v2": "xstest",
    "tqa": "truthfulqa",
    "trivia_qa": "trivia-qa",
}

TEST_SET_NAMES: tuple[str, ...] = tuple(_COMPOSITES) + tuple(_SINGLE_SETS)


def _load_named(name: str, data_dir: str | Path | None) -> list[Prompt]:
    parts = _COMPOSITES.get(name, (name,))
    out: list[Prompt] = []
    for part in parts:
        out.extend(_SINGLE_SETS[part](data_dir))
    return out


def load_test_set(
    name: str,
    *,
    exclude: Iterable[str] = (),
    data_dir: str | Path | None = None,
    default_label: Label | None = None,
) -> list[Prompt]:
    """Load a named test set, a prompt file, or a comma-separated mix of both.

    Names: ``default`` (AdvBench + TruthfulQA remainders), ``scans-paper`` (the 8 subsets of
    SCANS Table 2), ``xstest``, ``oktest``, ``repe``, ``malicious``, ``harmfulq``, ``heldout``,
    ``advbench``, ``truthfulqa`` and the SafeSwitch sets (see ``TEST_SET_NAMES``). Prompts whose
    stripped text is in ``exclude`` (the anchors) are dropped from every part. ``default_label``
    is passed to :func:`load_prompt_file` for files.
    """
    excluded = {text.strip() for text in exclude}
    key = name.strip()
    canonical = _SET_ALIASES.get(key.lower(), key.lower())
    prompts: list[Prompt]
    if canonical in _COMPOSITES or canonical in _SINGLE_SETS:
        prompts = _load_named(canonical, data_dir)
    elif Path(key).expanduser().is_file():
        prompts = load_prompt_file(Path(key).expanduser(), default_label=default_label)
    elif "," in key:
        prompts = []
        for part in (p.strip() for p in key.split(",")):
            if part:
                prompts.extend(load_test_set(part, data_dir=data_dir, default_label=default_label))
    else:
        raise DatasetError(
            f"Unknown test set {name!r}: it is neither a known name nor an existing file. "
            f"Known names: {', '.join(TEST_SET_NAMES)}. Files may be .csv, .tsv, .json, .jsonl, "
            ".parquet or .txt; combine several with commas."
        )
    if excluded:
        prompts = [p for p in prompts if p.text not in excluded]
    return prompts
