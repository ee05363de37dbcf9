"""Paired comparison of two methods on the same prompts (``safesteer compare --paired-against``).

Rates with separate bootstrap intervals hide what a paired count shows: two methods that refuse
84.9 and 85.1 % of a set may differ on one prompt or on forty. Rows are matched by subset and
prompt text (the n-th occurrence of a text with the n-th), so folders from different runs pair
correctly; the exact two-sided sign test on the discordant prompts says whether the changes all
going one way could be chance. The relative change in refusals (method / baseline - 1, e.g. "24 %
fewer false refusals") gets a paired bootstrap interval: prompts are resampled with both methods'
verdicts together.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from safesteer.evaluation.judges.base import Verdict, is_judged


def sign_test_p(first: int, second: int) -> float:
    """Exact two-sided sign-test p-value of ``first`` against ``second`` discordant pairs."""
    if first < 0 or second < 0:
        raise ValueError("discordant counts cannot be negative")
    n = first + second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(first, second) + 1)) / 2**n
    return min(1.0, 2 * tail)


Key = tuple[str, str, str, int]  # label, subset, prompt, occurrence


def _verdicts(rows: list[dict[str, Any]], judge: str) -> dict[Key, bool]:
    """Refused or not per (label, subset, prompt, occurrence), for rows with a readable
    verdict."""
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    out: dict[Key, bool] = {}
    for row in rows:
        key = (row["label"], row["subset"], row["prompt"])
        occurrence = seen[key]
        seen[key] += 1
        verdict: Verdict = row["judges"].get(judge)
        if is_judged(verdict):
            out[(*key, occurrence)] = bool(verdict)
    return out


def relative_change(
    baseline: Sequence[bool], method: Sequence[bool], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``method``'s refusals relative to ``baseline``'s on the same prompts (refusals / baseline
    refusals - 1; None when the baseline refuses none) and its 95 % paired bootstrap interval
    (None with ``n_boot`` 0; resamples where the baseline refuses none are skipped)."""
    base = np.asarray(baseline, dtype=bool)
    mine = np.asarray(method, dtype=bool)
    if base.shape != mine.shape:
        raise ValueError("paired verdicts must have the same length")
    total = int(base.sum())
    change = None if total == 0 else float(mine.sum()) / total - 1.0
    interval = None
    if change is not None and n_boot > 0 and base.size:
        rows = np.random.default_rng(seed).integers(0, base.size, (n_boot, base.size))
        b, m = base[rows].sum(axis=1), mine[rows].sum(axis=1)
        kept = b > 0
        if kept.any():
            low, high = np.percentile(m[kept] / b[kept] - 1.0, [2.5, 97.5])
            interval = [float(low), float(high)]
    return {
        "refused_by_baseline": total,
        "refused_by_method": int(mine.sum()),
        "change": change,
        "change_ci": interval,
    }


def paired_changes(
    by_method: dict[str, list[dict[str, Any]]],
    baseline: str,
    judge: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method other than ``baseline`` and per subset (and pooled per label, ``all safe`` and
    ``all unsafe``): the prompts both hold, how many only the baseline refuses, how many only the
    method refuses, the sign test, and the relative change in refusals with its paired bootstrap
    interval (:func:`relative_change`)."""
    if baseline not in by_method:
        raise ValueError(
            f"--paired-against {baseline!r} is not a method of these folders; methods: "
            f"{', '.join(sorted(by_method))}"
        )
    base = _verdicts(by_method[baseline], judge)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for method, rows in by_method.items():
        if method == baseline:
            continue
        mine = _verdicts(rows, judge)
        pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
        for key in sorted(base.keys() & mine.keys()):
            for subset in (key[1], f"all {key[0]}"):
                pairs[subset].append((base[key], mine[key]))
        result[method] = {}
        for subset, cells in sorted(pairs.items()):
            only_base = sum(b and not m for b, m in cells)
            only_mine = sum(m and not b for b, m in cells)
            result[method][subset] = {
                "n": len(cells),
                "refused_by_baseline_only": only_base,
                "refused_by_method_only": only_mine,
                "sign_test_p": sign_test_p(only_base, only_mine),
                **relative_change([b for b, _ in cells], [m for _, m in cells], n_boot, seed),
            }
    return result


def paired_markdown(paired: dict[str, dict[str, dict[str, Any]]], baseline: str) -> str:
    """The paired counts as a Markdown table."""
    lines = [
        f"Paired against `{baseline}` (same prompts, matched by text; exact sign test):",
        "",
        "| method | subset | n | refused by baseline only | refused by method only | p "
        "| refusals, baseline → method | change % [95 % CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, subsets in paired.items():
        for subset, cell in subsets.items():
            lines.append(
                f"| {method} | {subset} | {cell['n']} | {cell['refused_by_baseline_only']} | "
                f"{cell['refused_by_method_only']} | {cell['sign_test_p']:.3g} | "
                f"{cell['refused_by_baseline']} → {cell['refused_by_method']} | "
                f"{_change(cell['change'], cell['change_ci'])} |"
            )
    return "\n".join(lines) + "\n"


def _change(change: float | None, interval: list[float] | None) -> str:
    if change is None:
        return "-"
    text = f"{100 * change:+.1f}"
    if interval is not None:
        text += f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"
    return text
