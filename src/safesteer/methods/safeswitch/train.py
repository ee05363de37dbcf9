"""Fitting SafeSwitch: training prompts, labels, features, probers, layer sweep, refusal head.

1. Prompts: harmful = SORRY-Bench train + TrustLLM misuse/jailbreak train; harmless = RepE-Data
   train's harmless instructions, the project's written validation prompts that are safe (many
   with alarming words: the prober must not flag those), and AlpacaEval and TriviaQA questions.
   Prompts of every other evaluation set are removed by normalised text and their absence is
   checked before anything is trained. AlpacaEval and TriviaQA are also SafeSwitch benchmarks: the
   artifact stores the hashes of its training prompts and ``safesteer eval`` never tests on them,
   so those two sets are split into a training part (what the fit drew) and a test part.
2. One labelling generation per batch: the model answers greedily (the prompt format of
   SafeSwitch's system prompt); hooks record every decoder layer at the last prompt token during
   the prefill (one pass for the whole layer sweep) and the last layer at the ``n_decode``-th
   generated token of the same generation. ``comply`` is a judge's verdict on the answer.
3. Probers (:mod:`safesteer.methods.safeswitch.probe`), one per layer for the sweep.
4. The refusal head (:mod:`safesteer.methods.safeswitch.head`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from safesteer.core.activations import TrackedHooks, hidden_of
from safesteer.core.generation import GenerationConfig, generate_ids, length_sorted_batches
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import DatasetError, Prompt, load_test_set
from safesteer.datasets.validation import EVALUATION_SETS, normalise, written_prompts
from safesteer.evaluation.judges import EMPTY, Judge, judge_all
from safesteer.methods.safeswitch.head import (
    HeadConfig,
    head_features,
    make_head_examples,
    train_refusal_head,
)
from safesteer.methods.safeswitch.method import (
    DEFAULT_N_DECODE,
    SAFESWITCH_SYSTEM_PROMPT,
    Mode,
    SafeSwitchArtifact,
    SafeSwitchSettings,
    generated_count,
    head_checksum,
    sha256_text,
)
from safesteer.methods.safeswitch.probe import (
    FittedProber,
    ProberConfig,
    binary_metrics,
    fit_prober,
    layer_sweep,
    sweep_table,
)

HARMFUL_SOURCES = ("sorry-bench-train", "trustllm-misuse-train", "trustllm-jailbreak-train")
HARMLESS_SOURCES = ("repe-train", "validation-written", "alpaca-eval", "trivia-qa")
# Benchmarks that are also training sources: eval excludes the artifact's own training prompts.
SPLIT_SOURCES = ("alpaca-eval", "trivia-qa")
# Never trained on: every other evaluation set of the registry (SCANS' and SafeSwitch's).
EVAL_SOURCES = tuple(s for s in EVALUATION_SETS if s not in SPLIT_SOURCES)
ThresholdChoice = Literal["calibrated", "paper"]
THRESHOLD_CHOICES: tuple[ThresholdChoice, ...] = ("calibrated", "paper")
PAPER_THRESHOLD = 0.5
Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# training prompts


@dataclass(frozen=True)
class TrainingPrompt:
    """One prober/head training prompt; ``category`` is SORRY-Bench's (else None)."""

    text: str
    harmful: bool
    source: str
    category: str | None = None


