"""``safesteer fit safeswitch``, ``safesteer chat`` and the SafeSwitch branch of ``generate``.

Registered on the main app in :mod:`safesteer.cli.main`; shared helpers come from
:mod:`safesteer.cli.common`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console

from safesteer.cli.common import (
    BatchOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    err,
    progress_lines,
    resolve_device,
    user_errors,
)
from safesteer.cli.stage1_threshold import print_pool_report


def fit_safeswitch_command(
    out: Annotated[Path, typer.Option(help="Artifact folder to write.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="HF directory, .gguf file or hub id; default: the embedded SmolLM2-135M."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="Cap on training prompts (half harmful, half harmless) for a quick fit."),
    ] = None,
    mode: Annotated[str, typer.Option(help="two-stage (default) or direct.")] = "two-stage",
    layer: Annotated[
        str | None,
        typer.Option(help="Prober layer: an index (negative counts from the end) or best."),
    ] = None,
    judge: Annotated[
        str, typer.Option(help="Comply labels: strict (keyword rule) or llm.")
    ] = "strict",
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL for --judge llm (…/v1).")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="Model name for --judge llm.")] = None,
    judge_template: Annotated[
        str,
        typer.Option(help="LLM judge prompt: default, published (SafeSwitch's) or a file (PATH)."),
    ] = "default",
    thresholds: Annotated[
        str,
        typer.Option(
            help="Prober thresholds: calibrated (on the validation split) or paper (0.5)."
        ),
    ] = "calibrated",
    steer_budget: Annotated[
        float,
        typer.Option(
            help="scans+safeswitch: the share of validation harmful prompts that may fall under "
            "the threshold below which rows are steered away from refusal."
        ),
    ] = 0.05,
    harmless_budget: Annotated[
        float | None,
        typer.Option(
            help="Stage 1 flags at most this share of the validation split's harmless prompts: "
            "its threshold is raised to meet it (e.g. 0.02). Default: no bound."
        ),
    ] = None,
    pool_per_source: Annotated[
        int | None,
        typer.Option(
            help="With --harmless-budget: also bound stage 1 per harmless source on a held-out "
            "pool of this many prompts per training source that the fit never read (prefill "
            "only; see `fit safeswitch-threshold`). Default: the validation split only."
        ),
    ] = None,
    n_decode: Annotated[int, typer.Option(help="Pilot tokens before stage 2 and the switch.")] = 3,
    label_tokens: Annotated[int, typer.Option(help="Tokens of each answer the judge labels.")] = 48,
    lr: Annotated[float, typer.Option(help="Prober learning rate (AdamW).")] = 1e-3,
    head_prompts: Annotated[
        int, typer.Option(help="Harmful prompts the refusal head is trained on.")
    ] = 256,
    head_epochs: Annotated[int, typer.Option(help="Refusal-head epochs.")] = 2,
    head_lr: Annotated[float, typer.Option(help="Refusal-head learning rate.")] = 2e-3,
    head_repetition_penalty: Annotated[
        float,
        typer.Option(
            help="Repetition penalty on the refusal head's own tokens (1.0: none; 1.3 chosen on "
            "SORRY-Bench train stops its loops)."
        ),
    ] = 1.3,
    written: Annotated[
        str,
        typer.Option(
            help="Which batches of the project's written prompts (alarming-but-safe and harmful "
            "requests) are a training source: all, or first (as the v1/v2 fits)."
        ),
    ] = "all",
    seed: Annotated[int, typer.Option(help="Seed for sampling, splits and targets.")] = 0,
    batch_size: BatchOpt = 16,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with the SafeSwitch sets (or SAFESTEER_DATA_DIR).")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Fit SafeSwitch probers and refusal head; write DIR/manifest.json and a layer-sweep PNG."""
    from dataclasses import replace

    from safesteer.evaluation.judges.keyword import StrictJudge
    from safesteer.evaluation.judges.llm import JudgeRequestError, LLMJudge, judge_prompt_for
    from safesteer.evaluation.run_setup import RunError
    from safesteer.methods.safeswitch.fit import FitConfig, LayerChoice, fit_safeswitch
    from safesteer.methods.safeswitch.head import HeadConfig
    from safesteer.methods.safeswitch.probe import ProberConfig, plot_sweep
    from safesteer.methods.safeswitch.settings import MODES
    from safesteer.methods.safeswitch.stage1_pool import calibrate_stage1
    from safesteer.methods.safeswitch.train import (
        THRESHOLD_CHOICES,
        WRITTEN_CHOICES,
        WrittenChoice,
        load_training_prompts,
    )
    from safesteer.models import load_model

    if mode not in MODES:
        err.print(f"[red]error:[/red] unknown mode {mode!r}; use two-stage or direct")
        raise typer.Exit(2)
    if judge not in ("strict", "llm"):
        err.print(f"[red]error:[/red] unknown judge {judge!r}; use strict or llm")
        raise typer.Exit(2)
    if thresholds not in THRESHOLD_CHOICES:
        err.print(f"[red]error:[/red] unknown --thresholds {thresholds!r}; use calibrated or paper")
        raise typer.Exit(2)
    if written not in WRITTEN_CHOICES:
        err.print(f"[red]error:[/red] unknown --written {written!r}; use all or first")
        raise typer.Exit(2)
    if not 0.0 <= steer_budget < 1.0:
        err.print(f"[red]error:[/red] --steer-budget must be in [0, 1), got {steer_budget}")
        raise typer.Exit(2)
    if harmless_budget is not None and not 0.0 <= harmless_budget < 1.0:
        err.print(f"[red]error:[/red] --harmless-budget must be in [0, 1), got {harmless_budget}")
        raise typer.Exit(2)
    if pool_per_source is not None and (harmless_budget is None or pool_per_source < 1):
        err.print(
            "[red]error:[/red] --pool-per-source needs --harmless-budget and at least 1 prompt, "
            f"got {pool_per_source}"
        )
        raise typer.Exit(2)
    if pool_per_source is not None and mode != "two-stage":
        err.print("[red]error:[/red] --pool-per-source bounds stage 1 of --mode two-stage only")
        raise typer.Exit(2)
    if not head_repetition_penalty > 0:
        err.print(
            "[red]error:[/red] --head-repetition-penalty must be positive (1.0: none), "
            f"got {head_repetition_penalty}"
        )
        raise typer.Exit(2)
    choice: LayerChoice = None
    if layer is not None:
        try:
            choice = "best" if layer == "best" else int(layer)
        except ValueError:
            err.print(f"[red]error:[/red] --layer must be an integer or best, not {layer!r}")
            raise typer.Exit(2) from None
    started = time.perf_counter()
    with user_errors(RunError, JudgeRequestError):
        if judge == "llm":
            judge_prompt = judge_prompt_for(judge_template, data_dir)
            labeller: LLMJudge | StrictJudge = LLMJudge(
                base_url=judge_url,
                model=judge_model,
                template=judge_prompt.template,
                system_prompt=judge_prompt.system_prompt,
            )
        else:
            labeller = StrictJudge()
        data = load_training_prompts(
            data_dir, limit, seed, head_extra=head_prompts, written=cast(WrittenChoice, written)
        )
        prompts = data.prompts
        lm = load_model(model, dtype=dtype, device=resolve_device(device), device_map=device_map)
        config = FitConfig(
            mode=mode,
            layer=choice,
            n_decode=n_decode,
            label_tokens=label_tokens,
            batch_size=batch_size,
            seed=seed,
            thresholds=thresholds,
            steer_budget=steer_budget,
            harmless_budget=harmless_budget,
            head_repetition_penalty=head_repetition_penalty,
            prober=replace(ProberConfig(), lr=lr),
            head=replace(HeadConfig(), prompts=head_prompts, epochs=head_epochs, lr=head_lr),
        )
        n_harmful = sum(p.harmful for p in prompts)
        err.print(
            f"Fitting SafeSwitch ({mode}) on {n_harmful} harmful + {len(prompts) - n_harmful} "
            f"harmless prompts with the {judge} judge"
        )
        with progress_lines("fitting") as progress:
            artifact = fit_safeswitch(
                lm,
                prompts,
                labeller,
                config,
                head_extra=data.head_extra,
                data_report=data.report,
                progress=progress,
            )
            if pool_per_source is not None and harmless_budget is not None:
                artifact = calibrate_stage1(
                    lm,
                    artifact,
                    harmless_budget,
                    data_dir=data_dir,
                    per_source=pool_per_source,
                    seed=seed,
                    batch_size=batch_size,
                    progress=progress,
                )
        artifact.save(out)
        label = artifact.report["sweep_label"]
        png = plot_sweep(
            artifact.report["sweep"], Path(out) / "layer_sweep.png", f"prober per layer: {label}"
        )
    _print_fit_summary(artifact.report, artifact.settings.to_json(), out, png)
    if "stage1_pool" in artifact.report:
        print_pool_report(artifact.report["stage1_pool"], out)
    err.print(f"total {time.perf_counter() - started:.0f} s")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_fit_summary(
    report: dict[str, Any], settings: dict[str, Any], out: Path, png: Path
) -> None:
    s1 = report["stage1"]
    err.print(
        f"Wrote {out} ({settings['mode']}, layer {settings['layer']}, n_decode "
        f"{settings['n_decode']}); sweep plot {png}"
    )
    err.print(
        f"stage 1 ({report['sweep_label']}): threshold {s1['threshold']:.3f}, test accuracy "
        f"{_fmt(s1['test']['accuracy'])}, F1 {_fmt(s1['test']['f1'])}, AUROC "
        f"{_fmt(s1['test']['auroc'])}"
    )
    s2 = report.get("stage2")
    if s2:
        err.print(
            f"stage 2 (complies): threshold {s2['threshold']:.3f}, test accuracy "
            f"{_fmt(s2['test']['accuracy'])}, F1 {_fmt(s2['test']['f1'])}, AUROC "
            f"{_fmt(s2['test']['auroc'])}"
        )
    steer = report.get("steering")
    if steer:
        err.print(
            f"scans+safeswitch steers below P(harmful) {steer['steer_below']:.3f} (budget "
            f"{steer['budget']}): test harmful {_fmt(steer['test_harmful_steered'])}, harmless "
            f"{_fmt(steer['test_harmless_steered'])} steered"
        )
    bound = report.get("stage1_false_flags")
    if bound:
        err.print(
            f"stage 1 false-flag budget {bound['budget']}: threshold "
            f"{bound['balanced_threshold']:.3f} → {bound['threshold']:.3f}; validation harmless "
            f"flagged {_fmt(bound['val_harmless_flagged_before'])} → "
            f"{_fmt(bound['val_harmless_flagged_after'])}, harmful "
            f"{_fmt(bound['val_harmful_flagged_before'])} → "
            f"{_fmt(bound['val_harmful_flagged_after'])}"
        )
    head = report["head"]
    err.print(
        f"refusal head: {head['examples']} examples, {head['tokens']} tokens, loss "
        f"{head['loss_before']:.3f} → {head['loss_after']:.3f} in {head['seconds']:.0f} s"
    )
    err.print("timings (s): " + json.dumps(report["timings_s"]))


