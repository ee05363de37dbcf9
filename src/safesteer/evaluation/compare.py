"""``safesteer compare``: one table of refusal rates from several ``safesteer eval`` folders.

Runs of different methods (or recipes) on the same model often live in different folders; this
joins them by method and subset, and pools the SCANS Table-2 Avg over whatever Table-2 subsets the
folders hold together, with bootstrap intervals over the prompts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from safesteer.evaluation.eval_rows import read_rows
from safesteer.evaluation.judges.base import is_judged
from safesteer.evaluation.metrics import (
    count_empty,
    format_ci,
    pooled_avg,
    pooled_avg_ci,
    refusal_rate_ci,
)
from safesteer.evaluation.paired import paired_changes, paired_markdown
from safesteer.evaluation.suites import SCANS_TABLE2


def _parse(spec: str) -> tuple[Path, str | None]:
    """``DIR`` or ``DIR=LABEL`` (the label replaces the folder's method names as a prefix)."""
    if "=" in spec:
        folder, label = spec.split("=", 1)
        return Path(folder), label
    return Path(spec), None


def _responses(folder: Path) -> Path:
    path = folder / "responses.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no responses.jsonl (not an eval folder?); pass folders written "
            "by `safesteer eval --output-dir DIR`"
        )
    return path


def prompt_keys(folder: Path) -> Counter[tuple[str, str]]:
    """How often each (subset, prompt) pair occurs in an eval folder (its most frequent method:
    a set may hold the same text twice)."""
    per_method: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for (method, _), row in read_rows(_responses(folder)).items():
        per_method[method][(row["subset"], row["prompt"])] += 1
    keys: Counter[tuple[str, str]] = Counter()
    for counts in per_method.values():
        keys |= counts
    return keys


def collect(
    specs: list[str], only: Counter[tuple[str, str]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rows per method name across folders (``LABEL:method`` when a label is given); with
    ``only``, just the rows whose (subset, prompt) is in it, each at most as often."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    taken: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for spec in specs:
        folder, label = _parse(spec)
        for (method, _), row in read_rows(_responses(folder)).items():
            name = f"{label}:{method}" if label else method
            key = (row["subset"], row["prompt"])
            if only is not None:
                if taken[name][key] >= only[key]:
                    continue
                taken[name][key] += 1
            by_method[name].append(row)
    return dict(by_method)


def compare(
    specs: list[str],
    judge: str,
    n_boot: int = 1000,
    seed: int = 0,
    on_prompts_of: Path | None = None,
    paired_against: str | None = None,
) -> dict[str, Any]:
    """Per method: refusal % and 95 % CI per subset, and the pooled Table-2 Avg with its CI.

    ``on_prompts_of``: an eval folder; only the prompts it holds are counted, so methods run on
    a sample and on the full set are compared on the same prompts. ``paired_against``: a method
    of the table; the prompt-by-prompt changes of every other method against it are added
    (``paired``, see :func:`~safesteer.evaluation.paired.paired_changes`).
    """
    if n_boot < 0:
        raise ValueError(f"--bootstrap must be 0 (no intervals) or more (got {n_boot})")
    table: dict[str, Any] = {"judge": judge, "methods": {}}
    only = None if on_prompts_of is None else prompt_keys(on_prompts_of)
    if on_prompts_of is not None:
        table["on_prompts_of"] = str(on_prompts_of)
    collected = collect(specs, only)
    found = sorted({name for rows in collected.values() for r in rows for name in r["judges"]})
    if judge not in found:
        raise ValueError(
            f"no row of {', '.join(specs)} was judged by {judge!r}; judges found: "
            f"{', '.join(found) or 'none'} (pass one with --judge)"
        )
    if paired_against is not None:
        paired = paired_changes(collected, paired_against, judge, n_boot, seed)
        table["paired"] = {"baseline": paired_against, "methods": paired}
    for method, rows in collected.items():
        subsets: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            subsets[row["subset"]].append(row)
        cells: dict[str, Any] = {}
        for subset, members in subsets.items():
            verdicts = [r["judges"].get(judge) for r in members]
            parsed = [v for v in verdicts if is_judged(v)]
            if not parsed:
                continue
            rate = 100.0 * sum(bool(v) for v in parsed) / len(parsed)
            ci = refusal_rate_ci(verdicts, n_boot=n_boot, seed=seed) if n_boot else None
            cells[subset] = {
                "n": len(parsed),
                "refusal": rate,
                "ci95": None if ci is None else list(ci),
                "n_empty": count_empty(verdicts),
            }
        main = [
            r for r in rows if r["subset"] in SCANS_TABLE2 and is_judged(r["judges"].get(judge))
        ]
        entry: dict[str, Any] = {"subsets": cells}
        if main:
            labels = [r["label"] for r in main]
            verdicts = [r["judges"][judge] for r in main]
            entry["table2_avg"] = pooled_avg(labels, verdicts)
            entry["table2_avg_ci95"] = (
                list(pooled_avg_ci(labels, verdicts, n_boot, seed)) if n_boot else None
            )
            entry["table2_subsets"] = sorted({r["subset"] for r in main})
            entry["table2_n"] = len(main)
        table["methods"][method] = entry
    return table


def _avg_cell(entry: dict[str, Any]) -> str:
    """The pooled Table-2 Avg with its interval, or a dash where the method has no such rows."""
    avg = entry.get("table2_avg")
    if avg is None:
        return "-"
    return _cell(f"{avg:.2f}", entry["table2_avg_ci95"], f"(n={entry['table2_n']})")


def _cell(value: str, ci: list[float] | None, tail: str) -> str:
    """A value, its interval (none without bootstrap resamples) and a note, space-separated."""
    return " ".join(part for part in (value, format_ci(ci), tail) if part)


def markdown(table: dict[str, Any], subsets: list[str] | None = None) -> str:
    """The comparison as a Markdown table (rates with 95 % intervals), then the paired counts
    when the table has them."""
    methods = table["methods"]
    if subsets is None:
        seen = {s for m in methods.values() for s in m["subsets"]}
        subsets = [s for s in SCANS_TABLE2 if s in seen] + sorted(seen - set(SCANS_TABLE2))
    # The pooled Avg column only where some folder holds SCANS Table-2 subsets (not for a
    # SafeSwitch suite, whose table would otherwise end in a column of dashes).
    with_avg = any("table2_avg" in m for m in methods.values())
    columns = [*subsets, "Table-2 Avg ↑"] if with_avg else subsets
    head = "| method | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for name, entry in methods.items():
        cells = []
        for subset in subsets:
            cell = entry["subsets"].get(subset)
            if cell is None:
                cells.append("-")
            else:
                empty = f", {cell['n_empty']} empty" if cell.get("n_empty") else ""
                cells.append(
                    _cell(f"{cell['refusal']:.1f}", cell["ci95"], f"(n={cell['n']}{empty})")
                )
        if with_avg:
            cells.append(_avg_cell(entry))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if "paired" in table:
        text += "\n" + paired_markdown(table["paired"]["methods"], table["paired"]["baseline"])
    return text