def _equal_shares(sizes: Sequence[int], n: int) -> list[int]:
    """Split ``n`` as evenly as possible over groups of the given sizes (water filling)."""
    alloc = [0] * len(sizes)
    left = min(n, sum(sizes))
    open_groups = [i for i, s in enumerate(sizes) if s > 0]
    while left > 0 and open_groups:
        share = max(1, left // len(open_groups))
        for i in list(open_groups):
            take = min(share, sizes[i] - alloc[i], left)
            alloc[i] += take
            left -= take
            if alloc[i] >= sizes[i]:
                open_groups.remove(i)
            if left == 0:
                break
    return alloc


def _to_training(prompt: Prompt, harmful: bool, source: str) -> TrainingPrompt:
    category = prompt.meta.get("category") if source.startswith("sorry-bench") else None
    return TrainingPrompt(prompt.text, harmful, source, None if category is None else str(category))


@dataclass
class TrainingData:
    """Prober prompts, extra harmful prompts for the refusal head only, and what was done."""

    prompts: list[TrainingPrompt]
    head_extra: list[TrainingPrompt]
    report: dict[str, Any]


def _source_prompts(source: str, harmful: bool, data_dir: str | Path | None) -> list[Prompt]:
    """One training source; mixed-label sources keep only the rows of the wanted label."""
    if source == "validation-written":
        rows = written_prompts()
    else:
        rows = load_test_set(source, data_dir=data_dir)
    if source in ("repe-train", "validation-written"):
        wanted = "unsafe" if harmful else "safe"
        rows = [p for p in rows if p.label == wanted]
    return rows


def load_training_prompts(
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    head_extra: int = 0,
) -> TrainingData:
    """Harmful and harmless training prompts (``limit``: half each, spread evenly over sources),
    and up to ``head_extra`` further harmful ones (refusal head only; no labelling pass needed).

    Prompts whose normalised text appears in an evaluation set are dropped; the result is then
    checked to share no text with any evaluation set that could be loaded.
    """
    eval_texts: set[str] = set()
    checked: list[str] = []
    unchecked: list[str] = []
    for name in EVAL_SOURCES:
        try:
            eval_texts.update(normalise(p.text) for p in load_test_set(name, data_dir=data_dir))
            checked.append(name)
        except DatasetError:
            unchecked.append(name)
    pools: dict[str, list[TrainingPrompt]] = {}
    removed: dict[str, int] = {}
    seen: set[str] = set()
    for sources, harmful in ((HARMFUL_SOURCES, True), (HARMLESS_SOURCES, False)):
        for source in sources:
            kept: list[TrainingPrompt] = []
            dropped = 0
            for prompt in _source_prompts(source, harmful, data_dir):
                key = normalise(prompt.text)
                if not key or key in seen:
                    continue
                if key in eval_texts:
                    dropped += 1
                    continue
                seen.add(key)
                kept.append(_to_training(prompt, harmful, source))
            pools[source] = kept
            removed[source] = dropped
    rng = random.Random(seed)
    chosen: list[TrainingPrompt] = []
    for sources, share in (
        (HARMFUL_SOURCES, None if limit is None else math.ceil(limit / 2)),
        (HARMLESS_SOURCES, None if limit is None else limit // 2),
    ):
        sizes = [len(pools[s]) for s in sources]
        counts = sizes if share is None else _equal_shares(sizes, share)
        for source, count in zip(sources, counts, strict=True):
            pool = pools[source]
            picked = sorted(rng.sample(range(len(pool)), count))
            chosen.extend(pool[i] for i in picked)
    used = {p.text for p in chosen}
    spare = [p for s in HARMFUL_SOURCES for p in pools[s] if p.text not in used]
    extra = rng.sample(spare, min(head_extra, len(spare)))
    overlap = [p.text for p in chosen + extra if normalise(p.text) in eval_texts]
    if overlap:  # an explicit check, not an assert: it must also hold under python -O
        raise RuntimeError(f"{len(overlap)} evaluation prompts leaked into training: {overlap[:3]}")
    report = {
        "sources": {s: sum(p.source == s for p in chosen) for s in pools},
        "removed_as_eval_overlap": removed,
        "eval_sets_checked": checked,
        "eval_sets_not_found": unchecked,
        "limit": limit,
        "seed": seed,
        "head_extra": len(extra),
    }
    return TrainingData(chosen, extra, report)


def split_rows(
    harmful: Sequence[bool], seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> dict[str, list[int]]:
    """Seeded train/val/test split, stratified by the harmful label."""
    rng = random.Random(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for value in (True, False):
        group = [i for i, h in enumerate(harmful) if h == value]
        rng.shuffle(group)
        n = len(group)
        n_val = round(n * fractions[1]) if n >= 3 else 0
        n_test = round(n * fractions[2]) if n >= 3 else 0
        out["val"].extend(group[:n_val])
        out["test"].extend(group[n_val : n_val + n_test])
        out["train"].extend(group[n_val + n_test :])
    return {k: sorted(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# labelling generation with feature capture


class _LabelHooks(TrackedHooks):
    """Every layer at the last prompt token (prefill) and the last layer at the ``n_decode``-th
    generated token, recorded during one ordinary generation."""

    def __init__(self, lm: LoadedModel, prompt_width: int, n_decode: int) -> None:
        self.prompt_width = prompt_width
        self.n_decode = n_decode
        self.last = lm.num_layers - 1
        self.prompt_states: dict[int, torch.Tensor] = {}
        self.pilot_state: torch.Tensor | None = None
        super().__init__(lm.model)
        self._handles.extend(
            layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(lm.layers)
        )

    def _hook(self, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            step = generated_count(self._tracker, self.prompt_width)
            hidden = hidden_of(output)
            if step == 0 and layer not in self.prompt_states:
                self.prompt_states[layer] = hidden[:, -1, :].detach().to("cpu", torch.float32)
            if layer == self.last and step == self.n_decode and self.pilot_state is None:
                self.pilot_state = hidden[:, -1, :].detach().to("cpu", torch.float32)

        return hook


@dataclass
class Labelled:
    """Features and answers of the labelling generation, in prompt order."""

    prompt_states: torch.Tensor  # [n, n_layers, hidden] at the last prompt token
    pilot_states: torch.Tensor  # [n, hidden] last layer after n_decode tokens (NaN: none)
    answers: list[str]
    pilots: list[list[int]]  # the first n_decode generated ids of each answer


def label_generation(
    lm: LoadedModel,
    layout: ChatLayout,
    texts: Sequence[str],
    *,
    n_decode: int,
    max_new_tokens: int,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> Labelled:
    """Greedy answers plus the prober features, from one generation per batch."""
    if max_new_tokens <= n_decode:
        raise ValueError("the labelling answers must be longer than n_decode tokens")
    encoded = [layout.prompt_ids(t) for t in texts]
    n = len(texts)
    prompt_states = torch.zeros(n, lm.num_layers, lm.hidden_size)
    pilot_states = torch.full((n, lm.hidden_size), float("nan"))
    answers = [""] * n
    pilots: list[list[int]] = [[] for _ in range(n)]
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    done = 0
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        prompts = [encoded[i] for i in indices]
        hooks = _LabelHooks(lm, max(len(p) for p in prompts), n_decode)
        try:
            generated = generate_ids(lm, prompts, config)
        finally:
            hooks.remove()
        states = torch.stack([hooks.prompt_states[k] for k in range(lm.num_layers)], dim=1)
        for row, i in enumerate(indices):
            prompt_states[i] = states[row]
            if hooks.pilot_state is not None:
                pilot_states[i] = hooks.pilot_state[row]
            ids = generated.token_ids[row]
            answers[i] = str(lm.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            pilots[i] = list(ids[:n_decode])
        done += len(indices)
        if on_batch is not None:
            on_batch(done, n)
    return Labelled(prompt_states, pilot_states, answers, pilots)


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
    prober: ProberConfig = field(default_factory=ProberConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        if self.thresholds not in THRESHOLD_CHOICES:
            raise ValueError(
                f"unknown thresholds {self.thresholds!r}; use {' or '.join(THRESHOLD_CHOICES)}"
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

    settings = SafeSwitchSettings(
        mode=config.mode,
        layer=layer,
        n_decode=config.n_decode,
        threshold1=stage1.threshold,
        threshold2=None if stage2 is None else stage2.threshold,
        system_prompt=config.system_prompt,
    )
    report: dict[str, Any] = {
        "sweep": sweep_table(fitted),
        "sweep_label": "harmful" if config.mode == "two-stage" else "harmful and complies",
        "stage1": stage1.summary(),
        "stage2": None if stage2 is None else stage2.summary(),
        "head": {**head_history, "examples": len(examples), "target_examples": targets[:5]},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
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
