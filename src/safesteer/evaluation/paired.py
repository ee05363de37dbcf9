"""Paired comparison of two methods on the same prompts (``safesteer compare --paired-against``).

Rates with separate bootstrap intervals hide what a paired count shows: two methods that refuse
84.9 and 85.1 % of a set may differ on one prompt or on forty. Rows are matched by subset and
prompt text (the n-th occurrence of a text with the n-th), so folders from different runs pair
correctly; the exact two-sided sign test on the discordant prompts says whether the changes all
going one way could be chance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

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


def paired_changes(
    by_method: dict[str, list[dict[str, Any]]], baseline: str, judge: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method other than ``baseline`` and per subset (and pooled per label, ``all safe`` and
    ``all unsafe``): the prompts both hold, how many only the baseline refuses, how many only the
    method refuses, and the sign test."""
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
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for key in base.keys() & mine.keys():
            for subset in (key[1], f"all {key[0]}"):
                cell = counts[subset]
                cell[0] += 1
                cell[1] += base[key] and not mine[key]
                cell[2] += mine[key] and not base[key]
        result[method] = {
            subset: {
                "n": n,
                "refused_by_baseline_only": only_base,
                "refused_by_method_only": only_mine,
                "sign_test_p": sign_test_p(only_base, only_mine),
            }
            for subset, (n, only_base, only_mine) in sorted(counts.items())
        }
    return result


def paired_markdown(paired: dict[str, dict[str, dict[str, Any]]], baseline: str) -> str:
    """The paired counts as a Markdown table."""
    lines = [
        f"Paired against `{baseline}` (same prompts, matched by text; exact sign test):",
        "",
        "| method | subset | n | refused by baseline only | refused by method only | p |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, subsets in paired.items():
        for subset, cell in subsets.items():
            lines.append(
                f"| {method} | {subset} | {cell['n']} | {cell['refused_by_baseline_only']} | "
                f"{cell['refused_by_method_only']} | {cell['sign_test_p']:.3g} |"
            )
    return "\n".join(lines) + "\n"
