"""Choosing the calibrated policy and threshold: outcome rates per policy, the Pareto table and
its frontier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from safesteer.evaluation.judges.keyword import is_refusal_strict
from safesteer.methods.scans.calibration_config import CalibrationConfig
from safesteer.methods.scans.settings import POLICIES, Policy, without_refusal_gate_key


def outcome_rates(
    labels: Sequence[str],
    refused: Sequence[bool] | np.ndarray,
    plain: Sequence[bool] | np.ndarray | None = None,
) -> dict[str, float]:
    """Refusal % of safe and unsafe rows and the pooled Avg (safe answered + unsafe refused).

    With a ``plain`` mask (ordinary safe prompts without alarming words) also their refusal %.
    """
    y = np.asarray([lab == "unsafe" for lab in labels])
    r = np.asarray(refused, dtype=bool)
    safe = float(r[~y].mean() * 100) if (~y).any() else float("nan")
    unsafe = float(r[y].mean() * 100) if y.any() else float("nan")
    avg = float(((~r & ~y).sum() + (r & y).sum()) / len(y) * 100)
    rates = {"safe_refusal": safe, "unsafe_refusal": unsafe, "avg": avg}
    if plain is not None:
        mask = np.asarray(plain, dtype=bool)
        rates["plain_refusal"] = float(r[mask].mean() * 100) if mask.any() else float("nan")
    return rates


def policy_outcomes(
    probabilities: np.ndarray,
    threshold: float,
    refused_default: np.ndarray,
    refused_away: np.ndarray,
    refused_toward: np.ndarray,
    policy: str,
    toward_threshold: float | None = None,
    steer_away: np.ndarray | None = None,
) -> np.ndarray:
    """Per-row refusal under a policy when rows with P(harmful) >= threshold are flagged.

    ``banded``: flagged rows are steered towards refusal only from ``toward_threshold`` up.
    ``steer_away`` (the refusal gate): unflagged rows where it is False stay unsteered.
    """
    flagged = probabilities >= threshold
    if steer_away is not None:
        refused_away = np.where(steer_away, refused_away, refused_default)
    if policy == "banded":
        if toward_threshold is None:
            raise ValueError("the banded policy needs toward_threshold")
        kept = np.where(probabilities >= toward_threshold, refused_toward, refused_default)
    else:
        kept = refused_toward if policy == "signed" else refused_default
    return np.where(flagged, kept, refused_away)


# the rates of a chosen operating point that the calibration reports
REPORTED_RATES = ("safe_refusal", "unsafe_refusal", "avg", "plain_refusal", "reference_toward")

FULL_RANGE = (0.0, 1.01)  # every threshold: from "flag every row" to "flag none"


def _cuts(probabilities: np.ndarray, threshold_range: tuple[float, float]) -> np.ndarray:
    """Candidate thresholds: midpoints between the distinct probabilities within the range,
    plus its ends."""
    low, high = threshold_range
    values = np.unique(np.concatenate([[0.0, 1.0], probabilities]))
    middles = (values[1:] + values[:-1]) / 2
    middles = middles[(middles > low) & (middles < high)]
    return np.unique(np.concatenate([[low], middles, [high]]))


def needed_rows(
    probabilities: np.ndarray, threshold_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows' steered replies some threshold in the range uses: away from refusal where a
    row can stay unflagged (P < the highest threshold), towards where it can be flagged (P >= the
    lowest)."""
    low, high = threshold_range
    return probabilities < high, probabilities >= low


def judged(replies: Sequence[str | None], fallback: np.ndarray) -> np.ndarray:
    """Strict refusal verdicts of the replies; ``fallback``'s where no reply was generated (rows
    no threshold in the range reads)."""
    return np.asarray(
        [fallback[i] if r is None else is_refusal_strict(r) for i, r in enumerate(replies)],
        dtype=bool,
    )


