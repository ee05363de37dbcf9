"""`safesteer calibrate`: choose SCANS' direction, layers, alpha, gate, policy and threshold on the
validation set, and write the calibrated artifact with its report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from safesteer.cli.common import (
    AnchorSizeOpt,
    BatchOpt,
    DataDirOpt,
    DtypeOpt,
    err,
    timestamped_lines,
)


def _numbers(text: str, example: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, or a readable error quoting ``example``."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"cannot read {text!r}; write e.g. {example}") from None


def _floats(text: str) -> tuple[float, ...]:
    values = _numbers(text, "0.05,0.1,0.15")
    if not values or any(not (0 < v < 10) for v in values):
        raise typer.BadParameter("alphas must be positive numbers below 10, e.g. 0.05,0.1")
    return values


def _quantiles(text: str) -> tuple[float, ...]:
    values = _numbers(text, "0.5,0.25,0.1,0")
    if any(not (0 <= v <= 1) for v in values):
        raise typer.BadParameter("cap quantiles lie between 0 and 1, e.g. 0.5,0.25,0.1,0")
    return values


def _threshold_range(text: str) -> tuple[float, float]:
    values = _numbers(text, "0.02,0.98")
    if len(values) != 2 or not 0 <= values[0] < values[1] <= 1.01:
        raise typer.BadParameter("write two thresholds LOW,HIGH with 0 <= LOW < HIGH <= 1.01")
    return values[0], values[1]


def calibrate_command(
    out: Annotated[Path, typer.Option(help="Artifact folder to write (calibrated recipe).")],
    model: Annotated[
        str | None, typer.Option(help="Model name, directory, .gguf or hub id.")
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where stages, calibration.json and the report go (default OUT/calibration)."
        ),
    ] = None,
    alphas: Annotated[str, typer.Option(help="Relative alphas to try.")] = "0.05,0.1,0.2,0.3",
    unsafe_budget: Annotated[
        float, typer.Option(help="Largest drop of validation unsafe refusal allowed (points).")
    ] = 2.0,
    plain_budget: Annotated[
        float, typer.Option(help="Largest rise of plain-prompt refusal allowed (points).")
    ] = 2.0,
    reference_budget: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=100.0,
            help="Largest share (%) of reference-text windows, benign rows of the gate, that a "
            "threshold may steer towards refusal (and, with the refusal gate, away from it).",
        ),
    ] = 5.0,
    refusal_gate: Annotated[
        bool,
        typer.Option(
            "--refusal-gate/--no-refusal-gate",
            help="Steer a row away from refusal only when a second probe says the model would "
            "refuse it (its threshold leaves ordinary text, the reference windows, unsteered).",
        ),
    ] = True,
    fluency_budget: Annotated[
        float,
        typer.Option(
            help="Largest relative rise of perplexity allowed, on the model's own plain answers "
            "and on reference text (MMLU dev questions with their answers)."
        ),
    ] = 0.10,
    cap_quantiles: Annotated[
        str,
        typer.Option(
            help="Clamped away-steering: caps at these quantiles of the answered safe prompts' "
            "projections on the direction ('' = additive steering only)."
        ),
    ] = "0.5,0.25,0.1,0",
    threshold_range: Annotated[
        str,
        typer.Option(
            help="Gate thresholds searched, LOW,HIGH: steered replies are generated only for the "
            "validation rows one of them reads ('0,1.01' = every threshold)."
        ),
    ] = "0.02,0.98",
    gen_tokens: Annotated[int, typer.Option(help="Tokens per validation reply.")] = 24,
    anchor_size: AnchorSizeOpt = 64,
    seed: Annotated[int, typer.Option(help="Seed for anchors, samples and folds.")] = 0,
    batch_size: BatchOpt = 16,
    data_dir: DataDirOpt = None,
    dtype: DtypeOpt = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """Calibrate SCANS on the validation set (never a test set); about an hour for a 0.5B
    model on 2 CPU cores. Stages are cached in the work folder, so a rerun continues."""
    from safesteer.core.errors import ModelLoadError
    from safesteer.datasets import DatasetError, draw_anchors
    from safesteer.datasets.validation import fluency_text, validation_set
    from safesteer.evaluation.calibration_report import write_calibration_report
    from safesteer.methods.artifacts import ArtifactError
    from safesteer.methods.scans.calibrate import CalibrationConfig, Calibrator
    from safesteer.models import load_model

    if batch_size < 1 or gen_tokens < 1:
        err.print("[red]error:[/red] --batch-size and --gen-tokens must be at least 1")
        raise typer.Exit(2)
    config = CalibrationConfig(
        alphas=_floats(alphas),
        unsafe_budget=unsafe_budget,
        plain_budget=plain_budget,
        reference_budget=reference_budget,
        refusal_gate=refusal_gate,
        fluency_budget=fluency_budget,
        cap_quantiles=_quantiles(cap_quantiles),
        threshold_range=_threshold_range(threshold_range),
        gen_tokens=gen_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    folder = work_dir or out / "calibration"
    started = time.perf_counter()
    try:
        validation = validation_set(data_dir, seed)
        anchors = draw_anchors(anchor_size, seed, data_dir)
        text = fluency_text(data_dir)
        with err.status("Loading model"):
            lm = load_model(model, dtype=dtype, device=device)
        calibrator = Calibrator(
            lm,
            anchors.harmful,
            anchors.benign,
            validation,
            folder,
            config,
            progress=timestamped_lines(started),
            fluency_text=text,
        )
        artifact, calibration = calibrator.run()
    except (ModelLoadError, DatasetError, ArtifactError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    artifact.save(out)
    from dataclasses import asdict

    report = write_calibration_report(asdict(calibration), folder)
    err.print(f"Wrote {out}: {artifact.settings.summary()}")
    err.print(f"Report: {report} ({time.perf_counter() - started:.0f} s)")
