"""Stage 1's threshold on a held-out calibration pool, with a false-flag budget per source.

``fit safeswitch --harmless-budget`` bounds the false flags on the fit's validation split: 15 % of
the labelled prompts, about 90 harmless ones. A 2 % budget on 90 prompts is met by flagging one or
two of them, and the share on other prompts of the same sources can be far higher (Qwen-0.5B, fit
v5: 1.1 % of the validation harmless split flagged, 8.9 % of the test split). The threshold is also
pooled over sources, so a source with few prompts in the split (long instructions, alarming but
safe questions) can be flagged far more often than the pooled share says.

Stage 1 reads one prefill state, so a much larger pool costs a forward pass per prompt and no
generation. This module draws, from every training source, prompts the fit never read (and no
evaluation set holds), records stage 1's P(harmful) on each, and raises the threshold until *every*
harmless source's flagged share is within the budget. Harmful pools are scored as well, to report
what the bound costs in recall. The pool's prompts are added to the artifact's training hashes, so
``safesteer eval`` never tests on them (AlpacaEval and TriviaQA are also benchmarks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from safesteer.core.activations import capture
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, sha256_text
from safesteer.methods.safeswitch.probe import false_flag_threshold
from safesteer.methods.safeswitch.train import (
    HARMFUL_SOURCES,
    HARMLESS_SOURCES,
    TrainingPrompt,
    WrittenChoice,
    clean_pools,
)

DEFAULT_POOL_PER_SOURCE = 300


def held_out_pool(
    used_sha256: set[str],
    data_dir: str | Path | None = None,
    per_source: int = DEFAULT_POOL_PER_SOURCE,
    seed: int = 0,
    written: WrittenChoice = "all",
) -> tuple[list[TrainingPrompt], dict[str, Any]]:
    """Up to ``per_source`` prompts of every training source (each side) that are not among
    ``used_sha256`` (the fit's prompts) and not in any evaluation set; and a report of the draw."""
    if per_source < 1:
        raise ValueError(
            f"the calibration pool needs at least 1 prompt per source, got {per_source}"
        )
    clean = clean_pools(data_dir, written)
    rng = random.Random(seed)
    pool: list[TrainingPrompt] = []
    drawn: dict[str, dict[str, int]] = {"harmful": {}, "harmless": {}}
    for sources, harmful in ((HARMFUL_SOURCES, True), (HARMLESS_SOURCES, False)):
        for source in sources:
            unused = [
                p for p in clean.pools[(source, harmful)] if sha256_text(p.text) not in used_sha256
            ]
            picked = sorted(rng.sample(range(len(unused)), min(per_source, len(unused))))
            pool.extend(unused[i] for i in picked)
            drawn["harmful" if harmful else "harmless"][source] = len(picked)
    report = {
        "per_source": per_source,
        "seed": seed,
        "drawn": drawn,
        "eval_sets_checked": clean.checked,
        "eval_sets_not_found": clean.unchecked,
    }
    return pool, report


def stage1_probabilities(
    lm: LoadedModel,
    switch: SafeSwitchArtifact,
    texts: Sequence[str],
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Stage 1's P(harmful) of each text under the artifact's prompt format (prefill only)."""
    layout = ChatLayout(lm.tokenizer, switch.settings.system_prompt)
    layer = switch.settings.layer % lm.num_layers
    encoded = [layout.prompt_ids(t) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # short batches together
    out = [0.0] * len(encoded)
    chunk = batch_size * 8
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        states = capture(
            lm, [encoded[i] for i in rows], [-1], layers=[layer], batch_size=batch_size
        )
        with torch.no_grad():
            probabilities = switch.stage1.probability(states[:, 0, 0]).tolist()
        for i, p in zip(rows, probabilities, strict=True):
            out[i] = float(p)
        if progress is not None:
            progress(f"stage 1 on the pool: {min(start + chunk, len(order))}/{len(order)} prompts")
    return out


def _flagged(values: Sequence[float], threshold: float) -> list[int]:
    return [sum(v >= threshold for v in values), len(values)]


def per_source_threshold(
    probabilities: Sequence[float],
    pool: Sequence[TrainingPrompt],
    current: float,
    budget: float,
) -> tuple[float, dict[str, Any]]:
    """The smallest threshold, not under ``current``, at which every harmless source of ``pool``
    has at most ``budget`` of its prompts flagged; and flagged counts per source, before/after."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"the harmless budget must be in [0, 1), got {budget}")
    if len(probabilities) != len(pool):
        raise ValueError(f"{len(probabilities)} probabilities for {len(pool)} pool prompts")
    by_source: dict[tuple[str, bool], list[float]] = {}
    for p, prompt in zip(probabilities, pool, strict=True):
        by_source.setdefault((prompt.source, prompt.harmful), []).append(p)
    harmless = {s: v for (s, h), v in by_source.items() if not h}
    if not harmless:
        raise ValueError("the calibration pool has no harmless prompts")
    needed = {s: false_flag_threshold(v, budget) for s, v in harmless.items()}
    threshold = max(current, *needed.values())
    report: dict[str, Any] = {
        "budget": budget,
        "threshold_before": current,
        "threshold": threshold,
        "needed_by_source": needed,
        "binding_source": max(needed, key=lambda s: needed[s]),
    }
    for side, want in (("harmless", False), ("harmful", True)):
        report[side] = {
            source: {"before": _flagged(v, current), "after": _flagged(v, threshold)}
            for (source, h), v in by_source.items()
            if h == want
        }
    return threshold, report


def calibrate_stage1(
    lm: LoadedModel,
    switch: SafeSwitchArtifact,
    budget: float,
    *,
    data_dir: str | Path | None = None,
    per_source: int = DEFAULT_POOL_PER_SOURCE,
    seed: int = 0,
    batch_size: int = 16,
    exclude: Iterable[str] = (),
    progress: Callable[[str], None] | None = None,
) -> SafeSwitchArtifact:
    """``switch`` with stage 1's threshold raised to meet ``budget`` on every harmless source of a
    held-out pool (see the module docstring); the pool joins the artifact's training hashes.
    ``exclude``: prompt texts never drawn into the pool (e.g. rows an earlier eval tested on)."""
    say = progress or (lambda _msg: None)
    if switch.settings.mode != "two-stage":
        raise ValueError("the calibration pool bounds stage 1 of a two-stage SafeSwitch artifact")
    excluded = {sha256_text(t) for t in exclude}
    used = switch.training_hashes() | excluded
    written = switch.training.get("data", {}).get("written", "all")
    pool, drawn = held_out_pool(used, data_dir, per_source, seed, written)
    drawn["excluded_prompts"] = len(excluded)
    say(f"stage 1 on a held-out pool of {len(pool)} prompts (prefill only)")
    probabilities = stage1_probabilities(lm, switch, [p.text for p in pool], batch_size, say)
    threshold, report = per_source_threshold(
        probabilities, pool, switch.settings.threshold1, budget
    )
    training = {
        **switch.training,
        "prompt_sha256": [
            *switch.training.get("prompt_sha256", []),
            *(sha256_text(p.text) for p in pool),
        ],
        "stage1_pool": drawn,
    }
    return replace(
        switch.with_settings(threshold1=threshold),
        training=training,
        report={**switch.report, "stage1_pool": report},
    )
