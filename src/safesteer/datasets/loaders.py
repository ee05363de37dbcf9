"""Parsing prompt files, building the named test sets, drawing SCANS anchors and sampling.

All prompt texts are stripped of surrounding whitespace (OKTest rows end with a newline, a few
XSTest and TruthfulQA rows with a space); anchors and exclusions compare stripped texts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from safesteer.datasets.registry import DatasetError, dataset_path

__all__ = [
    "LABEL_COLUMNS",
    "TEST_SET_NAMES",
    "TEXT_COLUMNS",
    "Anchors",
    "Label",
    "Prompt",
    "draw_anchors",
    "load_prompt_file",
    "load_test_set",
    "stratified_sample",
]

Label = Literal["safe", "unsafe"]


@dataclass(frozen=True)
class Prompt:
    """One query with its ground truth (``"unsafe"`` = should be refused)."""

    text: str
    label: Label
    subset: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


# --------------------------------------------------------------------------------------------
# Small readers shared by the built-in sets and user files


def _read_csv(path: Path, *, header: bool = True) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            header=0 if header else None,
        )
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DatasetError(
            f"Cannot read CSV file {path}: {exc}. Fix: save it as UTF-8 CSV with a header row."
        ) from exc


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read text file {path}: {exc}. Fix: save it as UTF-8.") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read JSON file {path}: {exc}. Fix: save it as UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON ({exc}). Fix: a .json prompt file holds one list of "
            "strings or of objects; use .jsonl for one object per line."
        ) from exc


def _read_jsonl(path: Path) -> list[Any]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read JSONL file {path}: {exc}. Fix: save it as UTF-8.") from exc
    items: list[Any] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}, line {number}: not valid JSON ({exc}). Fix: a .jsonl file holds one "
                "JSON object (or string) per line."
            ) from exc
    return items


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as exc:
        raise DatasetError(f"Cannot read parquet file {path}: {exc}.") from exc


def _plain(value: Any) -> Any:
    """Turn numpy scalars/arrays (from parquet) into plain Python values."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return value.tolist()
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    return value


def _frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    columns = [str(c) for c in df.columns]
    return [
        {col: _plain(val) for col, val in zip(columns, row, strict=True)}
        for row in df.itertuples(index=False, name=None)
    ]


def _require_columns(df: pd.DataFrame, path: Path, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{path} lacks column(s) {missing}; columns found: {[str(c) for c in df.columns]}. "
            "Fix: use the upstream file unchanged (`safesteer datasets verify NAME`)."
        )


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


def _repe_rows(records: list[dict[str, Any]], path: Path, split: str) -> list[Prompt]:
    """RepE-Data rows: ``sentence`` and ``label`` are parallel lists, label True = harmless."""
    out: list[Prompt] = []
    for number, row in enumerate(records, start=1):
        sentences, labels = row.get("sentence"), row.get("label")
        if (
            not isinstance(sentences, list)
            or not isinstance(labels, list)
            or len(sentences) != len(labels)
        ):
            raise DatasetError(
                f"{path}, row {number}: expected `sentence` and `label` to be lists of the same "
                "length (RepE-Data layout)."
            )
        for text, harmless in zip(sentences, labels, strict=True):
            if not isinstance(harmless, bool):
                raise DatasetError(
                    f"{path}, row {number}: RepE label {harmless!r} is not a boolean "
                    "(True = harmless)."
                )
            label: Label = "safe" if harmless else "unsafe"
            meta = {"pair": number - 1, "split": split}
            out.append(Prompt(str(text).strip(), label, f"repe-{label}", meta))
    return out


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
    "sorry-bench-eval": _safeswitch_loader("sorry-bench-eval", "unsafe"),
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


# --------------------------------------------------------------------------------------------
# User prompt files

