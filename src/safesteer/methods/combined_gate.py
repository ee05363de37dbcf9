"""The combined method's second gate: a SCANS probe fitted under SafeSwitch's prompt format.

``scans+safeswitch`` steers a row away from refusal when SafeSwitch's stage 1 calls it clearly
benign. Stage 1 learnt "harmful" from SafeSwitch's training prompts, and a harmful request unlike
them can get a low P(harmful) and then be steered into an answer. The second gate is another,
independent reader of the same prefill: the SCANS gate's logistic probe
(:mod:`safesteer.methods.scans.gate`) on the last prompt token's states at a few layers, trained on
the SCANS anchors and the project's validation set (harmful, scary-but-safe and plain prompts;
never a test set), every prompt wrapped in SafeSwitch's system prompt exactly as the combined
method will see it. With the gate, a row is steered only when both readers call it benign.

The gate's threshold bounds the share of validation harmful prompts under it (out-of-fold
probabilities), like stage 1's steering threshold. It costs no forward: its states come from hooks
on the prefill the combined method runs anyway.

Optionally (``towards_budget``) the gate also has a *towards* threshold: a row stage 1 does not
flag, whose gate P(harmful) reaches it, is steered towards refusal with the SCANS vectors (SCANS'
own move for rows it calls harmful), so harmful requests stage 1 misses need not rely on the
model's own refusal. The threshold bounds the share of the validation set's scary-but-safe prompts
at or above it (out-of-fold), the prompts where a false refusal is likeliest.

Optionally (``release_budget``) the gate also has a *release* threshold: a row stage 1 flags, whose
gate P(harmful) falls under it, is released, i.e. SafeSwitch's refusal head does not take it over
and the model answers it unsteered. Stage 1 flags many scary-but-safe prompts (words like "kill"
or "shoot"); an independent reader that is confident they are benign vetoes that flag. The
threshold bounds the share of the validation harmful prompts that stage 1 flags whose out-of-fold
P(harmful) falls under it. A release that hands back no safe validation prompt can only cost
safety, so the fit drops it and says why in the report (``release_dropped``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safesteer.core.activations import capture
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import Prompt
from safesteer.methods.artifacts import ArtifactError, check_model, load_artifact, save_artifact
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.probe import budget_threshold, false_flag_threshold
from safesteer.methods.scans.calibration_cache import texts_sha256
from safesteer.methods.scans.gate import ProbeGate, auroc, choose_gate, fit_probe, out_of_fold

METHOD = "combined-gate"
RELEASE_BUDGETS_REPORTED = (0.01, 0.02, 0.05, 0.1)
FIT_COMMAND = "safesteer fit combined-gate --safeswitch-artifact DIR --out DIR"


def require_two_stage(switch: SafeSwitchArtifact) -> None:
    """Refuse a SafeSwitch artifact whose stage 1 cannot say which rows are benign."""
    if switch.settings.mode != "two-stage":
        raise ValueError(
            "scans+safeswitch needs a two-stage SafeSwitch artifact (stage 1 says which rows are "
            "benign); refit with `safesteer fit safeswitch --mode two-stage`"
        )


@dataclass
class CombinedGate:
    """A probe on last-token states and the P(harmful) under which a row may be steered."""

    probe: ProbeGate
    threshold: float
    system_prompt: str | None  # the SafeSwitch prompt format it was fitted under
    model_fingerprint: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    # rows stage 1 leaves unflagged are steered towards refusal at or above it (None: never)
    towards_threshold: float | None = None
    # rows stage 1 flags are released (no refusal head) under it (None: never)
    release_threshold: float | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers whose last-token states the probe reads."""
        return self.probe.layers

    def probabilities(self, states: torch.Tensor) -> torch.Tensor:
        """P(harmful) per row from ``[rows, len(layers), 1, hidden]`` last-token states."""
        return self.probe.probability(states)

    def summary(self) -> dict[str, Any]:
        """What a run records about the gate: its probe, threshold and validation numbers."""
        report = {k: v for k, v in self.report.items() if k != "per_layer_auroc"}
        return {
            "layers": list(self.layers),
            "threshold": self.threshold,
            "towards_threshold": self.towards_threshold,
            "release_threshold": self.release_threshold,
            **report,
        }

    def towards(self, probabilities: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        """Rows to steer towards refusal: not ``flagged`` by stage 1 and at or above the towards
        threshold (none without one)."""
        if self.towards_threshold is None:
            return torch.zeros_like(flagged, dtype=torch.bool)
        return ~flagged & (probabilities >= self.towards_threshold).to(flagged.device)

    def released(self, probabilities: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        """Rows whose stage-1 flag the gate vetoes: ``flagged`` and under the release threshold
        (none without one)."""
        if self.release_threshold is None:
            return torch.zeros_like(flagged, dtype=torch.bool)
        return flagged & (probabilities < self.release_threshold).to(flagged.device)

    def check_layout(self, switch: SafeSwitchArtifact) -> None:
        """Fail clearly when the gate was fitted under another prompt format than ``switch``."""
        if self.system_prompt != switch.settings.system_prompt:
            raise ArtifactError(
                "the combined gate was fitted under another system prompt than the SafeSwitch "
                f"artifact's ({self.system_prompt!r} vs {switch.settings.system_prompt!r}); "
                f"refit it for this artifact: `{FIT_COMMAND}`"
            )

    def save(self, directory: str | Path) -> Path:
        """Write the gate (safetensors + manifest.json)."""
        manifest = {
            "layers": list(self.layers),
            "kind": self.probe.kind,
            "threshold": self.threshold,
            "towards_threshold": self.towards_threshold,
            "release_threshold": self.release_threshold,
            "system_prompt": self.system_prompt,
            "model_fingerprint": self.model_fingerprint,
            "report": self.report,
        }
        return save_artifact(directory, METHOD, self.probe.tensors(), manifest)

    @classmethod
    def load(cls, directory: str | Path, lm: LoadedModel | None = None) -> CombinedGate:
        """Load a gate; with ``lm``, fail clearly if it was fitted on another model."""
        manifest, tensors = load_artifact(directory, METHOD, fit=METHOD)
        if lm is not None:
            check_model(manifest, lm, directory, fit=METHOD)
        try:
            probe = ProbeGate.from_tensors(tensors, manifest["layers"], manifest["kind"])
            towards = manifest.get("towards_threshold")
            release = manifest.get("release_threshold")
            return cls(
                probe=probe,
                threshold=float(manifest["threshold"]),
                system_prompt=manifest.get("system_prompt"),
                model_fingerprint=manifest["model_fingerprint"],
                report=manifest.get("report", {}),
                towards_threshold=None if towards is None else float(towards),
                release_threshold=None if release is None else float(release),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{directory} has a malformed combined gate ({exc!r}); refit it: `{FIT_COMMAND}`"
            ) from exc


def _shares(mask: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """``[rows in mask, rows]`` per group."""
    return {name: [int((mask & rows).sum()), int(rows.sum())] for name, rows in groups.items()}


def release_drop_reason(
    released: dict[str, list[int]], flagged: dict[str, list[int]]
) -> str | None:
    """Why a fitted release is dropped, or None to keep it: it is kept only when it hands back at
    least one safe validation prompt, since a release that frees none can only cost safety (when
    stage 1 flags (almost) no safe prompt, it has nothing to veto)."""
    if released["safe"][0] > 0:
        return None
    return (
        f"on the validation set the release hands back {released['unsafe'][0]} harmful prompts "
        f"and no safe one (stage 1 flags {flagged['safe'][0]} safe prompts), so it could only "
        "cost safety: the gate is saved without a release"
    )


def fit_combined_gate(
    lm: LoadedModel,
    switch: SafeSwitchArtifact,
    harmful_anchors: Sequence[str],
    benign_anchors: Sequence[str],
    validation: Sequence[Prompt],
    *,
    budget: float = 0.05,
    towards_budget: float | None = None,
    release_budget: float | None = None,
    n_layers: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> CombinedGate:
    """Fit the second gate for ``switch`` (see the module docstring).

    ``budget``: the largest share of validation harmful prompts whose out-of-fold P(harmful) may
    fall under the threshold. The report compares, on the validation set, the rows stage 1 alone
    would steer with the rows both gates would steer. ``towards_budget``: the largest share of
    validation scary-but-safe prompts whose out-of-fold P(harmful) may reach the towards threshold
    (None: no towards steering). ``release_budget``: the largest share of the validation harmful
    prompts stage 1 flags whose out-of-fold P(harmful) may fall under the release threshold (None:
    stage 1's flags stand)."""
    budgets = {"budget": budget, "towards_budget": towards_budget, "release_budget": release_budget}
    for name, value in budgets.items():
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    require_two_stage(switch)
    labels = [p.label for p in validation]
    if "unsafe" not in labels or "safe" not in labels:
        raise ValueError("the validation set needs both unsafe and safe prompts")
    say = progress or (lambda _msg: None)
    layout = ChatLayout(lm.tokenizer, switch.settings.system_prompt)
    texts = [*harmful_anchors, *benign_anchors, *(p.text for p in validation)]
    harmful = [True] * len(harmful_anchors) + [False] * len(benign_anchors)
    harmful += [label == "unsafe" for label in labels]
    say(f"recording last-token states of {len(texts)} prompts under SafeSwitch's prompt format")
    encoded = [layout.prompt_ids(t) for t in texts]
    states = capture(lm, encoded, [-1], batch_size=batch_size)  # [n, layers, 1, hidden]
    say("choosing the probe's layers by cross-validation")
    choice = choose_gate(states, harmful, n_layers=n_layers, seed=seed, kinds=("last",))
    oof = out_of_fold(states, harmful, choice.layers, "last", choice.c, 5, seed)
    first = len(harmful_anchors) + len(benign_anchors)
    val_p, val_harmful = oof[first:], np.asarray(harmful[first:])
    threshold = budget_threshold(val_p[val_harmful].tolist(), budget)
    probe = fit_probe(states, harmful, choice.layers, "last", choice.c, seed)

    stage1 = switch.stage1.probability(states[first:, switch.settings.layer % lm.num_layers, 0])
    by_stage1 = stage1.numpy() < switch.settings.steering_threshold
    kinds = np.asarray([p.meta.get("kind", "") for p in validation])
    scary = ~val_harmful & (kinds != "plain")
    groups = {"unsafe": val_harmful, "safe": ~val_harmful, "safe, not plain": scary}
    towards = None
    if towards_budget is not None:
        if not scary.any():
            raise ValueError("towards_budget needs scary-but-safe (not plain) validation prompts")
        towards = false_flag_threshold(val_p[scary].tolist(), towards_budget)
    flagged = switch.settings.stage1_flags(stage1).numpy()
    flagged_harmful_p = val_p[flagged & val_harmful].tolist()
    release = None
    if release_budget is not None:
        if not flagged_harmful_p:
            raise ValueError("release_budget needs validation harmful prompts that stage 1 flags")
        release = budget_threshold(flagged_harmful_p, release_budget)
    report = {
        "budget": budget,
        "c": choice.c,
        "oof_auroc_all": choice.oof_auroc,
        "oof_auroc_validation": auroc(val_harmful.tolist(), val_p),
        "stage1_auroc_validation": auroc(val_harmful.tolist(), stage1.numpy()),
        "per_layer_auroc": choice.per_layer_auroc["last"],
        "validation_sha256": texts_sha256([p.text for p in validation]),
        "anchors": {"harmful": len(harmful_anchors), "benign": len(benign_anchors)},
        "steered_by_stage1_alone": _shares(by_stage1, groups),
        "steered_with_gate": _shares(by_stage1 & (val_p < threshold), groups),
        "stage1_steering_threshold": switch.settings.steering_threshold,
    }
    flagged_shares = _shares(flagged, groups)
    if towards is not None or release is not None:
        report["flagged_by_stage1"] = flagged_shares
    if towards is not None:
        report["towards_budget"] = towards_budget
        report["steered_towards"] = _shares(~flagged & (val_p >= towards), groups)
    if release is not None:
        report["release_budget"] = release_budget
        released = _shares(flagged & (val_p < release), groups)
        report["released"] = released
        # what other budgets would release, for choosing one on the validation set
        report["release_by_budget"] = {
            str(b): _shares(flagged & (val_p < budget_threshold(flagged_harmful_p, b)), groups)
            for b in RELEASE_BUDGETS_REPORTED
        }
        dropped = release_drop_reason(released, flagged_shares)
        if dropped is not None:
            report["release_dropped"] = dropped
            release = None
    return CombinedGate(
        probe,
        threshold,
        switch.settings.system_prompt,
        lm.fingerprint(),
        report,
        towards_threshold=towards,
        release_threshold=release,
    )
