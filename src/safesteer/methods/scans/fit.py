"""Fitting SCANS: refusal vectors and reference transitions from anchors, and the threshold T
calibrated on out-of-fold scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from safesteer.core.activations import capture
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.scans.artifact import ScansArtifact, _sha, _span
from safesteer.methods.scans.settings import ScansSettings


def _transition_states(
    lm: LoadedModel,
    layout: ChatLayout,
    queries: Sequence[str],
    reply_prefix: str,
    batch_size: int,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """States ``[n, n_layers, 2, hidden]`` at the last prompt token and the reply prefix's end."""
    reply_len = len(layout.reply_ids(reply_prefix))
    encoded = [layout.encode(q, reply_prefix).input_ids for q in queries]
    return capture(lm, encoded, [-1 - reply_len, -1], layers=layers, batch_size=batch_size)


def cosine_scores(
    transitions: torch.Tensor, reference: torch.Tensor, cls_layers: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer cosines ``[n, len(L)]`` of transitions to the reference, and their mean ``s_q``.

    ``transitions`` is ``[n, n_layers_given, hidden]`` aligned with ``cls_layers``.
    """
    ref = reference[list(cls_layers)].to(transitions.dtype)
    cos = F.cosine_similarity(transitions, ref[None, :, :], dim=-1)
    return cos, cos.mean(dim=1)


def _out_of_fold_scores(
    harmful_transitions: torch.Tensor,
    benign_transitions: torch.Tensor,
    layers: list[int],
    folds: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every anchor against a reference fitted on the other folds' harmful anchors.

    Needs ``2 <= folds <= n_harmful`` so that every fold holds a harmful anchor and leaves one to
    fit on; every score is then written (checked).
    """
    rng = np.random.default_rng(seed)
    n_h, n_b = harmful_transitions.shape[0], benign_transitions.shape[0]
    fold_h = rng.permutation(n_h) % folds
    fold_b = rng.permutation(n_b) % folds
    scores_h = torch.full((n_h,), float("nan"))
    scores_b = torch.full((n_b,), float("nan"))
    for k in range(folds):
        train = torch.from_numpy(fold_h != k)
        reference = harmful_transitions[train].mean(dim=0)  # [all layers, hidden]
        held_h = torch.from_numpy(fold_h == k)
        held_b = torch.from_numpy(fold_b == k)
        scores_h[held_h] = cosine_scores(harmful_transitions[held_h][:, layers], reference, layers)[
            1
        ]
        if bool(held_b.any()):
            scores_b[held_b] = cosine_scores(
                benign_transitions[held_b][:, layers], reference, layers
            )[1]
    if bool(scores_h.isnan().any()) or bool(scores_b.isnan().any()):
        raise ValueError("calibration left anchors unscored (non-finite transitions?)")
    return scores_h, scores_b


def calibrate_threshold(
    harmful_transitions: torch.Tensor,
    benign_transitions: torch.Tensor,
    cls_layers: Sequence[int],
    folds: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick T from out-of-fold anchor scores: each fold is scored against a reference fitted on
    the other folds' harmful anchors; T maximises balanced accuracy (midpoint between scores).

    Fewer harmful anchors than ``folds`` use as many folds as there are harmful anchors; a single
    harmful anchor cannot be held out, so its scores are in-sample (recorded in ``method``).
    """
    n_h, n_b = harmful_transitions.shape[0], benign_transitions.shape[0]
    if n_h < 1 or n_b < 1:
        raise ValueError(
            "calibrating the threshold needs at least one harmful and one benign anchor"
        )
    if folds < 1:
        raise ValueError(f"folds must be at least 1, not {folds}")
    layers = list(cls_layers)
    folds = min(folds, n_h)
    if folds < 2:
        reference = harmful_transitions.mean(dim=0)
        scores_h = cosine_scores(harmful_transitions[:, layers], reference, layers)[1]
        scores_b = cosine_scores(benign_transitions[:, layers], reference, layers)[1]
        method = "in-sample scores on the anchors (one harmful anchor), max balanced accuracy"
    else:
        scores_h, scores_b = _out_of_fold_scores(
            harmful_transitions, benign_transitions, layers, folds, seed
        )
        method = f"{folds}-fold out-of-fold scores on the anchors, max balanced accuracy"
    all_scores = torch.cat([scores_h, scores_b]).sort().values
    candidates = ((all_scores[1:] + all_scores[:-1]) / 2).tolist() or [float(all_scores[0])]
    best_t, best_acc = candidates[0], -1.0
    for t in candidates:
        acc = 0.5 * (float((scores_h >= t).float().mean()) + float((scores_b < t).float().mean()))
        if acc > best_acc + 1e-12:
            best_t, best_acc = t, acc
    return {
        "method": method,
        "threshold": best_t,
        "balanced_accuracy": best_acc,
        "harmful_score_mean": float(scores_h.mean()),
        "benign_score_mean": float(scores_b.mean()),
    }


@torch.inference_mode()
def fit_scans(
    lm: LoadedModel,
    harmful: Sequence[str],
    benign: Sequence[str],
    settings: ScansSettings,
    *,
    seed: int = 0,
    batch_size: int = 16,
) -> ScansArtifact:
    """Fit refusal vectors, the unsafe reference transition and (if unset) the threshold."""
    if not harmful or not benign:
        raise ValueError("fitting SCANS needs at least one harmful and one benign anchor")
    layout = ChatLayout(lm.tokenizer, settings.system_prompt)
    states_h = _transition_states(lm, layout, harmful, settings.reply_prefix, batch_size)
    states_b = _transition_states(lm, layout, benign, settings.reply_prefix, batch_size)
    last_h, last_b = states_h[:, :, 0], states_b[:, :, 0]  # [n, layers, hidden] at p
    vectors = last_h.mean(dim=0) - last_b.mean(dim=0)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    trans_h = states_h[:, :, 0] - states_h[:, :, 1]
    trans_b = states_b[:, :, 0] - states_b[:, :, 1]
    reference = trans_h.mean(dim=0)
    layer_norms = torch.cat([last_h, last_b]).norm(dim=-1).mean(dim=0)
    calibration = calibrate_threshold(trans_h, trans_b, settings.cls_layers, seed=seed)
    if settings.threshold is None:
        settings = replace(settings, threshold=float(calibration["threshold"]))
    # the preset's or the calibrated T: either way it belongs to these classification layers
    settings = replace(settings, threshold_layers=settings.cls_layers)
    anchors = {
        "seed": seed,
        "harmful": list(harmful),
        "benign": list(benign),
        "harmful_sha256": [_sha(q) for q in harmful],
        "benign_sha256": [_sha(q) for q in benign],
    }
    return ScansArtifact(
        vectors, reference, layer_norms, settings, anchors, lm.fingerprint(), calibration
    )


@torch.inference_mode()
def recalibrate_threshold(
    lm: LoadedModel,
    artifact: ScansArtifact,
    cls_layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> ScansArtifact:
    """The artifact with classification layers ``cls_layers`` and T recalibrated for them on the
    artifact's own anchors (same folds and seed as at fit time; vectors and d_l are unchanged).

    Raises :class:`ArtifactError` when the artifact does not hold its anchor prompts.
    """
    harmful = list(artifact.anchors.get("harmful") or [])
    benign = list(artifact.anchors.get("benign") or [])
    if not harmful or not benign:
        raise ArtifactError(
            "this SCANS artifact does not hold its anchor prompts, so its threshold cannot be "
            f"recalibrated for classification layers {_span(cls_layers)}; give a threshold "
            "(--threshold) with the layers, or refit with them (safesteer fit scans --cls-layers)"
        )
    settings = artifact.settings
    layers = tuple(cls_layers)
    layout = ChatLayout(lm.tokenizer, settings.system_prompt)
    states_h = _transition_states(lm, layout, harmful, settings.reply_prefix, batch_size)
    states_b = _transition_states(lm, layout, benign, settings.reply_prefix, batch_size)
    trans_h = states_h[:, :, 0] - states_h[:, :, 1]
    trans_b = states_b[:, :, 0] - states_b[:, :, 1]
    seed = int(artifact.anchors.get("seed", 0))
    calibration = calibrate_threshold(trans_h, trans_b, layers, seed=seed)
    calibration["recalibrated_for_cls_layers"] = list(layers)
    new_settings = replace(
        settings,
        cls_layers=layers,
        threshold=float(calibration["threshold"]),
        threshold_layers=layers,
    )
    return replace(artifact, settings=new_settings, calibration=calibration)