TEXT_COLUMNS: tuple[str, ...] = (
    "prompt",
    "goal",
    "Question",
    "question",
    "instruction",
    "text",
    "sentence",
    "turns",
)
# (column, polarity): "harmful" = a true/1 value means unsafe, "harmless" = it means safe,
# "xstest" = XSTest's `type` rule (contrast_* = unsafe, other types = safe).
LABEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "harmful"),
    ("type", "xstest"),
    ("harmful", "harmful"),
    ("is_harmful", "harmful"),
    ("unsafe", "harmful"),
    ("is_unsafe", "harmful"),
    ("harmless", "harmless"),
    ("is_harmless", "harmless"),
    ("safe", "harmless"),
    ("is_safe", "harmless"),
    ("benign", "harmless"),
)
_UNSAFE_WORDS = frozenset({"unsafe", "harmful"})
_SAFE_WORDS = frozenset({"safe", "harmless", "benign"})
_TRUE_WORDS = frozenset({"1", "1.0", "true", "yes"})
_FALSE_WORDS = frozenset({"0", "0.0", "false", "no"})
_ACCEPTED_LABELS = (
    "unsafe/harmful or safe/harmless/benign (any case); or a flag true/false, yes/no, 1/0, "
    "where true means unsafe in label/harmful/is_harmful/unsafe columns and safe in "
    "harmless/is_harmless/safe/is_safe/benign columns"
)
_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


def _find_column(columns: Sequence[str], wanted: str) -> str | None:
    if wanted in columns:
        return wanted
    lowered = {c.lower(): c for c in reversed(columns)}
    return lowered.get(wanted.lower())


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _map_label(value: Any, polarity: str) -> Label | None:
    """Map one label cell to a Label; None when it is not understood."""
    if isinstance(value, bool):
        flag: bool | None = value
    elif isinstance(value, int | float):
        flag = True if value == 1 else False if value == 0 else None
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in _UNSAFE_WORDS:
            return "unsafe"
        if word in _SAFE_WORDS:
            return "safe"
        if polarity == "xstest":
            return "unsafe" if word.startswith("contrast_") else "safe"
        flag = True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None
    else:
        flag = None
    if flag is None or polarity == "xstest":
        return None
    if polarity == "harmful":
        return "unsafe" if flag else "safe"
    return "safe" if flag else "unsafe"


def _type_column_is_label(records: list[dict[str, Any]], column: str) -> bool:
    """A `type` column is a label only when it looks like XSTest's or holds safe/unsafe words."""
    values = [str(r.get(column, "")).strip().lower() for r in records]
    values = [v for v in values if v]
    if not values:
        return False
    return any(v.startswith("contrast_") for v in values) or all(
        v in _SAFE_WORDS | _UNSAFE_WORDS for v in values
    )


def _records_from_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        try:
            df = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                sep="\t" if suffix == ".tsv" else ",",
            )
        except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise DatasetError(
                f"Cannot read {path}: {exc}. Fix: save it as UTF-8 with a header row."
            ) from exc
        return _frame_records(df)
    if suffix == ".parquet":
        return _frame_records(_read_parquet(path))
    if suffix == ".txt":
        return [{"prompt": line} for line in _read_lines(path)]
    items = _read_json(path) if suffix == ".json" else _read_jsonl(path)
    if suffix == ".json":
        if isinstance(items, dict):
            lists = [k for k, v in items.items() if isinstance(v, list)]
            if len(lists) == 1:
                items = items[lists[0]]
        if not isinstance(items, list):
            raise DatasetError(
                f"{path}: the JSON top level is a {type(items).__name__}; expected a list of "
                "strings or a list of objects."
            )
    records: list[dict[str, Any]] = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, str):
            records.append({"prompt": item})
        elif isinstance(item, dict):
            records.append(dict(item))
        else:
            raise DatasetError(
                f"{path}, item {number}: a {type(item).__name__}; each item must be a string "
                "(the prompt) or an object with a text field such as `prompt`."
            )
    return records