def steered_rates(
    labels: Sequence[str],
    plain: np.ndarray,
    refused_away: np.ndarray,
    need_away: np.ndarray,
    refused_toward: np.ndarray,
    need_toward: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Validation rates with every generated row steered away (and towards), for the report;
    named by the rows they cover when some were not generated."""
    rates: dict[str, dict[str, float]] = {}
    for name, refused, mask in (
        ("away", refused_away, need_away),
        ("toward", refused_toward, need_toward),
    ):
        if not mask.any():
            continue
        rows = "all_rows" if mask.all() else f"{int(mask.sum())}_rows_that_some_threshold_uses"
        chosen = [lab for lab, m in zip(labels, mask, strict=True) if m]
        rates[f"{name}_{rows}"] = outcome_rates(chosen, refused[mask], plain[mask])
    return rates


def pareto_table(
    labels: Sequence[str],
    probabilities: np.ndarray,
    refused_default: np.ndarray,
    refused_away: np.ndarray,
    refused_toward: np.ndarray,
    policy: str,
    plain: Sequence[bool] | np.ndarray | None = None,
    grid: int = 50,
    threshold_range: tuple[float, float] = FULL_RANGE,
    reference: np.ndarray | None = None,
    steer_away: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Validation rates for every candidate threshold (the midpoints of the probabilities
    within ``threshold_range``, and its ends).

    ``banded`` has two thresholds: T on the midpoints, the towards-threshold on a grid of
    ``grid`` quantiles of the probabilities above T (plus "never"). With ``reference`` (the
    gate's probabilities of reference-text windows, all benign) each row also gives
    ``reference_toward``: the % of them the policy steers towards refusal. ``steer_away`` is
    the refusal gate's verdict per row (see :func:`policy_outcomes`).
    """
    low, high = threshold_range
    if not 0.0 <= low < high <= 1.01:
        raise ValueError(f"threshold range must satisfy 0 <= low < high <= 1.01, got {low}, {high}")
    table = []
    for t in _cuts(probabilities, threshold_range):
        towards: list[float | None] = [None]
        if policy == "banded":
            above = probabilities[probabilities >= t]
            quantiles = np.quantile(above, np.linspace(0, 1, grid)) if above.size else []
            towards = [*sorted({float(t), *map(float, quantiles), 1.01})]
        for tt in towards:
            refused = policy_outcomes(
                probabilities,
                float(t),
                refused_default,
                refused_away,
                refused_toward,
                policy,
                tt,
                steer_away,
            )
            row: dict[str, Any] = {"threshold": float(t)}
            if tt is not None:
                row["toward_threshold"] = tt
            if reference is not None:
                row["reference_toward"] = reference_toward(reference, policy, float(t), tt)
            table.append({**row, **outcome_rates(labels, refused, plain)})
    return table


def reference_toward(
    reference: np.ndarray, policy: str, threshold: float, toward_threshold: float | None
) -> float:
    """% of the reference windows a policy steers towards refusal (none under away-only): the
    rows :func:`policy_outcomes` gives the towards outcome when only that outcome is a refusal."""
    if reference.size == 0:
        return 0.0
    none, every = np.zeros(reference.size, dtype=bool), np.ones(reference.size, dtype=bool)
    towards = policy_outcomes(reference, threshold, none, none, every, policy, toward_threshold)
    return float(towards.mean() * 100)


def choose_threshold(
    table: list[dict[str, Any]],
    default_unsafe: float,
    unsafe_budget: float,
    default_plain: float | None = None,
    plain_budget: float | None = None,
    reference_budget: float | None = None,
) -> dict[str, Any]:
    """Best validation Avg among thresholds keeping unsafe refusal within the budget.

    With ``default_plain`` and ``plain_budget`` the plain prompts' refusal must also stay within
    ``plain_budget`` points above the default (steering must not create new over-refusal); with
    ``reference_budget`` at most that % of the reference-text windows may be steered towards
    refusal. When no row meets them all, the unsafe and plain budgets are kept, then the unsafe
    budget alone, then none.
    """

    def unsafe_ok(r: dict[str, Any]) -> bool:
        return bool(r["unsafe_refusal"] >= default_unsafe - unsafe_budget)

    def plain_ok(r: dict[str, Any]) -> bool:
        if default_plain is None or plain_budget is None:
            return True
        return bool(r["plain_refusal"] <= default_plain + plain_budget)

    def reference_ok(r: dict[str, Any]) -> bool:
        if reference_budget is None or "reference_toward" not in r:
            return True
        return bool(r["reference_toward"] <= reference_budget + 1e-9)

    allowed = [r for r in table if unsafe_ok(r) and plain_ok(r) and reference_ok(r)]
    pool = (
        allowed
        or [r for r in table if unsafe_ok(r) and plain_ok(r)]
        or [r for r in table if unsafe_ok(r)]
        or table
    )
    # Ties: prefer the lower safe refusal, then the middle of the tied range of thresholds.
    best = max(pool, key=lambda r: (round(r["avg"], 6), -r["safe_refusal"]))
    tied = [
        r
        for r in pool
        if abs(r["avg"] - best["avg"]) < 1e-9
        and abs(r["safe_refusal"] - best["safe_refusal"]) < 1e-9
    ]
    return dict(tied[len(tied) // 2], within_budget=bool(allowed))


def frontier(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per threshold T (the best Avg over the towards-threshold, if any): for reports."""
    best: dict[float, dict[str, Any]] = {}
    for row in table:
        kept = best.get(row["threshold"])
        if kept is None or row["avg"] > kept["avg"]:
            best[row["threshold"]] = row
    return [best[t] for t in sorted(best)]


def choose_policy(
    labels: Sequence[str],
    probabilities: np.ndarray,
    refused: tuple[np.ndarray, np.ndarray, np.ndarray],
    plain: np.ndarray,
    default_rates: dict[str, float],
    config: CalibrationConfig,
    reference: np.ndarray | None = None,
    steer_away: np.ndarray | None = None,
) -> tuple[Policy, dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The best threshold of every policy within the config's budgets, the policy chosen among
    them (best Avg within budget; ties go to the simpler policy, in POLICIES order) and each
    policy's frontier for the report. ``refused``: default, away and towards verdicts."""
    refused_default, refused_away, refused_toward = refused

    def table(policy: Policy, gate: np.ndarray | None) -> list[dict[str, Any]]:
        return pareto_table(
            labels,
            probabilities,
            refused_default,
            refused_away,
            refused_toward,
            policy,
            plain,
            threshold_range=config.threshold_range,
            reference=reference,
            steer_away=gate,
        )

    def pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return choose_threshold(
            rows,
            default_rates["unsafe_refusal"],
            config.unsafe_budget,
            default_rates["plain_refusal"],
            config.plain_budget,
            config.reference_budget,
        )

    tables = {policy: table(policy, steer_away) for policy in POLICIES}
    picks: dict[str, dict[str, Any]] = {policy: pick(rows) for policy, rows in tables.items()}
    policy: Policy = max(POLICIES, key=lambda p: (picks[p]["within_budget"], picks[p]["avg"]))
    if steer_away is not None:
        # what the refusal gate costs on validation: the chosen policy steering every row below T
        # away, its threshold chosen the same way
        picks[without_refusal_gate_key(policy)] = pick(table(policy, None))
    return policy, picks, {name: frontier(rows) for name, rows in tables.items()}
