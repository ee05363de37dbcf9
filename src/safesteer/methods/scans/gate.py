"""A linear probe gate for SCANS: P(harmful) from states the fused prefill already records.

Features are the residual states at the last prompt token (``p``), at the end of the ``Sure``
reply prefix (``e``) or their difference (the transition), at a few layers, concatenated and
standardised. A logistic regression (scikit-learn) maps them to the probability that the query is
harmful. It needs no extra forward: SCANS' fused prefill records these states anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from safesteer.methods.scans.calibration_cache import cached_json, fingerprint

FeatureKind = Literal["last", "reply", "transition"]
FEATURE_KINDS: tuple[FeatureKind, ...] = ("last", "reply", "transition")


def features(states: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
    """``[n, layers, hidden]`` features from ``[n, layers, 2, hidden]`` (p, e) states."""
    if kind == "last":
        return states[:, :, 0]
    if kind == "reply":
        return states[:, :, 1]
    return states[:, :, 0] - states[:, :, 1]


@dataclass
class ProbeGate:
    """Standardise, then a linear score; ``probability`` is the logistic of that score."""

    layers: tuple[int, ...]
    kind: FeatureKind
    mean: torch.Tensor  # [len(layers) * hidden]
    scale: torch.Tensor  # [len(layers) * hidden]
    weight: torch.Tensor  # [len(layers) * hidden]
    bias: float

    def probability(self, states: torch.Tensor) -> torch.Tensor:
        """P(harmful) for ``[n, len(layers), 2, hidden]`` states at (p, e) of ``self.layers``."""
        x = features(states.float(), self.kind).reshape(states.shape[0], -1)
        z = ((x - self.mean) / self.scale) @ self.weight + self.bias
        return torch.sigmoid(z)

    def tensors(self, prefix: str = "probe") -> dict[str, torch.Tensor]:
        """Tensors to store in an artifact, named ``{prefix}_mean`` and so on."""
        return {
            f"{prefix}_mean": self.mean,
            f"{prefix}_scale": self.scale,
            f"{prefix}_weight": self.weight,
            f"{prefix}_bias": torch.tensor([self.bias]),
        }

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        layers: Sequence[int],
        kind: FeatureKind,
        prefix: str = "probe",
    ) -> ProbeGate:
        """Inverse of :meth:`tensors`."""
        return cls(
            tuple(int(i) for i in layers),
            kind,
            tensors[f"{prefix}_mean"].float(),
            tensors[f"{prefix}_scale"].float(),
            tensors[f"{prefix}_weight"].float(),
            float(tensors[f"{prefix}_bias"].reshape(-1)[0]),
        )


def _matrix(states: torch.Tensor, layers: Sequence[int], kind: FeatureKind) -> np.ndarray:
    x = features(states[:, list(layers)].float(), kind)
    return x.reshape(x.shape[0], -1).numpy().astype(np.float64)


def fit_probe(
    states: torch.Tensor,
    harmful: Sequence[bool],
    layers: Sequence[int],
    kind: FeatureKind,
    c: float = 0.05,
    seed: int = 0,
) -> ProbeGate:
    """Fit the gate on ``[n, all_layers, 2, hidden]`` states with harmful labels."""
    x = _matrix(states, layers, kind)
    y = np.asarray(harmful, dtype=int)
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit((x - mean) / scale, y)
    return ProbeGate(
        tuple(int(i) for i in layers),
        kind,
        torch.from_numpy(mean).float(),
        torch.from_numpy(scale).float(),
        torch.from_numpy(model.coef_[0]).float(),
        float(model.intercept_[0]),
    )


def out_of_fold(
    states: torch.Tensor,
    harmful: Sequence[bool],
    layers: Sequence[int],
    kind: FeatureKind,
    c: float = 0.05,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """P(harmful) for every row from a probe fitted on the other folds (for honest thresholds)."""
    y = np.asarray(harmful, dtype=int)
    out = np.zeros(len(y))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(np.zeros(len(y)), y):
        gate = fit_probe(states[train], [bool(v) for v in y[train]], layers, kind, c, seed)
        out[held] = gate.probability(states[held][:, list(layers)]).numpy()
    return out


def transition_scores(
    states: torch.Tensor, reference: torch.Tensor, cls_layers: Sequence[int]
) -> np.ndarray:
    """The paper's score per row: the cosine of the transition (state at ``p`` minus the state
    after the affirmative reply) with the reference, averaged over ``cls_layers``
    (``states``: ``[rows, layers, 2, hidden]``)."""
    layers = list(cls_layers)
    transitions = states[:, layers, 0] - states[:, layers, 1]
    cos = torch.nn.functional.cosine_similarity(transitions, reference[layers][None], dim=-1)
    return cos.mean(dim=1).numpy()


def auroc(harmful: Sequence[bool], scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve with harmful as the positive class."""
    return float(roc_auc_score(np.asarray(harmful, dtype=int), np.asarray(scores)))


