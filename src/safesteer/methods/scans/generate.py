"""SCANS: refusal directions, transition-based harmfulness scores, signed steering (SPEC §1).

Fit from harmful and benign anchors:
  ``v_l = mean h_l(harmful)[p] - mean h_l(benign)[p]`` (unit norm) and the unsafe reference
  ``d_l = mean_harmful (h_l[p] - h_l[e])`` where p is the last prompt token and e the end of the
  fixed reply prefix ``Sure``.
Classify: ``s_q = mean_{l in L} cos(t_l(q), d_l)``; ``sigma = +1`` (unsafe) when ``s_q >= T``.
Steer: add ``sigma * alpha_l * v_l`` at the steering layers from the last prompt token on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from safesteer.core.activations import capture, forward, recording
from safesteer.core.generation import (
    Generated,
    GenerationConfig,
    StepCallback,
    decode_loop,
    generate_ids,
    length_sorted_batches,
    new_cache,
    rollback,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, ChatLayout, left_pad
from safesteer.core.steering import steering
from safesteer.methods.artifacts import ArtifactError, check_model, load_artifact, save_artifact
from safesteer.methods.scans.gate import FEATURE_KINDS, FeatureKind, ProbeGate

AlphaMode = Literal["absolute", "relative"]
Gate = Literal["transition", "probe"]
Policy = Literal["signed", "away-only", "banded"]
GATES: tuple[Gate, ...] = ("transition", "probe")
POLICIES: tuple[Policy, ...] = ("signed", "away-only", "banded")

# alpha relative to the mean residual norm at each steering layer; chosen on the embedded model's
# anchors so that steering changes refusals without breaking fluency (see docs/methods.md).
DEFAULT_RELATIVE_ALPHA = 0.02


@dataclass(frozen=True)
class ScansSettings:
    """Everything that defines a SCANS configuration besides the fitted tensors."""

    alpha: float
    alpha_mode: AlphaMode
    steer_layers: tuple[int, ...]
    cls_layers: tuple[int, ...]
    threshold: float | None  # None: calibrate on the anchors at fit time
    reply_prefix: str = "Sure"
    system_prompt: str | None = None
    # "paper": the published recipe; "calibrated": chosen on the validation set (calibrate.py)
    recipe: str = "paper"
    gate: Gate = "transition"  # the decision: paper transition score, or a linear probe
    # signed (paper); away-only (flagged rows left unsteered); banded (flagged rows steered towards
    # refusal only when their score reaches ``toward_threshold``, the others left unsteered)
    policy: Policy = "signed"
    toward_threshold: float | None = None
    probe_layers: tuple[int, ...] = ()
    probe_kind: FeatureKind = "last"
    # The classification layers T was calibrated (or chosen) on; None in older artifacts, where it
    # is ``cls_layers``. A transition-gate T is only valid for these layers.
    threshold_layers: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["steer_layers"] = list(self.steer_layers)
        data["cls_layers"] = list(self.cls_layers)
        data["probe_layers"] = list(self.probe_layers)
        if self.threshold_layers is not None:
            data["threshold_layers"] = list(self.threshold_layers)
        return data

    @property
    def calibrated_layers(self) -> tuple[int, ...]:
        """The classification layers the threshold belongs to."""
        return self.cls_layers if self.threshold_layers is None else self.threshold_layers

    @property
    def recorded_layers(self) -> tuple[int, ...]:
        """Layers whose (p, e) states the decision reads: classification and probe layers."""
        return tuple(sorted(set(self.cls_layers) | set(self.probe_layers)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScansSettings:
        """Inverse of :meth:`to_json`."""
        return cls(
            alpha=float(data["alpha"]),
            alpha_mode=data["alpha_mode"],
            steer_layers=tuple(int(i) for i in data["steer_layers"]),
            cls_layers=tuple(int(i) for i in data["cls_layers"]),
            threshold=None if data.get("threshold") is None else float(data["threshold"]),
            reply_prefix=data.get("reply_prefix", "Sure"),
            system_prompt=data.get("system_prompt"),
            recipe=data.get("recipe", "paper"),
            gate=_choice(data.get("gate", "transition"), GATES, "gate"),
            policy=_choice(data.get("policy", "signed"), POLICIES, "policy"),
            toward_threshold=(
                None if data.get("toward_threshold") is None else float(data["toward_threshold"])
            ),
            probe_layers=tuple(int(i) for i in data.get("probe_layers", ())),
            probe_kind=_choice(data.get("probe_kind", "last"), FEATURE_KINDS, "probe_kind"),
            threshold_layers=(
                None
                if data.get("threshold_layers") is None
                else tuple(int(i) for i in data["threshold_layers"])
            ),
        )


def _choice(value: Any, allowed: Sequence[Any], what: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(map(str, allowed))}")
    return value


@dataclass(frozen=True)
class Preset:
    """The paper's settings for one model (SPEC §1.3-1.4)."""

    num_layers: int
    alpha: float
    steer_layers: tuple[int, ...]
    cls_layers: tuple[int, ...]
    threshold: float