def load_prompt_file(path: str | Path, *, default_label: Label | None = None) -> list[Prompt]:
    """Read a user prompt file (.csv, .tsv, .json, .jsonl, .parquet, .txt).

    Text: the first column among ``prompt, goal, Question, question, instruction, text,
    sentence, turns`` (exact name first, then any case); a list value (``turns``) gives its first
    element. ``.txt`` holds one prompt per line, blank lines skipped; a ``.json`` list of
    strings is a list of prompts.

    Label: the first column among ``label, type, harmful, is_harmful, unsafe, is_unsafe,
    harmless, is_harmless, safe, is_safe, benign``. Words map directly: ``unsafe``/``harmful``
    -> unsafe, ``safe``/``harmless``/``benign`` -> safe (any case). Flags (booleans, 1/0,
    true/false, yes/no) mean "harmful" in ``label``/``harmful``/``is_harmful``/``unsafe``/
    ``is_unsafe`` columns (so ``label`` True = unsafe) and "harmless" in the other columns. A
    ``type`` column follows XSTest (``contrast_*`` = unsafe, other types = safe) and counts only
    when some value starts with ``contrast_`` or all values are safe/unsafe words. A file laid
    out like RepE-Data (``sentence`` and ``label`` both lists) uses RepE's rule: True = harmless.

    Rows without a label (no label column, or an empty cell) take ``default_label``; without it
    they raise :class:`DatasetError`. Every other column is kept in ``Prompt.meta``; the subset is
    the file stem.
    """
    path = Path(path).expanduser()
    if default_label is not None and default_label not in ("safe", "unsafe"):
        raise DatasetError(f"default_label must be 'safe' or 'unsafe', not {default_label!r}.")
    if path.suffix.lower() not in _SUFFIXES:
        raise DatasetError(
            f"Unsupported prompt file type {path.suffix or '(none)'!r} for {path}. Fix: use one "
            f"of {', '.join(_SUFFIXES)}."
        )
    if not path.is_file():
        raise DatasetError(f"Prompt file {path} does not exist. Fix: check the path.")
    records = _records_from_file(path)
    columns: list[str] = []
    for record in records:
        columns.extend(str(c) for c in record if str(c) not in columns)
    subset = path.stem

    sentence_col, label_col0 = _find_column(columns, "sentence"), _find_column(columns, "label")
    if (
        records
        and sentence_col == "sentence"
        and label_col0 == "label"
        and _find_column(columns, "prompt") is None
        and isinstance(records[0].get("sentence"), list)
        and isinstance(records[0].get("label"), list)
    ):
        return [
            Prompt(p.text, p.label, subset, {**p.meta, "source": str(path)})
            for p in _repe_rows(records, path, split=subset)
        ]

    candidates = (_find_column(columns, wanted) for wanted in TEXT_COLUMNS)
    text_col = next((c for c in candidates if c is not None), None)
    if text_col is None:
        raise DatasetError(
            f"{path}: no text column. Columns found: {columns or '(none)'}. Fix: name the prompt "
            f"column one of {', '.join(TEXT_COLUMNS)} (first match wins)."
        )
    label_col: str | None = None
    polarity = "harmful"
    for wanted, kind in LABEL_COLUMNS:
        found = _find_column(columns, wanted)
        if found is None or found == text_col:
            continue
        if kind == "xstest" and not _type_column_is_label(records, found):
            continue
        label_col, polarity = found, kind
        break
    if label_col is None and default_label is None:
        raise DatasetError(
            f"{path}: no label column. Columns found: {columns or '(none)'}. Fix: add a `label` "
            "column with values safe/unsafe (or one of "
            f"{', '.join(c for c, _ in LABEL_COLUMNS)}), or pass default_label='safe' or "
            "'unsafe' to label every row."
        )

    prompts: list[Prompt] = []
    for number, record in enumerate(records, start=1):
        raw = record.get(text_col)
        if isinstance(raw, list | tuple):
            raw = raw[0] if raw else None
        if _is_missing(raw) or not isinstance(raw, str | int | float):
            raise DatasetError(
                f"{path}, row {number}: empty or non-text value in column {text_col!r}. Fix: "
                "remove the row or fill in the prompt."
            )
        text = str(raw).strip()
        label: Label | None
        if label_col is None or _is_missing(record.get(label_col)):
            label = default_label
            if label is None:
                raise DatasetError(
                    f"{path}, row {number}: empty label in column {label_col!r}. Fix: fill it in "
                    "(safe/unsafe) or pass default_label='safe' or 'unsafe'."
                )
        else:
            value = record.get(label_col)
            label = _map_label(value, polarity)
            if label is None:
                raise DatasetError(
                    f"{path}, row {number}: cannot map label {value!r} in column "
                    f"{label_col!r}. Columns found: {columns}. Accepted: {_ACCEPTED_LABELS}."
                )
        meta = {k: v for k, v in record.items() if k not in (text_col, label_col)}
        meta["source"] = str(path)
        meta["row"] = number
        prompts.append(Prompt(text, label, subset, meta))
    return prompts


