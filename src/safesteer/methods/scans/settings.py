"""SCANS settings: layers, alpha, gate and policy; presets and the paper's layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from safesteer.methods.scans.gate import FEATURE_KINDS, FeatureKind

AlphaMode = Literal["absolute", "relative"]
Gate = Literal["transition", "probe"]
Policy = Literal["signed", "away-only", "banded"]
AwayMode = Literal["add", "clamp"]
AWAY_MODES: tuple[AwayMode, ...] = ("add", "clamp")
GATES: tuple[Gate, ...] = ("transition", "probe")
POLICIES: tuple[Policy, ...] = ("signed", "away-only", "banded")


def without_refusal_gate_key(policy: str) -> str:
    """The calibration's ``per_policy`` key of ``policy`` measured without the refusal gate."""
    return f"{policy} without the refusal gate"


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
    # How rows are steered away from refusal: "add" (the paper's -alpha * v) or "clamp" (the
    # projection on v capped at the artifact's per-layer ``caps``; ordinary text below the cap is
    # left alone). Steering towards refusal always adds +alpha * v.
    away_mode: AwayMode = "add"
    # The refusal gate (calibrated recipe): a row below T is steered away only when the refusal
    # probe (the gate's layers and features) gives P(the model refuses) >= this; None: every row
    # below T is steered away, as in the paper.
    refusal_threshold: float | None = None

    def summary(self) -> str:
        """One line describing a calibrated configuration."""
        threshold = "not set" if self.threshold is None else f"{self.threshold:.3f}"
        return (
            f"gate {self.gate} (layers {list(self.probe_layers)}, {self.probe_kind}), "
            f"T {threshold}, policy {self.policy}, steering layers "
            f"{list(self.steer_layers)}, alpha {self.alpha} ({self.alpha_mode}), "
            f"away {self.away_mode}"
            + (
                ""
                if self.refusal_threshold is None
                else f" when P(refuse) >= {self.refusal_threshold:.3g}"
            )
        )

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
            away_mode=_choice(data.get("away_mode", "add"), AWAY_MODES, "away_mode"),
            refusal_threshold=(
                None if data.get("refusal_threshold") is None else float(data["refusal_threshold"])
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
