"""The refusal gate: steer a row away from refusal only when the model would refuse it.

Steering away from refusal helps a prompt the model would refuse; on a prompt it would answer
anyway (an ordinary question, a document handed over for a summary) it can only cost fluency. The
refusal gate is a second linear probe on the same recorded states as the harm gate (its layers
and feature kind), trained to predict P(the unsteered model refuses) from the default replies to
the safe validation prompts and to the reference-text windows. Rows below the harm threshold are
steered away only when that probability reaches the refusal threshold.

The refusal threshold is the lowest one that steers away at most ``budget`` % of the
reference-text windows the default model answers (their out-of-fold probabilities): ordinary
text the model answers anyway is left alone, and over-refused prompts, which the probe ranks
high, keep their steering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from safesteer.methods.scans.gate import FeatureKind, ProbeGate, auroc, fit_probe, out_of_fold

REFUSAL_C = (0.01, 0.05, 0.2)  # regularisation candidates, chosen by out-of-fold AUROC


class RefusalGateError(ValueError):
    """The training prompts cannot fit a refusal gate (too few refused or answered ones)."""


@dataclass
class RefusalGateFit:
    """The fitted refusal probe, the out-of-fold P(refuse) of its training rows and the
    threshold chosen on the reference windows."""

    probe: ProbeGate
    c: float
    oof_auroc: float
    threshold: float
    oof: np.ndarray  # out-of-fold P(refuse) of the training rows (safe validation, then reference)

    def info(
        self, reference_oof: np.ndarray, reference_refused: np.ndarray, budget: float
    ) -> dict[str, Any]:
        """What the calibration report shows about the refusal gate."""
        answered = reference_oof[~reference_refused]
        return {
            "c": self.c,
            "oof_auroc": self.oof_auroc,
            "threshold": self.threshold,
            "reference_budget": budget,
            "reference_steered_away": away_share(reference_oof, self.threshold),
            "answered_reference_steered_away": away_share(answered, self.threshold),
        }


def _percent(mask: np.ndarray) -> float:
    """% of true entries (0 for no entries)."""
    return float(mask.mean() * 100) if mask.size else 0.0


def away_share(probabilities: np.ndarray, threshold: float) -> float:
    """% of rows with P(refuse) at or above ``threshold`` (0 for no rows)."""
    return _percent(probabilities >= threshold)


def reference_threshold(reference: np.ndarray, budget: float) -> float:
    """The lowest threshold that steers at most ``budget`` % of the reference windows away: just
    above the window that would break the budget (0 when every window may be steered)."""
    if not 0.0 <= budget <= 100.0:
        raise ValueError(f"the reference budget is a percentage, got {budget}")
    if reference.size == 0 or budget >= 100.0:
        return 0.0
    ordered = np.sort(reference)[::-1]
    allowed = int(np.floor(reference.size * budget / 100.0 + 1e-9))
    if allowed >= reference.size:
        return 0.0
    # strictly above the first window that may not be steered: nextafter keeps ties out as well
    return float(np.nextafter(ordered[allowed], np.inf))


def fit_refusal_gate(
    states: torch.Tensor,
    refused: Sequence[bool],
    layers: Sequence[int],
    kind: FeatureKind,
    reference_rows: np.ndarray,
    budget: float,
    seed: int = 0,
) -> RefusalGateFit:
    """Fit the refusal probe on ``[n, all_layers, 2, hidden]`` states with the default model's
    refusal labels; ``reference_rows`` marks the reference-text windows among them: the
    out-of-fold probabilities of those the model answers set the threshold."""
    labels = [bool(r) for r in refused]
    if len(set(labels)) < 2:
        raise RefusalGateError(
            "the refusal gate needs refused and answered prompts among the safe validation "
            "prompts and reference windows; this model refused all or none of them"
        )
    folds = min(5, sum(labels), len(labels) - sum(labels))
    if folds < 2:
        raise RefusalGateError(
            "the refusal gate needs at least two refused and two answered training prompts"
        )
    scored = []
    for c in REFUSAL_C:
        oof = out_of_fold(states, labels, layers, kind, c, folds, seed)
        scored.append((auroc(labels, oof), c, oof))
    best_auc, best_c, best_oof = max(scored, key=lambda item: (item[0], -item[1]))
    probe = fit_probe(states, labels, layers, kind, best_c, seed)
    answered_reference = np.asarray(reference_rows, dtype=bool) & ~np.asarray(labels)
    threshold = reference_threshold(best_oof[answered_reference], budget)
    return RefusalGateFit(probe, best_c, best_auc, threshold, best_oof)


def calibrate_refusal_gate(
    validation_states: torch.Tensor,
    reference_states: torch.Tensor,
    labels: Sequence[str],
    refused_validation: np.ndarray,
    refused_reference: np.ndarray,
    layers: Sequence[int],
    kind: FeatureKind,
    budget: float,
    seed: int = 0,
) -> tuple[RefusalGateFit, np.ndarray, dict[str, Any]]:
    """Fit the refusal gate on the safe validation prompts and the reference windows (labels:
    the default model's strict refusal verdicts). Returns the fit, the gate's verdict per
    validation row (steer away or not: out-of-fold for safe rows, the full probe for unsafe
    ones, which it never saw) and the report's summary."""
    safe = np.asarray([label == "safe" for label in labels])
    states = torch.cat([validation_states[torch.from_numpy(safe)], reference_states])
    refused = np.concatenate([refused_validation[safe], refused_reference]).astype(bool)
    is_reference = np.arange(len(refused)) >= int(safe.sum())
    fit = fit_refusal_gate(states, list(refused), layers, kind, is_reference, budget, seed)
    probability = np.zeros(len(labels))
    probability[safe] = fit.oof[~is_reference]
    if (~safe).any():
        unsafe_states = validation_states[torch.from_numpy(~safe)][:, list(layers)]
        probability[~safe] = fit.probe.probability(unsafe_states).numpy()
    steer_away = probability >= fit.threshold
    info = {
        **fit.info(fit.oof[is_reference], refused[is_reference], budget),
        "reference_refused_by_default": _percent(refused_reference),
        "safe_validation_steered_away": _percent(steer_away[safe]),
        "over_refused_steered_away": _percent(steer_away[safe & refused_validation]),
    }
    return fit, steer_away, info
