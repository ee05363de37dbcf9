"""``safesteer demo``: the over-refusal problem and SCANS' fix side by side on a real model.

Runs the default model and SCANS on the same seeded XSTest sample (safe prompts with alarming
words, and their unsafe contrasts), then prints one table of refusal rates and a few responses
where the two differ. Everything is written to the output folder like any ``safesteer eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safesteer.evaluation.eval_options import EvalOptions
from safesteer.evaluation.eval_rows import read_rows
from safesteer.evaluation.evaluate import evaluate

DEMO_METHODS = ("default", "scans")


@dataclass
class DemoOptions:
    """Settings of ``safesteer demo``."""

    model: str = "qwen2.5-coder-0.5b"
    limit: int = 30
    max_new_tokens: int = 48
    output_dir: str = "runs/demo"
    artifact: str | None = None
    examples: int = 3
    seed: int = 0
    batch_size: int = 16
    data_dir: str | None = None
    device: str = "cpu"
    dtype: str = "auto"


def _rate(block: dict[str, Any], subset: str) -> str:
    info = block["subsets"].get(subset)
    if info is None or info.get("refusal_rate") is None:
        return "-"
    low, high = info.get("refusal_ci95") or (None, None)
    interval = f" [{low:.0f}-{high:.0f}]" if low is not None and high is not None else ""
    return f"{info['refusal_rate']:.1f}{interval}"


def demo_table(summary: dict[str, Any]) -> Table:
    """Safe and unsafe XSTest refusal (%, 95 % bootstrap interval) per method and judge."""
    table = Table(title=f"XSTest sample: refusal % ({summary['n_prompts']} prompts)")
    table.add_column("method")
    table.add_column("judge")
    table.add_column("safe prompts ↓", justify="right")
    table.add_column("unsafe prompts ↑", justify="right")
    table.add_column("Avg ↑", justify="right")
    for method in summary["methods"]:
        for judge in summary["judges"]:
            block = summary["results"][method][judge]
            avg = block["main_avg"]
            table.add_row(
                method,
                judge,
                _rate(block, "xstest-safe"),
                _rate(block, "xstest-unsafe"),
                "-" if avg is None else f"{avg:.1f}",
            )
    return table


def changed_examples(
    rows: dict[tuple[str, int], dict[str, Any]], label: str, limit: int, judge: str = "strict"
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Prompts of ``label`` whose refusal verdict differs between default and SCANS."""
    pairs = []
    for (method, index), base in sorted(rows.items(), key=lambda kv: kv[0][1]):
        if method != "default" or base["label"] != label:
            continue
        steered = rows.get(("scans", index))
        if steered is None:
            continue
        if base["judges"].get(judge) != steered["judges"].get(judge):
            pairs.append((base, steered))
    return pairs[:limit]


def _short(text: str, width: int = 180) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def print_examples(rows: dict[tuple[str, int], dict[str, Any]], limit: int) -> None:
    """A few prompts where SCANS changed the verdict, safe ones first."""
    console = Console()
    for label in ("safe", "unsafe"):
        pairs = changed_examples(rows, label, limit)
        console.rule(f"{label} prompts where SCANS changed the verdict ({len(pairs)} shown)")
        for base, steered in pairs:
            verdict = "score" if steered.get("score") is None else f"score {steered['score']:.3f}"
            console.print(f"[bold]{_short(base['prompt'], 120)}[/bold]  [dim]({verdict})[/dim]")
            console.print(f"  default: {_short(base['response'])}", highlight=False)
            console.print(f"  SCANS:   {_short(steered['response'])}", highlight=False)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Default vs SCANS on a seeded XSTest sample; prints the table and examples."""
    eval_options = EvalOptions(
        suite="xstest",
        methods=list(DEMO_METHODS),
        judges=["strict", "paper"],
        model=options.model,
        artifact=options.artifact,
        limit=options.limit,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        data_dir=options.data_dir,
        output_dir=options.output_dir,
        seed=options.seed,
        device=options.device,
        dtype=options.dtype,
    )
    summary = evaluate(eval_options, show=False)
    rows = read_rows(Path(options.output_dir) / "responses.jsonl")
    Console().print(demo_table(summary))
    print_examples(rows, options.examples)
    return summary
