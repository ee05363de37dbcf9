"""`safesteer fit safeswitch-threshold`: raise a SafeSwitch artifact's stage-1 threshold until
every harmless training source's held-out prompts are flagged within a budget (prefill only)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from safesteer.cli.common import (
    BatchOpt,
    DataDirOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    err,
    resolve_device,
    timestamped_lines,
)


def fit_safeswitch_threshold_command(
    safeswitch_artifact: Annotated[
        Path, typer.Option(help="The two-stage SafeSwitch artifact whose stage 1 is bounded.")
    ],
    out: Annotated[Path, typer.Option(help="Artifact folder to write (a copy, new threshold).")],
    model: ModelOpt = None,
    harmless_budget: Annotated[
        float,
        typer.Option(
            help="Largest share of each harmless source's held-out prompts stage 1 may flag."
        ),
    ] = 0.02,
    pool_per_source: Annotated[
        int, typer.Option(help="Held-out prompts drawn from each training source (each side).")
    ] = 300,
    exclude_run: Annotated[
        list[Path] | None,
        typer.Option(
            help="An eval output folder (repeatable): its prompts are never drawn into the pool, "
            "so rows already tested on never choose the threshold."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the pool's draw.")] = 0,
    batch_size: BatchOpt = 16,
    data_dir: DataDirOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Bound stage 1's false flags per harmless source on prompts the fit never read. The pool is
    drawn from the training sources only (never a test set) and joins the artifact's training
    hashes, so eval never tests on it. A few minutes for a 0.5B model on 2 CPU cores."""
    from safesteer.core.errors import ModelLoadError
    from safesteer.datasets import DatasetError
    from safesteer.methods.artifacts import ArtifactError
    from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
    from safesteer.methods.safeswitch.stage1_pool import calibrate_stage1
    from safesteer.models import load_model

    if not 0.0 <= harmless_budget < 1.0:
        err.print(f"[red]error:[/red] --harmless-budget must be in [0, 1), got {harmless_budget}")
        raise typer.Exit(2)
    if pool_per_source < 1 or batch_size < 1:
        err.print("[red]error:[/red] --pool-per-source and --batch-size must be at least 1")
        raise typer.Exit(2)
    if out.resolve() == safeswitch_artifact.resolve():
        err.print("[red]error:[/red] --out must differ from --safeswitch-artifact (a new copy)")
        raise typer.Exit(2)
    started = time.perf_counter()
    try:
        excluded = [text for run in exclude_run or [] for text in run_prompts(run)]
        switch = SafeSwitchArtifact.load(safeswitch_artifact)  # fails before the model loads
        with err.status("Loading model"):
            lm = load_model(model, dtype=dtype, device=resolve_device(device))
        switch.check_fitted_on(lm, safeswitch_artifact)
        calibrated = calibrate_stage1(
            lm,
            switch,
            harmless_budget,
            data_dir=data_dir,
            per_source=pool_per_source,
            seed=seed,
            batch_size=batch_size,
            exclude=excluded,
            progress=timestamped_lines(started),
        )
    except (ModelLoadError, DatasetError, ArtifactError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    calibrated.save(out)
    print_pool_report(calibrated.report["stage1_pool"], out)
    if excluded:
        err.print(f"  {len(set(excluded))} prompts of earlier eval runs kept out of the pool")
    err.print(f"({time.perf_counter() - started:.0f} s)")


def run_prompts(run: Path) -> list[str]:
    """The prompt texts of an eval output folder (its responses.jsonl)."""
    from safesteer.evaluation.eval_rows import read_rows

    path = run / "responses.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} is not an eval output folder: no responses.jsonl in it")
    return sorted({str(row["prompt"]) for row in read_rows(path).values()})


def print_pool_report(report: dict[str, Any], out: Path) -> None:
    """The threshold's move and every source's flagged count before and after it."""
    err.print(
        f"{out}: stage 1 threshold {report['threshold_before']:.3f} → "
        f"{report['threshold']:.3f} (budget {report['budget']} per harmless source; binding: "
        f"{report['binding_source']})"
    )
    for side in ("harmless", "harmful"):
        for source, counts in report[side].items():
            (b, n), (a, _) = counts["before"], counts["after"]
            err.print(f"  {side} {source}: flagged {b}/{n} → {a}/{n}")