def generate_safeswitch(
    prompts: Sequence[str],
    model: str | None,
    artifact: Path | None,
    max_new_tokens: int,
    repetition_penalty: float,
    dtype: str,
    device: str,
    device_map: str | None,
) -> None:
    """``safesteer generate --method safeswitch``: responses with per-prompt decisions."""
    from safesteer.cli.chat import describe_switch, load_safeswitch
    from safesteer.core.generation import GenerationConfig
    from safesteer.methods.safeswitch.generate import safeswitch_generate
    from safesteer.models import load_model

    lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
    switch = load_safeswitch(lm, artifact)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    results = safeswitch_generate(lm, switch, prompts, config)
    console = Console()
    for result in results:
        console.rule(result.prompt[:80])
        console.print(f"[dim]{describe_switch(result.decision)}[/dim]")
        console.print(result.response, markup=False)


def chat_command(
    method: Annotated[str, typer.Option(help="none, scans or safeswitch.")] = "safeswitch",
    artifact: Annotated[
        Path | None,
        typer.Option(help="Artifact of the method (SCANS: fitted now when omitted)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="HF directory, .gguf file or hub id; default: the embedded SmolLM2-135M."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per reply.")] = 128,
    repetition_penalty: Annotated[float, typer.Option(help="1.0 = off.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed (SCANS anchors when fitting).")] = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Chat on stdin: one message per line, each answered with its decision; /quit or EOF ends."""
    from safesteer.cli.chat import CHAT_METHODS, chat_loop, make_responder
    from safesteer.core.generation import GenerationConfig
    from safesteer.evaluation.run_setup import RunError
    from safesteer.models import load_model

    if method not in CHAT_METHODS:
        err.print(f"[red]error:[/red] unknown method {method!r}; use {', '.join(CHAT_METHODS)}")
        raise typer.Exit(2)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    with user_errors(RunError):
        lm = load_model(model, dtype=dtype, device=resolve_device(device), device_map=device_map)
        responder = make_responder(lm, method, artifact, config, seed=seed)
        interactive = sys.stdin.isatty()
        if interactive:
            err.print(f"safesteer chat ({method}); one message per line, /quit to leave")
        chat_loop(responder, sys.stdin, sys.stdout, "> " if interactive else "")
