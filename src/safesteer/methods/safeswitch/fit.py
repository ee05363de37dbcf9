"""``fit_safeswitch``: label, train probers per layer, choose the layer and thresholds, train the
refusal head, and return the artifact."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.evaluation.judges.base import EMPTY, Judge, judge_all
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, head_checksum, sha256_text
from safesteer.methods.safeswitch.head import (
    HeadConfig,
    head_features,
    make_head_examples,
    train_refusal_head,
)
from safesteer.methods.safeswitch.probe import (
    FittedProber,
    ProberConfig,
    binary_metrics,
    budget_threshold,
    false_flag_threshold,
    fit_prober,
    layer_sweep,
    sweep_table,
)
from safesteer.methods.safeswitch.settings import (
    DEFAULT_N_DECODE,
    SAFESWITCH_SYSTEM_PROMPT,
    Mode,
    SafeSwitchSettings,
)
from safesteer.methods.safeswitch.train import (
    PAPER_THRESHOLD,
    THRESHOLD_CHOICES,
    Labelled,
    Progress,
    ThresholdChoice,
    TrainingPrompt,
    label_generation,
    split_rows,
)

# --------------------------------------------------------------------------------------------
# the whole fit

LayerChoice = int | Literal["best"] | None


@dataclass(frozen=True)
class FitConfig:
    """Settings of ``safesteer fit safeswitch``."""

    mode: Mode = "two-stage"
    layer: LayerChoice = None  # None: the last layer (as the released probers); "best": val AUROC
    n_decode: int = DEFAULT_N_DECODE
    label_tokens: int = 48
    batch_size: int = 16
    seed: int = 0
    system_prompt: str | None = SAFESWITCH_SYSTEM_PROMPT
    # calibrated: each prober's threshold with the best balanced accuracy on the validation
    # split; paper: the fixed 0.5 of the released SafeSwitch.
    thresholds: ThresholdChoice = "calibrated"
    # scans+safeswitch: the share of the validation split's harmful prompts that may fall under
    # the steering threshold (SafeSwitchSettings.steer_below).
    steer_budget: float = 0.05
    # Stage 1's false-flag budget: the share of the validation split's harmless prompts it may
    # flag. The stage-1 threshold is raised (never lowered) to meet it. None: no bound.
    harmless_budget: float | None = None
    # SafeSwitchSettings.head_repetition_penalty of the fitted artifact. 1.3 was chosen on 96
    # SORRY-Bench *train* prompts (flagged rows looping 12/73 -> 0/73); 1.0: none (fits before it).
    head_repetition_penalty: float = 1.3
    prober: ProberConfig = field(default_factory=ProberConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        if self.thresholds not in THRESHOLD_CHOICES:
            raise ValueError(
                f"unknown thresholds {self.thresholds!r}; use {' or '.join(THRESHOLD_CHOICES)}"
            )
        if not 0.0 <= self.steer_budget < 1.0:
            raise ValueError(f"steer_budget must be in [0, 1), got {self.steer_budget}")
        if self.harmless_budget is not None and not 0.0 <= self.harmless_budget < 1.0:
            raise ValueError(f"harmless_budget must be in [0, 1), got {self.harmless_budget}")
        if not self.head_repetition_penalty > 0:
            raise ValueError(
                "head_repetition_penalty must be positive (1.0: no penalty), "
                f"got {self.head_repetition_penalty}"
            )

    @property
    def prober_config(self) -> ProberConfig:
        """The prober settings with the threshold rule of ``thresholds`` applied."""
        if self.thresholds == "paper":
            return replace(self.prober, fixed_threshold=PAPER_THRESHOLD)
        return self.prober

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["prober"] = self.prober.to_json()
        data["head"] = self.head.to_json()
        return data


def _choose_layer(choice: LayerChoice, fitted: Sequence[FittedProber], num_layers: int) -> int:
    if choice is None:
        return num_layers - 1
    if choice == "best":
        scores = [-1.0 if f.val["auroc"] is None else float(f.val["auroc"]) for f in fitted]
        return max(range(len(scores)), key=lambda i: (scores[i], i))  # ties: the deeper layer
    layer = int(choice) + (num_layers if int(choice) < 0 else 0)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {choice} outside 0..{num_layers - 1}")
    return layer


def fit_safeswitch(
    lm: LoadedModel,
    prompts: Sequence[TrainingPrompt],
    judge: Judge,
    config: FitConfig | None = None,
    *,
    head_extra: Sequence[TrainingPrompt] = (),
    data_report: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> SafeSwitchArtifact:
    """Label, train the probers (with a layer sweep) and the refusal head; return the artifact.

    The refusal head trains on up to ``config.head.prompts`` harmful prompts: those of the
    training split first (with their pilot tokens), then ``head_extra`` (without).
    """
    config = config or FitConfig()
    say = progress or (lambda message: None)
    harmful = [p.harmful for p in prompts]
    if not any(harmful) or all(harmful):
        raise ValueError("SafeSwitch needs both harmful and harmless training prompts")
    timings: dict[str, float] = {}
    layout = ChatLayout(lm.tokenizer, config.system_prompt)
    texts = [p.text for p in prompts]

    start = time.perf_counter()
    labelled = label_generation(
        lm,
        layout,
        texts,
        n_decode=config.n_decode,
        max_new_tokens=config.label_tokens,
        batch_size=config.batch_size,
        on_batch=lambda done, total: say(f"labelling answers: {done}/{total}"),
    )
    timings["label_generation_s"] = time.perf_counter() - start
    start = time.perf_counter()
    verdicts = judge_all(judge, list(zip(texts, labelled.answers, strict=True)))
    timings["judge_s"] = time.perf_counter() - start
    # unparsable and empty (degenerate) answers carry no compliance label
    comply = [None if v is None or v == EMPTY else not v for v in verdicts]
    y_harm = torch.tensor([int(h) for h in harmful])
    y_comply = torch.tensor([-1 if c is None else int(c) for c in comply])
    y_direct = torch.tensor(
        [-1 if c is None else int(h and c) for h, c in zip(harmful, comply, strict=True)]
    )
    splits = split_rows(harmful, config.seed)

    start = time.perf_counter()
    sweep_labels = y_harm if config.mode == "two-stage" else y_direct
    fitted = layer_sweep(labelled.prompt_states, sweep_labels, splits, config.prober_config, say)
    layer = _choose_layer(config.layer, fitted, lm.num_layers)
    stage1 = fitted[layer]
    p1 = _stage1_probabilities(labelled, stage1, layer, splits)
    false_flags = None
    if config.harmless_budget is not None:
        stage1, false_flags = _bound_false_flags(
            stage1, p1, splits, harmful, config.harmless_budget
        )
    stage2: FittedProber | None = None
    if config.mode == "two-stage":
        stage2 = fit_prober(labelled.pilot_states, y_comply, splits, config.prober_config)
    timings["probers_s"] = time.perf_counter() - start
    say(f"probers trained (layer {layer}); training the refusal head")

    start = time.perf_counter()
    head_pool = [i for i in splits["train"] if harmful[i]]
    rng = random.Random(config.head.seed)
    head_rows = sorted(rng.sample(head_pool, min(config.head.prompts, len(head_pool))))
    extra = [p for p in head_extra if p.harmful][: max(0, config.head.prompts - len(head_rows))]
    if not head_rows and not extra:
        raise ValueError("no harmful training prompts left for the refusal head")
    head_prompts = [prompts[i] for i in head_rows] + extra
    pilots = [labelled.pilots[i] for i in head_rows] + [[] for _ in extra]
    examples, targets = make_head_examples(
        lm,
        layout,
        [p.text for p in head_prompts],
        [p.category for p in head_prompts],
        pilots if config.mode == "two-stage" else None,
        config.head,
    )
    features, target_ids = head_features(lm, examples, config.head.feature_batch)
    timings["head_features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    delta, head_history = train_refusal_head(lm, features, target_ids, config.head, say)
    timings["head_training_s"] = time.perf_counter() - start

    steer = None
    if stage2 is not None:
        steer = _steering_threshold(stage1, p1, splits, harmful, config.steer_budget)
    settings = SafeSwitchSettings(
        mode=config.mode,
        layer=layer,
        n_decode=config.n_decode,
        threshold1=stage1.threshold,
        threshold2=None if stage2 is None else stage2.threshold,
        system_prompt=config.system_prompt,
        steer_below=None if steer is None else steer["steer_below"],
        head_repetition_penalty=config.head_repetition_penalty,
    )
    report: dict[str, Any] = {
        "sweep": sweep_table(fitted),
        "sweep_label": "harmful" if config.mode == "two-stage" else "harmful and complies",
        "stage1": stage1.summary(),
        "stage2": None if stage2 is None else stage2.summary(),
        "head": {**head_history, "examples": len(examples), "target_examples": targets[:5]},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if steer is not None:
        report["steering"] = steer
    if false_flags is not None:
        report["stage1_false_flags"] = false_flags
    if stage2 is not None:
        report["two_stage_test"] = _two_stage_test(
            labelled, stage1, stage2, layer, splits, y_direct
        )
    training = {
        "config": config.to_json(),
        "judge": getattr(judge, "name", type(judge).__name__),
        "data": data_report or {},
        "counts": {
            "prompts": len(prompts),
            "harmful": int(sum(harmful)),
            "harmless": len(prompts) - int(sum(harmful)),
            "comply_harmful": sum(bool(c) for c, h in zip(comply, harmful, strict=True) if h),
            "comply_harmless": sum(bool(c) for c, h in zip(comply, harmful, strict=True) if not h),
            "unjudged": sum(c is None for c in comply),
            "train": len(splits["train"]),
            "val": len(splits["val"]),
            "test": len(splits["test"]),
            "head_prompts": len(head_prompts),
            "head_prompts_with_pilot_available": len(head_rows),
        },
        "prompt_sha256": [sha256_text(t) for t in texts] + [sha256_text(p.text) for p in extra],
    }
    return SafeSwitchArtifact(
        settings=settings,
        stage1=stage1.prober,
        stage2=None if stage2 is None else stage2.prober,
        head_delta=delta,
        model_fingerprint=lm.fingerprint(),
        base_head_checksum=head_checksum(lm),
        training=training,
        report=report,
    )


def _stage1_probabilities(
    labelled: Labelled, stage1: FittedProber, layer: int, splits: dict[str, list[int]]
) -> dict[int, float]:
    """Stage 1's P(harmful) of every validation and test row (one prober pass)."""
    rows = splits["val"] + splits["test"]
    if not rows:
        return {}
    states = labelled.prompt_states[torch.tensor(rows, dtype=torch.long), layer]
    return dict(
        zip(rows, (float(v) for v in stage1.prober.probability(states).tolist()), strict=True)
    )


