"""SCANS decisions: the score and sign per prompt, and the policy that turns them into steering
coefficients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.fit import _transition_states, cosine_scores


@dataclass
class ScansDecision:
    """The classifier's view of one query: the gate's score (the transition score, or the probe's
    P(harmful)), sigma, and the paper's per-layer transition cosines (always reported)."""

    score: float
    sigma: int  # +1 unsafe, -1 safe
    layer_cosines: list[float]
    transition_score: float | None = None
    # the refusal gate's P(the model refuses), when the artifact has one
    refusal_probability: float | None = None
    # whether a row judged safe is steered away (False: the refusal gate says the model would
    # answer it anyway, so it is left unsteered)
    steer_away: bool = True


@dataclass
class ScansResult:
    """A decision and the (steered) response for one query."""

    prompt: str
    decision: ScansDecision
    response: str
    token_ids: list[int]
    stopped: bool


def _decisions(artifact: ScansArtifact, states: torch.Tensor) -> list[ScansDecision]:
    """Decisions from ``[n, len(recorded_layers), 2, hidden]`` states at (p, e)."""
    settings = artifact.settings
    recorded = list(settings.recorded_layers)
    cls_index = [recorded.index(layer) for layer in settings.cls_layers]
    transitions = states[:, cls_index, 0] - states[:, cls_index, 1]
    cos, transition_scores = cosine_scores(transitions, artifact.reference, settings.cls_layers)
    scores = transition_scores
    if settings.gate == "probe":
        assert artifact.probe is not None
        probe_index = [recorded.index(layer) for layer in settings.probe_layers]
        scores = artifact.probe.probability(states[:, probe_index])
    threshold = settings.threshold
    assert threshold is not None
    refusal: list[float | None] = [None] * len(scores)
    if artifact.refusal_probe is not None:
        probe_index = [recorded.index(layer) for layer in artifact.refusal_probe.layers]
        refusal = [float(p) for p in artifact.refusal_probe.probability(states[:, probe_index])]
    bar = settings.refusal_threshold
    return [
        ScansDecision(
            float(s),
            1 if float(s) >= threshold else -1,
            [float(c) for c in row],
            float(t),
            r,
            bar is None or r is None or r >= bar,
        )
        for s, row, t, r in zip(scores, cos, transition_scores, refusal, strict=True)
    ]


def classify(
    lm: LoadedModel, artifact: ScansArtifact, queries: Sequence[str], batch_size: int = 16
) -> list[ScansDecision]:
    """Score queries with a full forward of prompt + reply prefix (the reference computation)."""
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    states = _transition_states(
        lm,
        layout,
        queries,
        artifact.settings.reply_prefix,
        batch_size,
        artifact.settings.recorded_layers,
    )
    return _decisions(artifact, states)


Coefficients = Callable[[list[ScansDecision]], torch.Tensor]


def _away(decision: ScansDecision) -> float:
    """A safe row's coefficient: -1 (away from refusal), or 0 where the refusal gate says the
    model would answer anyway."""
    return -1.0 if decision.steer_away else 0.0


def signed(decisions: list[ScansDecision]) -> torch.Tensor:
    """SCANS' per-row coefficient: sigma (+1 towards refusal, -1 away from it; 0 for safe rows
    the refusal gate leaves alone)."""
    return torch.tensor([1.0 if d.sigma > 0 else _away(d) for d in decisions])


def unsteered(decisions: list[ScansDecision]) -> torch.Tensor:
    """No steering (coefficients all zero): decisions are still computed and reported."""
    return torch.zeros(len(decisions))


def away_only(decisions: list[ScansDecision]) -> torch.Tensor:
    """Steer rows judged safe away from refusal; leave flagged rows to the model (0)."""
    return torch.tensor([_away(d) if d.sigma < 0 else 0.0 for d in decisions])


def banded(toward_threshold: float) -> Coefficients:
    """Away from refusal below T; unsteered in [T, toward_threshold); towards it above."""

    def rule(decisions: list[ScansDecision]) -> torch.Tensor:
        return torch.tensor(
            [
                _away(d) if d.sigma < 0 else (1.0 if d.score >= toward_threshold else 0.0)
                for d in decisions
            ]
        )

    return rule


def policy_coefficients(artifact: ScansArtifact) -> Coefficients:
    """The coefficient rule of the artifact's steering policy."""
    settings = artifact.settings
    if settings.policy == "banded":
        if settings.toward_threshold is None:
            raise ValueError(
                "the banded policy needs `toward_threshold` in the artifact's settings; "
                "recalibrate with `safesteer calibrate`"
            )
        return banded(settings.toward_threshold)
    return away_only if settings.policy == "away-only" else signed
