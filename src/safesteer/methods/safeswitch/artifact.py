"""The SafeSwitch artifact (probers, thresholds, refusal-head delta) and the LM-head helpers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safesteer.core.fingerprint import weight_checksum
from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import ArtifactError, check_model, load_artifact, save_artifact
from safesteer.methods.safeswitch.settings import Prober, SafeSwitchSettings


def output_head(lm: LoadedModel) -> nn.Module:
    """The LM head module (``get_output_embeddings``), whose input is the final-normed state."""
    head = lm.model.get_output_embeddings()
    if not isinstance(head, nn.Module) or not isinstance(
        getattr(head, "weight", None), nn.Parameter
    ):
        raise ValueError(
            f"{type(lm.model).__name__} has no output projection with a weight "
            "(get_output_embeddings); SafeSwitch's refusal head needs one."
        )
    return head


def head_weight(lm: LoadedModel) -> torch.Tensor:
    weight = output_head(lm).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def head_bias(lm: LoadedModel) -> torch.Tensor | None:
    bias = getattr(output_head(lm), "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def head_checksum(lm: LoadedModel) -> list[float]:
    """Checksum of the base LM head (the refusal head is stored as a difference from it)."""
    return weight_checksum(head_weight(lm))


@dataclass
class SafeSwitchArtifact:
    """Fitted SafeSwitch state: prober(s), thresholds and the refusal head's difference."""

    settings: SafeSwitchSettings
    stage1: Prober  # two-stage: "harmful?"; direct: "harmful and will comply?"
    stage2: Prober | None  # two-stage: "will comply?" at the state after n_decode tokens
    head_delta: torch.Tensor  # [vocab, hidden] float16: refusal head minus base head
    model_fingerprint: dict[str, Any]
    base_head_checksum: list[float]
    training: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    _weight_cache: dict[tuple[int, str, str], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.settings.mode == "two-stage" and self.stage2 is None:
            raise ValueError("a two-stage SafeSwitch artifact needs a stage-2 prober")

    def with_settings(self, **changes: Any) -> SafeSwitchArtifact:
        """A copy with some settings replaced (e.g. ``threshold1=0.7``)."""
        return replace(self, settings=replace(self.settings, **changes), _weight_cache={})

    def refusal_weight(self, lm: LoadedModel) -> torch.Tensor:
        """``W_base + delta`` as a new tensor in the head's dtype and device (cached per model).

        The model's own head weight is only read: tied embeddings stay tied and unchanged.
        """
        base = head_weight(lm)
        key = (id(base), str(base.device), str(base.dtype))
        if key not in self._weight_cache:
            if tuple(base.shape) != tuple(self.head_delta.shape):
                raise ArtifactError(
                    f"the refusal head has shape {tuple(self.head_delta.shape)} but the model's "
                    f"LM head is {tuple(base.shape)}"
                )
            with torch.no_grad():
                weight = base.detach().float() + self.head_delta.to(base.device, torch.float32)
            self._weight_cache.clear()
            self._weight_cache[key] = weight.to(base.dtype)
        return self._weight_cache[key]

    def training_hashes(self) -> set[str]:
        """sha256 of every (stripped) training prompt: evaluation excludes these."""
        return set(self.training.get("prompt_sha256", []))

    def save(self, directory: str | Path) -> Path:
        """Write the artifact (safetensors + manifest.json)."""
        tensors = {**self.stage1.tensors("stage1"), "head_delta": self.head_delta.half()}
        if self.stage2 is not None:
            tensors.update(self.stage2.tensors("stage2"))
        manifest = {
            "settings": self.settings.to_json(),
            "model_fingerprint": self.model_fingerprint,
            "base_head_checksum": self.base_head_checksum,
            "head_storage": "delta from the base LM head, float16",
            "training": self.training,
            "report": self.report,
        }
        return save_artifact(directory, "safeswitch", tensors, manifest)

    @classmethod
    def load(cls, directory: str | Path, lm: LoadedModel | None = None) -> SafeSwitchArtifact:
        """Load an artifact; with ``lm``, fail clearly if it was fitted on another model."""
        manifest, tensors = load_artifact(directory, "safeswitch", fit="safeswitch")
        if lm is not None:
            check_model(manifest, lm, directory, fit="safeswitch")
        try:
            settings = SafeSwitchSettings.from_json(manifest["settings"])
            stage1 = Prober.from_tensors("stage1", tensors)
            stage2 = (
                Prober.from_tensors("stage2", tensors) if settings.mode == "two-stage" else None
            )
            artifact = cls(
                settings=settings,
                stage1=stage1,
                stage2=stage2,
                head_delta=tensors["head_delta"],
                model_fingerprint=manifest["model_fingerprint"],
                base_head_checksum=[float(x) for x in manifest["base_head_checksum"]],
                training=manifest.get("training", {}),
                report=manifest.get("report", {}),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"{directory} has a malformed SafeSwitch artifact ({exc!r}); refit it with "
                "`safesteer fit safeswitch --out DIR`."
            ) from exc
        if lm is not None:
            artifact._check_head(lm, directory)
        return artifact

    def check_fitted_on(self, lm: LoadedModel, directory: str | Path) -> None:
        """What ``load(directory, lm)`` checks, for an artifact loaded before the model was."""
        check_model({"model_fingerprint": self.model_fingerprint}, lm, directory, fit="safeswitch")
        self._check_head(lm, directory)

    def _check_head(self, lm: LoadedModel, directory: str | Path) -> None:
        want, got = self.base_head_checksum, head_checksum(lm)
        scale = max(abs(want[1]), 1e-6)
        if abs(want[1] - got[1]) > 0.02 * scale or abs(want[0] - got[0]) > 0.02 * scale:
            raise ArtifactError(
                f"The refusal head in {directory} was trained against another LM head "
                f"(checksum {got} vs {want}); fit SafeSwitch for this model."
            )


def sha256_text(text: str) -> str:
    """sha256 of a stripped prompt text (how training prompts are recorded)."""
    return hashlib.sha256(text.strip().encode()).hexdigest()