def _share(values: Sequence[float], threshold: float, *, below: bool) -> float | None:
    """The share of ``values`` below ``threshold`` (steered) or at or above it (flagged)."""
    if not values:
        return None
    hits = sum((v < threshold) if below else (v >= threshold) for v in values)
    return round(hits / len(values), 4)


def _bound_false_flags(
    stage1: FittedProber,
    p1: dict[int, float],
    splits: dict[str, list[int]],
    harmful: Sequence[bool],
    budget: float,
) -> tuple[FittedProber, dict[str, Any]]:
    """Stage 1 with its threshold raised until at most ``budget`` of the validation split's
    harmless prompts are flagged; its metrics at the new threshold, and what the change does."""
    harmless_val = [p1[i] for i in splits["val"] if not harmful[i]]
    threshold = max(stage1.threshold, false_flag_threshold(harmless_val, budget))
    metrics = {
        part: binary_metrics(
            [p1[i] for i in splits[part]], [int(harmful[i]) for i in splits[part]], threshold
        )
        for part in ("val", "test")
    }
    bounded = replace(stage1, threshold=threshold, val=metrics["val"], test=metrics["test"])
    report: dict[str, Any] = {
        "budget": budget,
        "balanced_threshold": stage1.threshold,
        "threshold": threshold,
    }
    for part in ("val", "test"):
        for name, want in (("harmful", True), ("harmless", False)):
            part_p = [p1[i] for i in splits[part] if harmful[i] == want]
            for key, t in (("before", stage1.threshold), ("after", threshold)):
                report[f"{part}_{name}_flagged_{key}"] = _share(part_p, t, below=False)
    return bounded, report


