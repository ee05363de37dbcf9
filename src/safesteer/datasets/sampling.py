"""Anchors (the harmful and benign prompts SCANS is fitted on) and stratified sampling."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safesteer.datasets.loaders import _advbench, _truthfulqa
from safesteer.datasets.readers import Prompt
from safesteer.datasets.registry import DatasetError

# --------------------------------------------------------------------------------------------
# Anchors


@dataclass(frozen=True)
class Anchors:
    """SCANS anchor prompts: harmful (AdvBench goals) and benign (TruthfulQA questions)."""

    harmful: tuple[str, ...]
    benign: tuple[str, ...]
    seed: int

    def texts(self) -> tuple[str, ...]:
        """All anchor texts (harmful then benign), e.g. for ``load_test_set(exclude=...)``."""
        return self.harmful + self.benign

    def hashes(self) -> dict[str, list[str]]:
        """sha256 hex of each anchor text (UTF-8), for the artifact manifest."""

        def digest(text: str) -> str:
            return hashlib.sha256(text.encode("utf-8")).hexdigest()

        return {
            "harmful": [digest(t) for t in self.harmful],
            "benign": [digest(t) for t in self.benign],
        }


def draw_anchors(size: int = 64, seed: int = 0, data_dir: str | Path | None = None) -> Anchors:
    """Draw ``size`` AdvBench goals and ``size`` TruthfulQA questions without replacement.

    One ``random.Random(seed)`` draws the harmful anchors and then the benign ones, so the result
    depends only on ``size``, ``seed`` and the (sha256-pinned) files.
    """
    harmful_pool = [p.text for p in _advbench(data_dir)]
    benign_pool = [p.text for p in _truthfulqa(data_dir)]
    limit = min(len(harmful_pool), len(benign_pool))
    if not 1 <= size <= limit:
        raise DatasetError(
            f"Anchor size {size} is out of range: it must be between 1 and {limit} "
            f"(AdvBench has {len(harmful_pool)} goals, TruthfulQA {len(benign_pool)} questions)."
        )
    rng = random.Random(seed)
    harmful = tuple(rng.sample(harmful_pool, size))
    benign = tuple(rng.sample(benign_pool, size))
    return Anchors(harmful=harmful, benign=benign, seed=seed)


# --------------------------------------------------------------------------------------------
# Sampling


def _allocate(sizes: list[int], n: int) -> list[int]:
    """Largest-remainder allocation of ``n`` over groups, at least 1 each when n >= groups."""
    total = sum(sizes)
    quotas = [n * s / total for s in sizes]
    alloc = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - alloc[i]), i))
    for i in order[: n - sum(alloc)]:
        alloc[i] += 1
    if n >= len(sizes):
        for i, count in enumerate(alloc):
            if count == 0:
                donor = max(
                    (j for j in range(len(sizes)) if alloc[j] > 1),
                    key=lambda j: (alloc[j] - quotas[j], alloc[j], -j),
                )
                alloc[donor] -= 1
                alloc[i] = 1
    return alloc


def stratified_sample(
    prompts: Sequence[Prompt],
    n: int | None,
    seed: int,
    key: Callable[[Prompt], Hashable] | None = None,
) -> list[Prompt]:
    """A seeded sample of ``n`` prompts keeping the share of each group.

    Groups are (subset, label), or ``key(prompt)`` when given. ``n`` None or >= len(prompts)
    returns all prompts. Group sizes use largest-remainder rounding, with at least one prompt per
    group when ``n`` is at least the number of groups. The sample keeps the original order.
    """
    if n is None or n >= len(prompts):
        return list(prompts)
    if n < 0:
        raise DatasetError(f"Sample size must be >= 0 (or None for all), not {n}.")
    if n == 0:
        return []
    groups: dict[Hashable, list[int]] = {}
    for index, prompt in enumerate(prompts):
        group = (prompt.subset, prompt.label) if key is None else key(prompt)
        groups.setdefault(group, []).append(index)
    members = list(groups.values())
    alloc = _allocate([len(m) for m in members], n)
    rng = random.Random(seed)
    chosen: list[int] = []
    for indices, k in zip(members, alloc, strict=True):
        chosen.extend(rng.sample(indices, k))
    return [prompts[i] for i in sorted(chosen)]
