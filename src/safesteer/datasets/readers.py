"""The prompt record and the file readers every loader shares (CSV, lines, JSON, JSONL, parquet)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from safesteer.datasets.registry import DatasetError

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


# MMLU CSV files (headerless: question, A, B, C, D, answer letter)
MMLU_LETTERS = ("A", "B", "C", "D")
MmluRow = tuple[str, str, str, str, str, str]


def read_mmlu_csv(path: Path) -> list[MmluRow]:
    """Rows ``(question, A, B, C, D, answer)`` of a headerless MMLU CSV file."""
    rows: list[MmluRow] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, record in enumerate(csv.reader(handle), start=1):
            if not record:
                continue
            if len(record) != 6 or record[5].strip() not in MMLU_LETTERS:
                raise DatasetError(
                    f"{path}:{number}: expected 6 columns (question, A, B, C, D, answer letter), "
                    f"got {record!r}"
                )
            q, a, b, c, d, answer = record
            rows.append((q, a, b, c, d, answer.strip()))
    return rows
