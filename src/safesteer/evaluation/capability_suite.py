"""``safesteer eval --suite capability``: perplexity, MMLU and XSum with and without steering.

Each (method, check) result is appended to ``capability.jsonl`` when it finishes, so a restarted
run skips finished checks.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safesteer.core.handle import LoadedModel
from safesteer.evaluation.capability import Intervention, perplexity, scans_intervention
from safesteer.evaluation.capability_mmlu import mmlu
from safesteer.evaluation.capability_xsum import xsum
from safesteer.methods.scans.artifact import ScansArtifact

CAPABILITY_METHODS = ("default", "scans", "scans-safe", "random")
DEFAULT_MMLU_SUBJECTS = (
    "abstract_algebra",
    "high_school_geography",
    "computer_security",
    "moral_scenarios",
    "college_biology",
)


@dataclass(frozen=True)
class CapabilitySettings:
    """How much of each capability check to run (CPU-sized defaults; None = all)."""

    ppl_windows: int | None = 16
    ppl_window: int = 512
    mmlu_subjects: tuple[str, ...] | None = DEFAULT_MMLU_SUBJECTS
    mmlu_per_subject: int | None = 20
    xsum_articles: int = 20
    xsum_new_tokens: int = 64
    batch_size: int = 4


def intervention_for(
    method: str, lm: LoadedModel, artifact: ScansArtifact, random_direction: Any
) -> Intervention | None:
    """``default``: none; ``scans``: per-input sigma; ``scans-safe``: always -1 (benign tasks);
    ``random``: a random direction with SCANS' signs."""
    if method == "default":
        return None
    if method == "scans":
        return scans_intervention(lm, artifact, "classify")
    if method == "scans-safe":
        return scans_intervention(lm, artifact, "safe")
    if method == "random":
        base = scans_intervention(lm, artifact, "classify")
        return Intervention(
            artifact.steering_vectors(random_direction), base.coefficient, name="random"
        )
    raise ValueError(f"capability checks support methods {', '.join(CAPABILITY_METHODS)}")


def run_capability(
    lm: LoadedModel,
    artifact: ScansArtifact,
    methods: list[str],
    out: Path,
    settings: CapabilitySettings,
    data_dir: str | None,
    random_direction: Any,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run the checks for each method; returns ``{method: {check: result}}``."""
    path = out / "capability.jsonl"
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(row["method"], row["check"])] = row["result"]
    wikitext = functools.partial(
        perplexity,
        lm,
        data_dir=data_dir,
        window=settings.ppl_window,
        max_windows=settings.ppl_windows,
        batch_size=settings.batch_size,
    )
    checks: dict[str, Callable[[Intervention | None], dict[str, Any]]] = {
        "perplexity": lambda iv: wikitext(intervention=iv),
        "perplexity_chat": lambda iv: wikitext(intervention=iv, variant="chat"),
        "mmlu": lambda iv: mmlu(
            lm,
            data_dir=data_dir,
            subjects=settings.mmlu_subjects,
            limit_per_subject=settings.mmlu_per_subject,
            batch_size=settings.batch_size,
            intervention=iv,
        ),
        "xsum": lambda iv: xsum(
            lm,
            data_dir=data_dir,
            limit=settings.xsum_articles,
            max_new_tokens=settings.xsum_new_tokens,
            batch_size=settings.batch_size,
            intervention=iv,
            seed=seed,
        ),
    }
    results: dict[str, dict[str, Any]] = {m: {} for m in methods}
    with path.open("a") as handle:
        for method in methods:
            intervention = intervention_for(method, lm, artifact, random_direction)
            for check, fn in checks.items():
                if (method, check) in done:
                    results[method][check] = done[(method, check)]
                    continue
                result = fn(intervention)
                results[method][check] = result
                handle.write(
                    json.dumps({"method": method, "check": check, "result": result}) + "\n"
                )
                handle.flush()
    return results


def headline(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The numbers of the papers' capability table per method."""
    table: dict[str, dict[str, float | None]] = {}
    for method, checks in results.items():
        x = checks.get("xsum", {})
        table[method] = {
            "ppl": checks.get("perplexity", {}).get("perplexity"),
            "ppl_chat": checks.get("perplexity_chat", {}).get("perplexity"),
            "mmlu_avg": checks.get("mmlu", {}).get("average"),
            "rouge1": x.get("rouge1"),
            "rouge2": x.get("rouge2"),
            "rougeL": x.get("rougeL"),
        }
    return table


def print_capability(table: dict[str, dict[str, float | None]]) -> None:
    """A table: methods × headline capability numbers."""
    out = Table(title="capability (WikiText-2 ppl ↓, MMLU avg % ↑, XSum ROUGE F1 ↑)")
    columns = ["ppl", "ppl_chat", "mmlu_avg", "rouge1", "rouge2", "rougeL"]
    out.add_column("method")
    for c in columns:
        out.add_column(c, justify="right")
    for method, row in table.items():
        out.add_row(method, *("-" if row[c] is None else f"{row[c]:.2f}" for c in columns))
    Console().print(out)
