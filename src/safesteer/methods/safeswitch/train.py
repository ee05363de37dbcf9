"""Fitting SafeSwitch: training prompts, labels, features, probers, layer sweep, refusal head.

1. Prompts: harmful = SORRY-Bench train + TrustLLM misuse/jailbreak train + the project's written
   validation prompts that are harmful; harmless = RepE-Data train's harmless instructions, the
   written validation prompts that are safe (many with alarming words: the prober must not flag
   those), and AlpacaEval and TriviaQA questions. The written prompts enter on both sides in the
   same surface styles (short questions and imperatives), so that the prober cannot learn "short
   question = harmless" from the sources' styles.
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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from safesteer.core.activations import TrackedHooks, hidden_of
from safesteer.core.generation import GenerationConfig, generate_ids, length_sorted_batches
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import DatasetError, Prompt, load_test_set
from safesteer.datasets.validation import (
    EVALUATION_SETS,
    WRITTEN_FILE,
    WRITTEN_FILES,
    normalise,
    written_prompts,
)
from safesteer.methods.safeswitch.generate import generated_count

HARMFUL_SOURCES = (
    "sorry-bench-train",
    "trustllm-misuse-train",
    "trustllm-jailbreak-train",
    "validation-written",
)
HARMLESS_SOURCES = ("repe-train", "validation-written", "alpaca-eval", "trivia-qa")
# Benchmarks that are also training sources: eval excludes the artifact's own training prompts.
SPLIT_SOURCES = ("alpaca-eval", "trivia-qa")
# Never trained on: every other evaluation set of the registry (SCANS' and SafeSwitch's).
EVAL_SOURCES = tuple(s for s in EVALUATION_SETS if s not in SPLIT_SOURCES)
ThresholdChoice = Literal["calibrated", "paper"]
THRESHOLD_CHOICES: tuple[ThresholdChoice, ...] = ("calibrated", "paper")
PAPER_THRESHOLD = 0.5
# Which batches of the project's written prompts are a training source: all of them (default), or
# the first only, as the documented v1/v2 fits used.
WrittenChoice = Literal["all", "first"]
WRITTEN_CHOICES: tuple[WrittenChoice, ...] = ("all", "first")
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


def _source_prompts(
    source: str, harmful: bool, data_dir: str | Path | None, written: WrittenChoice
) -> list[Prompt]:
    """One training source; mixed-label sources keep only the rows of the wanted label."""
    if source == "validation-written":
        rows = written_prompts(WRITTEN_FILES if written == "all" else (WRITTEN_FILE,))
    else:
        rows = load_test_set(source, data_dir=data_dir)
    if source in ("repe-train", "validation-written"):
        wanted = "unsafe" if harmful else "safe"
        rows = [p for p in rows if p.label == wanted]
    return rows


@dataclass
class CleanPools:
    """Every training source with evaluation prompts removed, keyed by (source, harmful)."""

    pools: dict[tuple[str, bool], list[TrainingPrompt]]
    removed: dict[tuple[str, bool], int]
    eval_texts: set[str]  # normalised texts of every evaluation set that could be loaded
    checked: list[str]
    unchecked: list[str]


def clean_pools(data_dir: str | Path | None = None, written: WrittenChoice = "all") -> CleanPools:
    """Every harmful and harmless training source, deduplicated, without any prompt whose
    normalised text appears in an evaluation set (SCANS' or SafeSwitch's)."""
    eval_texts: set[str] = set()
    checked: list[str] = []
    unchecked: list[str] = []
    for name in EVAL_SOURCES:
        try:
            eval_texts.update(normalise(p.text) for p in load_test_set(name, data_dir=data_dir))
            checked.append(name)
        except DatasetError:
            unchecked.append(name)
    # keyed by (source, harmful): the written validation prompts feed both sides
    pools: dict[tuple[str, bool], list[TrainingPrompt]] = {}
    removed: dict[tuple[str, bool], int] = {}
    seen: set[str] = set()
    for sources, harmful in ((HARMFUL_SOURCES, True), (HARMLESS_SOURCES, False)):
        for source in sources:
            kept: list[TrainingPrompt] = []
            dropped = 0
            for prompt in _source_prompts(source, harmful, data_dir, written):
                key = normalise(prompt.text)
                if not key or key in seen:
                    continue
                if key in eval_texts:
                    dropped += 1
                    continue
                seen.add(key)
                kept.append(_to_training(prompt, harmful, source))
            pools[(source, harmful)] = kept
            removed[(source, harmful)] = dropped
    return CleanPools(pools, removed, eval_texts, checked, unchecked)


def load_training_prompts(
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    head_extra: int = 0,
    written: WrittenChoice = "all",
) -> TrainingData:
    """Harmful and harmless training prompts (``limit``: half each, spread evenly over sources),
    and up to ``head_extra`` further harmful ones (refusal head only; no labelling pass needed).
    ``written``: all batches of the project's written prompts, or the first only.

    Prompts whose normalised text appears in an evaluation set are dropped; the result is then
    checked to share no text with any evaluation set that could be loaded.
    """
    clean = clean_pools(data_dir, written)
    pools, removed, eval_texts = clean.pools, clean.removed, clean.eval_texts
    checked, unchecked = clean.checked, clean.unchecked
    rng = random.Random(seed)
    chosen: list[TrainingPrompt] = []
    for sources, harmful, share in (
        (HARMFUL_SOURCES, True, None if limit is None else math.ceil(limit / 2)),
        (HARMLESS_SOURCES, False, None if limit is None else limit // 2),
    ):
        sizes = [len(pools[(s, harmful)]) for s in sources]
        counts = sizes if share is None else _equal_shares(sizes, share)
        for source, count in zip(sources, counts, strict=True):
            pool = pools[(source, harmful)]
            picked = sorted(rng.sample(range(len(pool)), count))
            chosen.extend(pool[i] for i in picked)
    used = {p.text for p in chosen}
    spare = [p for s in HARMFUL_SOURCES for p in pools[(s, True)] if p.text not in used]
    extra = rng.sample(spare, min(head_extra, len(spare)))
    overlap = [p.text for p in chosen + extra if normalise(p.text) in eval_texts]
    if overlap:  # an explicit check, not an assert: it must also hold under python -O
        raise RuntimeError(f"{len(overlap)} evaluation prompts leaked into training: {overlap[:3]}")

    def by_side(counts: dict[tuple[str, bool], int]) -> dict[str, dict[str, int]]:
        return {
            side: {s: n for (s, h), n in counts.items() if h == want}
            for side, want in (("harmful", True), ("harmless", False))
        }

    drawn = Counter((p.source, p.harmful) for p in chosen)
    picked_counts = {key: drawn[key] for key in pools}
    report = {
        "sources": by_side(picked_counts),
        "removed_as_eval_overlap": by_side(removed),
        "eval_sets_checked": checked,
        "eval_sets_not_found": unchecked,
        "limit": limit,
        "seed": seed,
        "head_extra": len(extra),
        "written": written,
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