PRESETS: dict[str, Preset] = {
    "llama2-7b": Preset(32, 3.5, tuple(range(10, 20)), tuple(range(10, 32)), 0.75),
    "llama2-13b": Preset(40, 3.5, tuple(range(10, 20)), tuple(range(10, 19)), 0.75),
    "vicuna-7b": Preset(32, 4.0, tuple(range(10, 20)), tuple(range(10, 32)), 0.75),
    "vicuna-13b": Preset(40, 4.0, tuple(range(10, 20)), tuple(range(10, 19)), 0.75),
}


# The paper's layers for its two depths (SPEC §1.3-1.4): steering 10..19 for both; classification
# 10..N-1 for the 32-layer 7B models and 10..18 for the 40-layer 13B models.
PAPER_LAYERS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    32: (tuple(range(10, 20)), tuple(range(10, 32))),
    40: (tuple(range(10, 20)), tuple(range(10, 19))),
}


def scaled_layers(num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Steering and classification layers: the paper's for 32 and 40 layers, else scaled by depth.

    Other depths scale the 32-layer defaults: steering ~31 % to ~62 % of the depth (10..19 of 32),
    classification ~31 % to the last layer. (Scaling is not used for 40 layers: the paper's 13B
    layers are 10..19 / 10..18, not 12..24 / 12..39.)
    """
    if num_layers in PAPER_LAYERS:
        return PAPER_LAYERS[num_layers]
    start = max(1, round(10 / 32 * num_layers))
    stop = max(start + 1, round(20 / 32 * num_layers))
    return tuple(range(start, stop)), tuple(range(start, num_layers))


def default_settings(num_layers: int, preset: str | None = None) -> ScansSettings:
    """The preset's settings, or depth-scaled layers, relative alpha and a calibrated threshold."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        p = PRESETS[preset]
        if p.num_layers != num_layers:
            raise ValueError(
                f"preset {preset!r} is for {p.num_layers}-layer models; this model has "
                f"{num_layers} layers. Omit --preset to scale the layers by depth."
            )
        return ScansSettings(p.alpha, "absolute", p.steer_layers, p.cls_layers, p.threshold)
    steer, cls_layers = scaled_layers(num_layers)
    return ScansSettings(DEFAULT_RELATIVE_ALPHA, "relative", steer, cls_layers, None)


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """Parse ``10-19``, ``3,5,7`` or ``10-12,20`` into layer indices checked against the depth."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError(
                        f"layers {spec!r}: the range {part} runs backwards; write {hi}-{lo}"
                    )
                layers.extend(range(lo, hi + 1))
            elif part:
                layers.append(int(part))
    except ValueError as exc:
        if "runs backwards" in str(exc):
            raise
        raise ValueError(f"cannot read layers {spec!r}; write e.g. 10-19 or 3,5,7") from None
    bad = sorted({i for i in layers if not 0 <= i < num_layers})
    if bad or not layers:
        got = "none" if not bad else (f"{bad[0]}..{bad[-1]}" if len(bad) > 3 else str(bad))
        raise ValueError(
            f"layers {spec!r} must lie in 0..{num_layers - 1}: this model has {num_layers} "
            f"layers (out of range: {got})"
        )
    return tuple(sorted(set(layers)))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _span(layers: Sequence[int]) -> str:
    """``10..19`` for a contiguous run of layers, else the list."""
    items = list(layers)
    if items and items == list(range(items[0], items[-1] + 1)) and len(items) > 2:
        return f"{items[0]}..{items[-1]}"
    return str(items)


@dataclass
class ScansArtifact:
    """Fitted SCANS state: unit refusal vectors, unsafe reference transitions, residual norms."""

    vectors: torch.Tensor  # [num_layers, hidden], unit norm per layer
    reference: torch.Tensor  # [num_layers, hidden], mean unsafe transition d_l
    layer_norms: torch.Tensor  # [num_layers], mean residual norm at the last prompt token
    settings: ScansSettings
    anchors: dict[str, Any]
    model_fingerprint: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    probe: ProbeGate | None = None

    def __post_init__(self) -> None:
        if self.settings.gate == "probe" and self.probe is None:
            raise ArtifactError("a SCANS artifact with gate 'probe' needs its probe tensors")

    def layer_alpha(self, layer: int) -> float:
        """The norm added at ``layer``: alpha, or alpha times the layer's mean residual norm."""
        if self.settings.alpha_mode == "relative":
            return self.settings.alpha * float(self.layer_norms[layer])
        return self.settings.alpha

    def steering_vectors(self, direction: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """``alpha_l * v_l`` per steering layer (or another unit direction, e.g. a random one)."""
        source = self.vectors if direction is None else direction
        return {
            layer: self.layer_alpha(layer) * source[layer] for layer in self.settings.steer_layers
        }

    def with_settings(self, **changes: Any) -> ScansArtifact:
        """A copy with some settings replaced (e.g. ``alpha=2.0``).

        New classification layers without a new threshold are refused for the transition gate:
        T was calibrated on the old layers (use :func:`recalibrate_threshold`, or pass
        ``threshold`` too). A new threshold is recorded as belonging to the (new) layers.
        """
        settings = self.settings
        new_layers = tuple(changes.get("cls_layers", settings.cls_layers))
        if "threshold" in changes:
            changes["threshold_layers"] = new_layers
        elif (
            settings.gate == "transition"
            and "threshold_layers" not in changes
            and new_layers != settings.calibrated_layers
        ):
            raise ValueError(
                f"the threshold T={settings.threshold} was calibrated on classification layers "
                f"{_span(settings.calibrated_layers)}, not {_span(new_layers)}; recalibrate it "
                "on the anchors (recalibrate_threshold) or give a threshold as well"
            )
        return replace(self, settings=replace(settings, **changes))

    def save(self, directory: str | Path) -> Path:
        """Write the artifact (safetensors + manifest.json)."""
        manifest = {
            "settings": self.settings.to_json(),
            "anchors": self.anchors,
            "model_fingerprint": self.model_fingerprint,
            "calibration": self.calibration,
        }
        tensors = {
            "vectors": self.vectors,
            "reference": self.reference,
            "layer_norms": self.layer_norms,
        }
        if self.probe is not None:
            tensors.update(self.probe.tensors())
        return save_artifact(directory, "scans", tensors, manifest)

    @classmethod
    def load(cls, directory: str | Path, lm: LoadedModel | None = None) -> ScansArtifact:
        """Load an artifact; with ``lm``, fail clearly if it was fitted on another model."""
        manifest, tensors = load_artifact(directory, "scans")
        missing = [k for k in ("vectors", "reference", "layer_norms") if k not in tensors]
        if missing:
            raise ArtifactError(f"{directory} lacks the SCANS tensors {missing}; refit it.")
        if lm is not None:
            check_model(manifest, lm, directory)
        try:
            settings = ScansSettings.from_json(manifest["settings"])
            anchors, fingerprint = manifest["anchors"], manifest["model_fingerprint"]
            probe = None
            if settings.gate == "probe":
                probe = ProbeGate.from_tensors(tensors, settings.probe_layers, settings.probe_kind)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{directory} has a malformed SCANS manifest (settings, anchors, model "
                f"fingerprint or probe missing or invalid: {exc!r}); refit it."
            ) from exc
        return cls(
            vectors=tensors["vectors"],
            reference=tensors["reference"],
            layer_norms=tensors["layer_norms"],
            settings=settings,
            anchors=anchors,
            model_fingerprint=fingerprint,
            calibration=manifest.get("calibration", {}),
            probe=probe,
        )


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


@dataclass
class ScansDecision:
    """The classifier's view of one query: the gate's score (the transition score, or the probe's
    P(harmful)), sigma, and the paper's per-layer transition cosines (always reported)."""

    score: float
    sigma: int  # +1 unsafe, -1 safe
    layer_cosines: list[float]
    transition_score: float | None = None


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
    return [
        ScansDecision(
            float(s), 1 if float(s) >= threshold else -1, [float(c) for c in row], float(t)
        )
        for s, row, t in zip(scores, cos, transition_scores, strict=True)
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


def signed(decisions: list[ScansDecision]) -> torch.Tensor:
    """SCANS' per-row coefficient: sigma (+1 towards refusal, -1 away from it)."""
    return torch.tensor([float(d.sigma) for d in decisions])


def unsteered(decisions: list[ScansDecision]) -> torch.Tensor:
    """No steering (coefficients all zero): decisions are still computed and reported."""
    return torch.zeros(len(decisions))


def away_only(decisions: list[ScansDecision]) -> torch.Tensor:
    """Steer rows judged safe away from refusal; leave flagged rows to the model (0)."""
    return torch.tensor([-1.0 if d.sigma < 0 else 0.0 for d in decisions])


def banded(toward_threshold: float) -> Coefficients:
    """Away from refusal below T; unsteered in [T, toward_threshold); towards it above."""

    def rule(decisions: list[ScansDecision]) -> torch.Tensor:
        return torch.tensor(
            [
                -1.0 if d.sigma < 0 else (1.0 if d.score >= toward_threshold else 0.0)
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


@torch.inference_mode()
def _fused_batch(
    lm: LoadedModel,
    artifact: ScansArtifact,
    encoded: list[list[int]],
    reply_ids: list[int],
    config: GenerationConfig,
    coefficients: Coefficients,
    direction: torch.Tensor | None,
    on_step: StepCallback | None = None,
) -> tuple[list[ScansDecision], Generated]:
    """Decision and steered decoding sharing one prefill.

    1. prefill every prompt followed by the reply prefix (unsteered) in one forward, keeping the KV
       cache, and read the classifier's states at the last prompt token and the reply's end;
    2. roll the cache back by ``len(reply_prefix) + 1`` tokens (to just before the last prompt
       token) and rerun that token steered, then decode with steering on.
    Extra work over plain generation: ``len(reply_prefix) + 1`` tokens per row, one extra forward.
    """
    pad_id = int(lm.tokenizer.pad_token_id)
    reply_len = len(reply_ids)
    batch = left_pad([ids + reply_ids for ids in encoded], pad_id, lm.device)
    cache = new_cache(lm, rollback=True)
    with recording(lm, artifact.settings.recorded_layers, [-1 - reply_len, -1]) as rec:
        forward(lm, batch, past_key_values=cache, use_cache=True)
    decisions = _decisions(artifact, rec.stacked())
    rollback(cache, reply_len + 1)
    last_column = batch.width - reply_len - 1  # every row's last prompt token (left padding)
    prompt = Batch(
        batch.input_ids[:, : last_column + 1],
        batch.attention_mask[:, : last_column + 1],
        batch.position_ids[:, : last_column + 1],
    )
    step = Batch(prompt.input_ids[:, -1:], prompt.attention_mask, prompt.position_ids[:, -1:])
    with steering(lm, artifact.steering_vectors(direction), coefficients(decisions), last_column):
        out = forward(lm, step, past_key_values=cache, use_cache=True)
        generated = decode_loop(lm, prompt, out.logits[:, -1, :].float(), cache, config, on_step)
    return decisions, generated


def check_steerable(artifact: ScansArtifact, direction: torch.Tensor | None = None) -> None:
    """Refuse settings or tensors that would turn every response into nothing (NaN or inf)."""
    settings = artifact.settings
    if not math.isfinite(settings.alpha):
        raise ValueError(f"the steering strength alpha must be finite (got {settings.alpha})")
    if settings.threshold is not None and not math.isfinite(settings.threshold):
        raise ValueError(f"the threshold T must be finite (got {settings.threshold})")
    layers = list(settings.steer_layers)
    tensors = {"refusal vectors": artifact.vectors[layers], "reference": artifact.reference}
    tensors["layer norms"] = artifact.layer_norms[layers]
    if direction is not None:
        tensors["direction"] = direction[layers]
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(
            f"the SCANS artifact holds non-finite values in its {', '.join(bad)}; refit it"
        )


def scans_generate(
    lm: LoadedModel,
    artifact: ScansArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    coefficients: Coefficients | None = None,
    direction: torch.Tensor | None = None,
    on_batch: Callable[[list[int], list[ScansResult]], None] | None = None,
) -> list[ScansResult]:
    """Classify and generate for ``queries`` in length-sorted batches (one prefill per batch).

    ``coefficients`` maps decisions to per-row steering signs (default: the artifact's policy).
    ``on_batch(indices, results)`` is called after every batch (e.g. to write results as they come).
    """
    check_steerable(artifact, direction)
    if coefficients is None:
        coefficients = policy_coefficients(artifact)
    if not config.use_cache:
        raise ValueError("the fused SCANS path needs the KV cache; use scans_generate_two_pass")
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    reply_ids = layout.reply_ids(artifact.settings.reply_prefix)
    encoded = [layout.prompt_ids(q) for q in queries]
    results: list[ScansResult | None] = [None] * len(queries)
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        decisions, generated = _fused_batch(
            lm, artifact, [encoded[i] for i in indices], reply_ids, config, coefficients, direction
        )
        batch_results = _results(lm, [queries[i] for i in indices], decisions, generated)
        for i, r in zip(indices, batch_results, strict=True):
            results[i] = r
        if on_batch is not None:
            on_batch(indices, batch_results)
    return [r for r in results if r is not None]


def _results(
    lm: LoadedModel, queries: Sequence[str], decisions: list[ScansDecision], generated: Generated
) -> list[ScansResult]:
    texts = [
        str(lm.tokenizer.decode(t, skip_special_tokens=True)).strip() for t in generated.token_ids
    ]
    return [
        ScansResult(q, d, text, ids, stop)
        for q, d, text, ids, stop in zip(
            queries, decisions, texts, generated.token_ids, generated.stopped, strict=True
        )
    ]


def scans_generate_two_pass(
    lm: LoadedModel,
    artifact: ScansArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    coefficients: Coefficients | None = None,
) -> list[ScansResult]:
    """The straightforward computation: a full classification forward, then a steered generation
    with its own prefill. Slower; kept as the reference the fused path is tested against."""
    if coefficients is None:
        coefficients = policy_coefficients(artifact)
    decisions = classify(lm, artifact, queries, batch_size)
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    encoded = [layout.prompt_ids(q) for q in queries]
    results: list[ScansResult | None] = [None] * len(queries)
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in indices)
        batch_decisions = [decisions[i] for i in indices]
        with steering(lm, artifact.steering_vectors(), coefficients(batch_decisions), width - 1):
            generated = generate_ids(lm, [encoded[i] for i in indices], config)
        for i, r in zip(
            indices,
            _results(lm, [queries[i] for i in indices], batch_decisions, generated),
            strict=True,
        ):
            results[i] = r
    return [r for r in results if r is not None]
