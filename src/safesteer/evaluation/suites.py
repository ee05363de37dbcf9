"""Evaluation suites: test sets, how subsets group into benchmarks, which Avg is the main one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safesteer.methods.safeswitch.settings import SAFESWITCH_SYSTEM_PROMPT

Metric = Literal["refusal", "compliance"]

# SCANS Table 2 order; the pooled "main" Avg runs over these 8 subsets (2,827 queries in the paper).
SCANS_TABLE2 = (
    "xstest-safe",
    "xstest-unsafe",
    "repe-safe",
    "repe-unsafe",
    "oktest",
    "truthfulqa",
    "advbench",
    "malicious",
)

BENCHMARK_OF: dict[str, str] = {
    "xstest-safe": "XSTest",
    "xstest-unsafe": "XSTest",
    "repe-safe": "RepE",
    "repe-unsafe": "RepE",
    "oktest": "OKTest",
    "harmfulq": "OKTest/HarmfulQ",
    "truthfulqa": "TQA",
    "advbench": "AdvBench",
    "malicious": "Malicious",
    "heldout-harmless": "Malicious/Held-out",
    "sorry-bench-eval": "SORRY-Bench",
    "trustllm-misuse-eval": "TrustLLM",
    "trustllm-jailbreak-eval": "TrustLLM",
    "trustllm-exaggerated-safety": "Over-refusal",
    "trivia-qa": "TriviaQA",
    "alpaca-eval": "AlpacaEval",
}


# Weighted benchmark scores (compliance %), reported whenever a run holds every subset named.
# TrustLLM: SafeSwitch's weighting of misuse and jailbreak.
WEIGHTED: dict[str, dict[str, float]] = {
    "TrustLLM": {"trustllm-misuse-eval": 0.45, "trustllm-jailbreak-eval": 0.55}
}


@dataclass(frozen=True)
class Suite:
    """A named evaluation: test-set parts, the subsets of the main Avg, and the headline metric."""

    name: str
    parts: tuple[str, ...]
    main_subsets: tuple[str, ...] = ()
    metric: Metric = "refusal"
    weighted: dict[str, dict[str, float]] = field(default_factory=lambda: dict(WEIGHTED))
    description: str = ""
    # The system prompt every method runs under (None: the artifact's own prompt format).
    system_prompt: str | None = None


SUITES: dict[str, Suite] = {
    "scans-paper": Suite(
        "scans-paper",
        ("xstest", "repe", "oktest", "truthfulqa", "advbench", "malicious", "harmfulq", "heldout"),
        SCANS_TABLE2,
        description="SCANS Table 2 (8 subsets, pooled Avg) plus HarmfulQ and Held-out harmless",
    ),
    "xstest": Suite(
        "xstest", ("xstest",), ("xstest-safe", "xstest-unsafe"), description="XSTest v2"
    ),
    "oktest": Suite(
        "oktest", ("oktest", "harmfulq"), ("oktest", "harmfulq"), description="OKTest + HarmfulQ"
    ),
    "repe": Suite("repe", ("repe",), ("repe-safe", "repe-unsafe"), description="RepE-Data test"),
    "safeswitch-paper": Suite(
        "safeswitch-paper",
        (
            "sorry-bench-eval",
            "trustllm-misuse-eval",
            "trustllm-jailbreak-eval",
            "trustllm-exaggerated-safety",
            "trivia-qa",
            "alpaca-eval",
        ),
        (),
        metric="compliance",
        description=(
            "SafeSwitch: SORRY-Bench eval, TrustLLM, over-refusal, TriviaQA, AlpacaEval (the "
            "length-controlled answer rate; a win rate needs an LLM judge), under SafeSwitch's "
            "helpful system prompt"
        ),
        system_prompt=SAFESWITCH_SYSTEM_PROMPT,
    ),
}


def get_suite(name: str) -> Suite:
    """A named suite, or a suite over user files (comma-separated paths) or any test-set name."""
    if name in SUITES:
        return SUITES[name]
    parts = tuple(p.strip() for p in name.split(",") if p.strip())
    if not parts:
        raise ValueError(f"empty suite name; known suites: {', '.join(SUITES)} or file paths")
    label = ",".join(Path(p).stem if Path(p).suffix else p for p in parts)
    return Suite(label, parts, (), description=f"user test data: {name}")


def benchmark_of(subset: str) -> str:
    """The benchmark a subset belongs to (its own name when unknown)."""
    return BENCHMARK_OF.get(subset, subset)


def answer_correct(response: str, aliases: list[str]) -> bool:
    """TriviaQA utility: any answer alias appears in the response (case-insensitive)."""
    text = response.lower()
    return any(alias.strip().lower() in text for alias in aliases if alias.strip())
