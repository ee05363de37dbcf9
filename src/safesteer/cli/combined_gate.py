"""`safesteer fit combined-gate`: the scans+safeswitch method's second gate on steering, fitted on
the validation set under a SafeSwitch artifact's prompt format."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from safesteer.cli.common import (
    AnchorSizeOpt,
    BatchOpt,
    DataDirOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    err,
    resolve_device,
    timestamped_lines,
)


def fit_combined_gate_command(
    safeswitch_artifact: Annotated[
        Path, typer.Option(help="The two-stage SafeSwitch artifact the gate will work beside.")
    ],
    out: Annotated[Path, typer.Option(help="Gate artifact folder to write.")],
    model: ModelOpt = None,
    budget: Annotated[
        float,
        typer.Option(
            help="Largest share of validation harmful prompts whose (out-of-fold) P(harmful) "
            "may fall under the gate's threshold."
        ),
    ] = 0.05,
    towards_budget: Annotated[
        float | None,
        typer.Option(
            help="Also steer towards refusal the rows stage 1 does not flag whose P(harmful) "
            "reaches a threshold that at most this share of validation scary-but-safe prompts "
            "reach (out of fold). Off by default."
        ),
    ] = None,
    release_budget: Annotated[
        float | None,
        typer.Option(
            help="Also release rows stage 1 flags (no refusal head; the model answers unsteered) "
            "whose P(harmful) falls under a threshold that at most this share of the validation "
            "harmful prompts stage 1 flags fall under (out of fold). Off by default."
        ),
    ] = None,
    probe_layers: Annotated[int, typer.Option(help="Layers the probe reads.")] = 3,
    anchor_size: AnchorSizeOpt = 64,
    seed: Annotated[int, typer.Option(help="Seed for anchors, samples and folds.")] = 0,
    batch_size: BatchOpt = 16,
    data_dir: DataDirOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Fit a second gate for scans+safeswitch: rows are steered away from refusal only when
    SafeSwitch's stage 1 and this probe both call them benign. Fitted on the validation set and
    the SCANS anchors (never a test set); a few minutes for a 0.5B model on 2 CPU cores."""
    from safesteer.core.errors import ModelLoadError
    from safesteer.datasets import DatasetError, draw_anchors
    from safesteer.datasets.validation import validation_set
    from safesteer.methods.artifacts import ArtifactError
    from safesteer.methods.combined_gate import fit_combined_gate
    from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
    from safesteer.models import load_model

    budgets = (
        ("--budget", budget),
        ("--towards-budget", towards_budget),
        ("--release-budget", release_budget),
    )
    for name, value in budgets:
        if value is not None and not 0.0 <= value < 1.0:
            err.print(f"[red]error:[/red] {name} must be in [0, 1), got {value}")
            raise typer.Exit(2)
    if probe_layers < 1 or batch_size < 1:
        err.print("[red]error:[/red] --probe-layers and --batch-size must be at least 1")
        raise typer.Exit(2)
    started = time.perf_counter()
    try:
        validation = validation_set(data_dir, seed)
        anchors = draw_anchors(anchor_size, seed, data_dir)
        with err.status("Loading model"):
            lm = load_model(model, dtype=dtype, device=resolve_device(device))
        switch = SafeSwitchArtifact.load(safeswitch_artifact, lm)
        gate = fit_combined_gate(
            lm,
            switch,
            anchors.harmful,
            anchors.benign,
            validation,
            budget=budget,
            towards_budget=towards_budget,
            release_budget=release_budget,
            n_layers=probe_layers,
            seed=seed,
            batch_size=batch_size,
            progress=timestamped_lines(started),
        )
    except (ModelLoadError, DatasetError, ArtifactError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    gate.save(out)
    report = gate.report
    alone, both = report["steered_by_stage1_alone"], report["steered_with_gate"]
    err.print(
        f"Wrote {out}: probe on layers {list(gate.layers)}, steer below P(harmful) "
        f"{gate.threshold:.3f}; validation out-of-fold AUROC {report['oof_auroc_validation']:.3f} "
        f"(stage 1: {report['stage1_auroc_validation']:.3f})"
    )
    for name in alone:
        err.print(
            f"  validation {name}: steered by stage 1 alone {alone[name][0]}/{alone[name][1]}, "
            f"with the gate {both[name][0]}/{both[name][1]}"
        )
    if gate.towards_threshold is not None:
        towards = report["steered_towards"]
        err.print(
            f"  towards refusal at P(harmful) >= {gate.towards_threshold:.3f}, stage 1 unflagged: "
            + ", ".join(f"{name} {n}/{of}" for name, (n, of) in towards.items())
        )
    if gate.release_threshold is not None:
        released, flagged = report["released"], report["flagged_by_stage1"]
        err.print(
            f"  released from stage 1's flag under P(harmful) {gate.release_threshold:.3f}: "
            + ", ".join(
                f"{name} {n}/{flagged[name][0]} flagged" for name, (n, _) in released.items()
            )
        )
    if "release_dropped" in report:
        err.print(f"[yellow]note:[/yellow] {report['release_dropped']}")
    err.print(f"({time.perf_counter() - started:.0f} s)")