def _steering_threshold(
    stage1: FittedProber,
    p1: dict[int, float],
    splits: dict[str, list[int]],
    harmful: Sequence[bool],
    budget: float,
) -> dict[str, Any]:
    """The combined method's steering threshold from the validation split, and what it does there
    and on the test split (share of harmful and of harmless prompts that would be steered)."""
    t = min(
        stage1.threshold, budget_threshold([p1[i] for i in splits["val"] if harmful[i]], budget)
    )
    out: dict[str, Any] = {"budget": budget, "steer_below": t}
    for part in ("val", "test"):
        for name, want in (("harmful", True), ("harmless", False)):
            part_p = [p1[i] for i in splits[part] if harmful[i] == want]
            out[f"{part}_{name}_steered"] = _share(part_p, t, below=True)
    return out


def _two_stage_test(
    labelled: Labelled,
    stage1: FittedProber,
    stage2: FittedProber,
    layer: int,
    splits: dict[str, list[int]],
    y_direct: torch.Tensor,
) -> dict[str, Any]:
    """The combined decision on the test split against "harmful and complies"."""
    rows = [
        i
        for i in splits["test"]
        if int(y_direct[i]) >= 0 and bool(torch.isfinite(labelled.pilot_states[i]).all())
    ]
    if not rows:
        return {"n": 0}
    idx = torch.tensor(rows)
    p1 = stage1.prober.probability(labelled.prompt_states[idx, layer])
    p2 = stage2.prober.probability(labelled.pilot_states[idx])
    flagged = (p1 >= stage1.threshold) & (p2 >= stage2.threshold)
    return binary_metrics(flagged.float().tolist(), y_direct[idx].tolist(), 0.5)