@dataclass
class GateChoice:
    """The probe configuration chosen by cross-validation, with its out-of-fold quality."""

    layers: tuple[int, ...]
    kind: FeatureKind
    c: float
    oof_auroc: float
    per_layer_auroc: dict[str, list[float]]  # kind -> AUROC of a one-layer probe per layer


def choose_gate(
    states: torch.Tensor,
    harmful: Sequence[bool],
    *,
    n_layers: int = 3,
    candidates_c: Sequence[float] = (0.01, 0.05, 0.2),
    seed: int = 0,
    kinds: Sequence[FeatureKind] = FEATURE_KINDS,
) -> GateChoice:
    """Pick the feature kind (among ``kinds``) and the ``n_layers`` best layers by one-layer
    out-of-fold AUROC, then the regularisation ``c`` of the combined probe, all by
    cross-validation. ``kinds=("last",)`` needs only the last prompt token's states."""
    total = states.shape[1]
    per_layer: dict[str, list[float]] = {}
    for kind in kinds:
        per_layer[kind] = [
            auroc(harmful, out_of_fold(states, harmful, [layer], kind, 0.05, 4, seed))
            for layer in range(total)
        ]
    best_kind = max(kinds, key=lambda k: max(per_layer[k]))
    ranked = sorted(range(total), key=lambda i: -per_layer[best_kind][i])
    layers = tuple(sorted(ranked[:n_layers]))
    scored = [
        (auroc(harmful, out_of_fold(states, harmful, layers, best_kind, c, 5, seed)), c)
        for c in candidates_c
    ]
    best_auc, best_c = max(scored)
    return GateChoice(layers, best_kind, best_c, best_auc, per_layer)


def cached_gate_choice(
    path: Path,
    model_id: Sequence[Any],
    states: torch.Tensor,
    harmful: Sequence[bool],
    n_layers: int = 3,
    seed: int = 0,
) -> GateChoice:
    """``choose_gate``, saved at ``path`` under a key of everything it depends on, so a resumed
    calibration reads the choice instead of repeating the cross-validation (minutes on 1.5B)."""
    key = fingerprint(list(model_id), "gate", states, list(harmful), n_layers, seed)

    def compute() -> dict[str, Any]:
        return asdict(choose_gate(states, harmful, n_layers=n_layers, seed=seed))

    stored = cached_json(path, key, compute)
    return GateChoice(
        layers=tuple(int(i) for i in stored["layers"]),
        kind=stored["kind"],
        c=float(stored["c"]),
        oof_auroc=float(stored["oof_auroc"]),
        per_layer_auroc={k: [float(x) for x in v] for k, v in stored["per_layer_auroc"].items()},
    )


@dataclass
class GateFit:
    """The chosen probe, fitted on every row, with the out-of-fold probabilities of every row."""

    choice: GateChoice
    probe: ProbeGate
    oof: np.ndarray
    harmful: list[bool]

    def info(self, first_validation_row: int) -> dict[str, Any]:
        """The choice and its out-of-fold AUROC, overall and on the validation rows (from
        ``first_validation_row`` on), for the calibration report."""
        rows = slice(first_validation_row, None)
        return {
            "layers": list(self.choice.layers),
            "kind": self.choice.kind,
            "c": self.choice.c,
            "oof_auroc_all": self.choice.oof_auroc,
            "oof_auroc_validation": auroc(self.harmful[rows], self.oof[rows]),
            "per_layer_auroc": self.choice.per_layer_auroc,
        }


def fit_gate(
    choice: GateChoice, states: torch.Tensor, harmful: Sequence[bool], seed: int = 0
) -> GateFit:
    """Fit the chosen probe on every row and compute every row's out-of-fold probability
    (5 folds)."""
    labels = [bool(h) for h in harmful]
    oof = out_of_fold(states, labels, choice.layers, choice.kind, choice.c, 5, seed)
    probe = fit_probe(states, labels, choice.layers, choice.kind, choice.c, seed)
    return GateFit(choice, probe, oof, labels)