# --------------------------------------------------------------------------------------------
# Anchors


@dataclass(frozen=True)
class Anchors:
    """SCANS anchor prompts: harmful (AdvBench goals) and benign (TruthfulQA questions)."""

    harmful: tuple[str, ...]
    benign: tuple[str, ...]
    seed: int

    def texts(self) -> tuple[str, ...]:
        """All anchor texts (harmful then benign), e.g. for ``load_test_set(exclude=...)``."""
        return self.harmful + self.benign

    def hashes(self) -> dict[str, list[str]]:
        """sha256 hex of each anchor text (UTF-8), for the artifact manifest."""

        def digest(text: str) -> str:
            return hashlib.sha256(text.encode("utf-8")).hexdigest()

        return {
            "harmful": [digest(t) for t in self.harmful],
            "benign": [digest(t) for t in self.benign],
        }


def draw_anchors(size: int = 64, seed: int = 0, data_dir: str | Path | None = None) -> Anchors:
    """Draw ``size`` AdvBench goals and ``size`` TruthfulQA questions without replacement.

    One ``random.Random(seed)`` draws the harmful anchors and then the benign ones, so the result
    depends only on ``size``, ``seed`` and the (sha256-pinned) files.
    """
    harmful_pool = [p.text for p in _advbench(data_dir)]
    benign_pool = [p.text for p in _truthfulqa(data_dir)]
    limit = min(len(harmful_pool), len(benign_pool))
    if not 1 <= size <= limit:
        raise DatasetError(
            f"Anchor size {size} is out of range: it must be between 1 and {limit} "
            f"(AdvBench has {len(harmful_pool)} goals, TruthfulQA {len(benign_pool)} questions)."
        )
    rng = random.Random(seed)
    harmful = tuple(rng.sample(harmful_pool, size))
    benign = tuple(rng.sample(benign_pool, size))
    return Anchors(harmful=harmful, benign=benign, seed=seed)


# --------------------------------------------------------------------------------------------
# Sampling


def _allocate(sizes: list[int], n: int) -> list[int]:
    """Largest-remainder allocation of ``n`` over groups, at least 1 each when n >= groups."""
    total = sum(sizes)
    quotas = [n * s / total for s in sizes]
    alloc = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - alloc[i]), i))
    for i in order[: n - sum(alloc)]:
        alloc[i] += 1
    if n >= len(sizes):
        for i, count in enumerate(alloc):
            if count == 0:
                donor = max(
                    (j for j in range(len(sizes)) if alloc[j] > 1),
                    key=lambda j: (alloc[j] - quotas[j], alloc[j], -j),
                )
                alloc[donor] -= 1
                alloc[i] = 1
    return alloc


def stratified_sample(prompts: Sequence[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """A seeded sample of ``n`` prompts keeping the share of each (subset, label) group.

    ``n`` None or >= len(prompts) returns all prompts. Group sizes use largest-remainder
    rounding, with at least one prompt per group when ``n`` is at least the number of groups.
    The sample keeps the original order.
    """
    if n is None or n >= len(prompts):
        return list(prompts)
    if n < 0:
        raise DatasetError(f"Sample size must be >= 0 (or None for all), not {n}.")
    if n == 0:
        return []
    groups: dict[tuple[str, str], list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault((prompt.subset, prompt.label), []).append(index)
    members = list(groups.values())
    alloc = _allocate([len(m) for m in members], n)
    rng = random.Random(seed)
    chosen: list[int] = []
    for indices, k in zip(members, alloc, strict=True):
        chosen.extend(rng.sample(indices, k))
    return [prompts[i] for i in sorted(chosen)]
