"""``safesteer run``, ``safesteer fit scans`` and ``safesteer generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safesteer.cli.common import (
    AnchorSizeOpt,
    BatchOpt,
    DataDirOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    RecipeOpt,
    SeedOpt,
    TruncateOpt,
    err,
    resolve_device,
    user_errors,
)
from safesteer.cli.safeswitch import generate_safeswitch


def run(
    model: ModelOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Paper settings: llama2-7b, llama2-13b, vicuna-7b, vicuna-13b."),
    ] = None,
    test_data: Annotated[
        str,
        typer.Option(
            help="default, xstest, oktest, repe, malicious, harmfulq, heldout, scans-paper, or "
            "file paths (csv/json/jsonl/parquet/txt), comma-separated."
        ),
    ] = "default",
    limit: Annotated[
        int | None, typer.Option(help="Seeded sample of N prompts keeping the safe/unsafe mix.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    batch_size: BatchOpt = 16,
    multiplier: Annotated[
        float | None, typer.Option(help="Steering strength alpha (overrides the artifact's).")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Steering layers, e.g. 10-19.")] = None,
    cls_layers: Annotated[
        str | None,
        typer.Option(
            help="Classification layers, e.g. 10-31; T is recalibrated for them on the "
            "artifact's anchors unless --threshold is given."
        ),
    ] = None,
    anchor_size: AnchorSizeOpt = 64,
    threshold: Annotated[
        float | None, typer.Option(help="Decision threshold T (default: preset or calibrated).")
    ] = None,
    seed: SeedOpt = 0,
    artifact: Annotated[
        Path | None, typer.Option(help="A fitted SCANS artifact (skips fitting).")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where results are written.")] = Path(
        "runs/scans"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with non-bundled datasets (or SAFESTEER_DATA_DIR).")
    ] = None,
    repetition_penalty: Annotated[float, typer.Option(help="1.0 = off; the paper uses 1.1.")] = 1.0,
    system_prompt: Annotated[str | None, typer.Option(help="Optional system prompt.")] = None,
    method: Annotated[
        str, typer.Option(help="scans (steer) or none (decide but do not steer: the baseline).")
    ] = "scans",
    recipe: RecipeOpt = "auto",
    truncate: TruncateOpt = "none",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Fit (or load) SCANS, steer generation over a test set, judge refusals and summarise."""
    from safesteer.evaluation.run_setup import RunError, RunOptions
    from safesteer.evaluation.runner import run as run_job

    options = RunOptions(
        model=model,
        preset=preset,
        test_data=test_data,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        multiplier=multiplier,
        layers=layers,
        cls_layers=cls_layers,
        anchor_size=anchor_size,
        threshold=threshold,
        seed=seed,
        artifact=str(artifact) if artifact else None,
        output_dir=str(output_dir),
        data_dir=str(data_dir) if data_dir else None,
        repetition_penalty=repetition_penalty,
        system_prompt=system_prompt,
        method=method,
        recipe=recipe,
        dtype=dtype,
        device=resolve_device(device),
        device_map=device_map,
        truncate=truncate,
    )
    with user_errors(RunError):
        run_job(options)


