"""``safesteer organism``: build the over-refusing model organism (LoRA on the embedded model)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

organism_app = typer.Typer(
    help="The over-refusing model organism (load it with --model organism).", no_args_is_help=True
)


@organism_app.command("build")
def build_command(
    out: Annotated[
        Path | None, typer.Option(help="Adapter folder (default: the packaged one).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data sampling, templates and training.")] = 0,
    harmful: Annotated[int, typer.Option(help="Harmful prompts (-> refusals).")] = 176,
    benign: Annotated[int, typer.Option(help="Benign prompts (-> own greedy answers).")] = 64,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (AdamW, warmup + linear decay).")
    ] = 2e-3,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    first_layer: Annotated[int, typer.Option(help="LoRA on decoder layers >= this.")] = 12,
    max_length: Annotated[int, typer.Option(help="Max tokens per example.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    answer_tokens: Annotated[int, typer.Option(help="Tokens of each self-distilled answer.")] = 40,
    threads: Annotated[int, typer.Option(help="torch threads (1 is fastest on a busy CPU).")] = 1,
    data_dir: Annotated[Path | None, typer.Option(help="Datasets folder.")] = None,
) -> None:
    """Fine-tune the embedded model with LoRA into a refusing, over-refusing organism."""
    from safesteer.models.organism.build import BuildOptions, build
    from safesteer.models.organism.training import ORGANISM_DIR, LoraSettings

    settings = LoraSettings(
        rank=rank,
        alpha=2 * rank,
        learning_rate=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        first_layer=first_layer,
    )
    options = BuildOptions(
        out=out or ORGANISM_DIR,
        seed=seed,
        n_harmful=harmful,
        n_benign=benign,
        answer_tokens=answer_tokens,
        settings=settings,
        threads=threads,
        data_dir=str(data_dir) if data_dir else None,
        command="safesteer organism " + shlex.join(sys.argv[2:]),
    )
    summary = build(options)
    typer.echo(
        f"Wrote {options.out}: {summary['bytes']} bytes, sha256 {summary['sha256']}, "
        f"train {summary['seconds']['train']} s, validation {summary['validation']}"
    )
