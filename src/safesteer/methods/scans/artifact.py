"""The SCANS artifact: vectors, reference transitions, norms, threshold and gate; save and load."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import ArtifactError, check_model, load_artifact, save_artifact
from safesteer.methods.scans.gate import ProbeGate
from safesteer.methods.scans.settings import ScansSettings, without_refusal_gate_key


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
    # [num_layers] projection caps on the unit vectors for away_mode "clamp" (NaN: no cap)
    caps: torch.Tensor | None = None
    # P(the model refuses) on the probe's layers and features; rows below T are steered away only
    # when it reaches settings.refusal_threshold (see refusal_gate.py)
    refusal_probe: ProbeGate | None = None

    def __post_init__(self) -> None:
        if self.settings.gate == "probe" and self.probe is None:
            raise ArtifactError("a SCANS artifact with gate 'probe' needs its probe tensors")
        if self.settings.refusal_threshold is not None and not self.settings.probe_layers:
            raise ArtifactError(
                "a SCANS artifact with a refusal_threshold reads its refusal probe on the probe "
                "layers, and its settings name none (probe_layers); recalibrate with "
                "`safesteer calibrate`"
            )
        if self.settings.refusal_threshold is not None and self.refusal_probe is None:
            raise ArtifactError(
                "a SCANS artifact with a refusal_threshold needs its refusal probe tensors "
                "(refusal_probe_*); recalibrate with `safesteer calibrate`"
            )
        if self.settings.away_mode == "clamp":
            layers = list(self.settings.steer_layers)
            if self.caps is None or not bool(torch.isfinite(self.caps[layers]).all()):
                raise ArtifactError(
                    "a SCANS artifact with away_mode 'clamp' needs a finite projection cap for "
                    "every steering layer (tensor `caps`); recalibrate with `safesteer calibrate`"
                )

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

    def steering_caps(self, direction: torch.Tensor | None = None) -> dict[int, float] | None:
        """Per-layer projection caps for clamped away-steering, or None (additive steering).

        Caps belong to the artifact's own vectors: another direction (the random control) is
        steered additively with the same alpha.
        """
        if self.settings.away_mode != "clamp" or direction is not None or self.caps is None:
            return None
        return {layer: float(self.caps[layer]) for layer in self.settings.steer_layers}

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

    def without_refusal_gate(self, reason: str) -> ScansArtifact:
        """A copy with the refusal gate removed: every row below T is steered away again.

        The calibration record keeps ``reason``, the removed threshold and, when the calibration
        measured it, the validation row of the same policy without the refusal gate.
        """
        if self.settings.refusal_threshold is None:
            raise ArtifactError("this SCANS artifact has no refusal gate to remove")
        if not reason.strip():
            raise ValueError("say why the refusal gate is removed (it is kept in the manifest)")
        calibration = copy.deepcopy(self.calibration)
        per_policy = calibration.get("chosen", {}).get("per_policy", {})
        calibration["refusal_gate_removed"] = {
            "reason": reason,
            "refusal_threshold": self.settings.refusal_threshold,
            "validation": per_policy.get(without_refusal_gate_key(self.settings.policy)),
        }
        return replace(
            self,
            settings=replace(self.settings, refusal_threshold=None),
            refusal_probe=None,
            calibration=calibration,
        )

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
        if self.refusal_probe is not None:
            tensors.update(self.refusal_probe.tensors("refusal_probe"))
        if self.caps is not None:
            tensors["caps"] = self.caps
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
            probe = refusal_probe = None
            if settings.gate == "probe":
                probe = ProbeGate.from_tensors(tensors, settings.probe_layers, settings.probe_kind)
            if settings.refusal_threshold is not None:
                refusal_probe = ProbeGate.from_tensors(
                    tensors, settings.probe_layers, settings.probe_kind, "refusal_probe"
                )
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
            caps=tensors.get("caps"),
            refusal_probe=refusal_probe,
        )