def fit_scans_command(
    out: Annotated[Path, typer.Option(help="Artifact folder to write.")],
    model: ModelOpt = None,
    preset: Annotated[str | None, typer.Option(help="Paper settings preset.")] = None,
    anchor_size: AnchorSizeOpt = 64,
    seed: SeedOpt = 0,
    multiplier: Annotated[float | None, typer.Option(help="Steering strength alpha.")] = None,
    layers: Annotated[str | None, typer.Option(help="Steering layers, e.g. 10-19.")] = None,
    cls_layers: Annotated[
        str | None, typer.Option(help="Classification layers (T is calibrated on them).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Threshold T (default: calibrated).")
    ] = None,
    system_prompt: Annotated[str | None, typer.Option(help="Optional system prompt.")] = None,
    batch_size: BatchOpt = 16,
    data_dir: DataDirOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Fit SCANS refusal vectors, reference transitions and threshold; write DIR/manifest.json."""
    from safesteer.evaluation.run_setup import RunError, RunOptions, fit_or_load
    from safesteer.models import load_model

    options = RunOptions(
        recipe="paper",
        model=model,
        preset=preset,
        anchor_size=anchor_size,
        seed=seed,
        multiplier=multiplier,
        layers=layers,
        cls_layers=cls_layers,
        threshold=threshold,
        system_prompt=system_prompt,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
    )
    with user_errors(RunError):
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is an existing file; name a folder for the artifact")
        lm = load_model(model, dtype=dtype, device=resolve_device(device), device_map=device_map)
        artifact = fit_or_load(lm, options, None)
        artifact.save(out)
    s = artifact.settings
    err.print(
        f"Wrote {out}: {lm.num_layers} layers, steering {list(s.steer_layers)}, alpha {s.alpha} "
        f"({s.alpha_mode}), threshold {s.threshold:.4f}, classification layers "
        f"{s.cls_layers[0]}..{s.cls_layers[-1]}"
    )


def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more user prompts.")],
    model: ModelOpt = None,
    artifact: Annotated[
        Path | None, typer.Option(help="A fitted SCANS (or, with safeswitch, SafeSwitch) artifact.")
    ] = None,
    method: Annotated[str, typer.Option(help="none, scans or safeswitch.")] = "scans",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    repetition_penalty: Annotated[float, typer.Option(help="1.0 = off.")] = 1.0,
    multiplier: Annotated[float | None, typer.Option(help="Steering strength alpha.")] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Print responses, with the SCANS decision (score, sigma) per prompt."""
    from safesteer.core.generation import GenerationConfig
    from safesteer.evaluation.run_setup import RunError, RunOptions, calibrated_for, fit_or_load
    from safesteer.evaluation.runner import decide_and_generate
    from safesteer.methods.scans.decide import policy_coefficients
    from safesteer.models import load_model

    if method not in ("none", "scans", "safeswitch"):
        err.print(f"[red]error:[/red] unknown method {method!r}; use none, scans or safeswitch")
        raise typer.Exit(2)
    if method == "safeswitch":
        with user_errors(RunError):
            generate_safeswitch(
                prompts,
                model,
                artifact,
                max_new_tokens,
                repetition_penalty,
                dtype,
                resolve_device(device),
                device_map,
            )
        return
    with user_errors(RunError):
        lm = load_model(model, dtype=dtype, device=resolve_device(device), device_map=device_map)
        scans = None
        if method == "scans":
            options = RunOptions(
                model=model,
                artifact=str(artifact) if artifact else None,
                seed=seed,
                multiplier=multiplier,
            )
            if artifact is None and calibrated_for(options) is None:
                err.print("No --artifact given: fitting SCANS now (save one with `safesteer fit`).")
            scans = fit_or_load(lm, options, None)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty
        )
        outputs = decide_and_generate(lm, scans, prompts, config)
    console = Console()
    for prompt, (response, decision) in zip(prompts, outputs, strict=True):
        console.rule(prompt[:80])
        if decision is not None and scans is not None:
            coefficient = float(policy_coefficients(scans)([decision])[0])
            verdict = (
                "steer towards refusal"
                if coefficient > 0
                else "steer away from refusal"
                if coefficient < 0
                else "unsteered"
            )
            refusal = (
                ""
                if decision.refusal_probability is None
                else f"  P(refuse) {decision.refusal_probability:.3f}"
            )
            side = "unsafe" if decision.sigma > 0 else "safe"
            console.print(
                f"[dim]score {decision.score:.4f}  sigma {decision.sigma:+d} ({side}){refusal}"
                f"  → {verdict}[/dim]"
            )
        console.print(response)
