"""User prompt files (``--prompts FILE``): CSV, TSV, JSON, JSONL, parquet or text, with the
text and label columns found by name and the label words mapped to safe/unsafe."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from safesteer.datasets.readers import (
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    Label,
    Prompt,
    _frame_records,
    _read_json,
    _read_jsonl,
    _read_lines,
    _read_parquet,
    _repe_rows,
)
from safesteer.datasets.registry import DatasetError

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
