"""The ``safesteer`` command line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safesteer import __version__
from safesteer.artifacts import ArtifactError
from safesteer.cli_calibrate import calibrate_command
from safesteer.cli_datasets import datasets_app
from safesteer.cli_export import export_app, import_app
from safesteer.cli_models import models_app
from safesteer.cli_organism import organism_app
from safesteer.cli_safeswitch import chat_command, fit_safeswitch_command, generate_safeswitch
from safesteer.cli_serve import serve_command
from safesteer.datasets import DatasetError
from safesteer.models import ModelLoadError

app = typer.Typer(
    help="Make chat models refuse what they should and answer what they should.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
fit_app = typer.Typer(help="Fit a method and write its artifact.", no_args_is_help=True)
app.add_typer(fit_app, name="fit")
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")
app.add_typer(organism_app, name="organism")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")
fit_app.command("safeswitch")(fit_safeswitch_command)
app.command("chat")(chat_command)
app.command("calibrate")(calibrate_command)
app.command("serve")(serve_command)
err = Console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="A name from `safesteer models list` (e.g. qwen2.5-coder-0.5b), an HF directory, a "
        ".gguf file or a hub id; default: the embedded SmolLM2-135M."
    ),
]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option(help="accelerate device map, e.g. auto (several GPUs).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for anchors, sampling and calibration.")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per batch.")]
TruncateOpt = Annotated[
    str,
    typer.Option(
        help="A prompt too long for the model's context with --max-new-tokens: none (refuse it "
        "with a message) or left (cut it from the left, keeping its last tokens)."
    ),
]
RecipeOpt = Annotated[
    str,
    typer.Option(
        help="SCANS recipe when no --artifact is given: auto (the calibrated artifact shipped "
        "for the model if any, else the paper's), paper, or calibrated."
    ),
]


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    _quiet_libraries()


@app.command()
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
    anchor_size: Annotated[int, typer.Option(help="Harmful and benign anchors each.")] = 64,
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
    from safesteer.runner import RunError, RunOptions
    from safesteer.runner import run as run_job

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
        device=_device(device),
        device_map=device_map,
        truncate=truncate,
    )
    with _user_errors(RunError):
        run_job(options)


@fit_app.command("scans")
def fit_scans_command(
    out: Annotated[Path, typer.Option(help="Artifact folder to write.")],
    model: ModelOpt = None,
    preset: Annotated[str | None, typer.Option(help="Paper settings preset.")] = None,
    anchor_size: Annotated[int, typer.Option(help="Harmful and benign anchors each.")] = 64,
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
    data_dir: Annotated[Path | None, typer.Option(help="Datasets folder.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Fit SCANS refusal vectors, reference transitions and threshold; write DIR/manifest.json."""
    from safesteer.models import load_model
    from safesteer.runner import RunError, RunOptions, fit_or_load

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
    with _user_errors(RunError):
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is an existing file; name a folder for the artifact")
        lm = load_model(model, dtype=dtype, device=_device(device), device_map=device_map)
        artifact = fit_or_load(lm, options, None)
        artifact.save(out)
    s = artifact.settings
    err.print(
        f"Wrote {out}: {lm.num_layers} layers, steering {list(s.steer_layers)}, alpha {s.alpha} "
        f"({s.alpha_mode}), threshold {s.threshold:.4f}, classification layers "
        f"{s.cls_layers[0]}..{s.cls_layers[-1]}"
    )


@app.command()
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
    from safesteer.generation import GenerationConfig
    from safesteer.models import load_model
    from safesteer.runner import RunError, RunOptions, decide_and_generate, fit_or_load

    if method not in ("none", "scans", "safeswitch"):
        err.print(f"[red]error:[/red] unknown method {method!r}; use none, scans or safeswitch")
        raise typer.Exit(2)
    if method == "safeswitch":
        with _user_errors(RunError):
            generate_safeswitch(
                prompts,
                model,
                artifact,
                max_new_tokens,
                repetition_penalty,
                dtype,
                _device(device),
                device_map,
            )
        return
    with _user_errors(RunError):
        lm = load_model(model, dtype=dtype, device=_device(device), device_map=device_map)
        scans = None
        if method == "scans":
            if artifact is None:
                err.print("No --artifact given: fitting SCANS now (save one with `safesteer fit`).")
            options = RunOptions(
                model=model,
                artifact=str(artifact) if artifact else None,
                seed=seed,
                multiplier=multiplier,
            )
            scans = fit_or_load(lm, options, None)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty
        )
        outputs = decide_and_generate(lm, scans, prompts, config)
    console = Console()
    for prompt, (response, decision) in zip(prompts, outputs, strict=True):
        console.rule(prompt[:80])
        if decision is not None:
            verdict = (
                "unsafe → steer towards refusal" if decision.sigma > 0 else "safe → steer away"
            )
            console.print(
                f"[dim]score {decision.score:.4f}  sigma {decision.sigma:+d}  {verdict}[/dim]"
            )
        console.print(response)


@app.command("eval")
def eval_command(
    suite: Annotated[
        str,
        typer.Option(
            help="scans-paper, xstest, oktest, repe, safeswitch-paper, capability, or file paths."
        ),
    ] = "scans-paper",
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: default, prompt, prompt-balanced, scans, random, safeswitch, "
            "head, prober+prompt, scans+safeswitch."
        ),
    ] = "default,scans",
    judge: Annotated[
        str, typer.Option(help="Comma-separated: paper, strict, llm.")
    ] = "paper,strict",
    model: ModelOpt = None,
    artifact: Annotated[Path | None, typer.Option(help="A fitted SCANS artifact.")] = None,
    safeswitch_artifact: Annotated[
        Path | None,
        typer.Option(
            help="A SafeSwitch artifact (safeswitch, head, prober+prompt, scans+safeswitch)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Seeded sample of N prompts per subset.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    batch_size: BatchOpt = 16,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with non-bundled datasets (or SAFESTEER_DATA_DIR).")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where results are written.")] = Path(
        "runs/eval"
    ),
    seed: SeedOpt = 0,
    anchor_size: Annotated[int, typer.Option(help="Anchors per side when fitting.")] = 64,
    repetition_penalty: Annotated[float, typer.Option(help="1.0 = off; paper: 1.1.")] = 1.0,
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL for the llm judge (…/v1).")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="Model name for the llm judge.")] = None,
    judge_template: Annotated[
        str,
        typer.Option(help="LLM judge prompt: default, published (SafeSwitch's) or a file (PATH)."),
    ] = "default",
    system_prompt: Annotated[
        str,
        typer.Option(
            help="Prompt format of default/scans: suite (the suite's), model, safeswitch or TEXT."
        ),
    ] = "suite",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95 % intervals.")] = 1000,
    recipe: RecipeOpt = "auto",
    truncate: TruncateOpt = "none",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Compare methods on a benchmark suite with one or more judges (resumable)."""
    from safesteer.evaluation.evaluate import EvalOptions, evaluate
    from safesteer.judges import JudgeRequestError
    from safesteer.runner import RunError

    options = EvalOptions(
        suite=suite,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        judges=[j.strip() for j in judge.split(",") if j.strip()],
        model=model,
        artifact=str(artifact) if artifact else None,
        safeswitch_artifact=str(safeswitch_artifact) if safeswitch_artifact else None,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
        output_dir=str(output_dir),
        seed=seed,
        anchor_size=anchor_size,
        repetition_penalty=repetition_penalty,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_template=judge_template,
        system_prompt=system_prompt,
        bootstrap=bootstrap,
        recipe=recipe,
        dtype=dtype,
        device=_device(device),
        device_map=device_map,
        truncate=truncate,
    )
    with _user_errors(RunError, JudgeRequestError):
        evaluate(options)
    err.print(f"Results in {output_dir}; render them with `safesteer report {output_dir}`.")


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="Model name, directory, .gguf or hub id.")
    ] = "qwen2.5-coder-0.5b",
    limit: Annotated[int, typer.Option(help="Seeded XSTest prompts per half (safe, unsafe).")] = 30,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per response.")] = 48,
    artifact: Annotated[
        Path | None, typer.Option(help="A SCANS artifact (default: fitted for the model).")
    ] = None,
    examples: Annotated[int, typer.Option(help="Changed responses shown per half.")] = 3,
    output_dir: Annotated[Path, typer.Option(help="Where results are written.")] = Path(
        "runs/demo"
    ),
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 16,
    data_dir: Annotated[Path | None, typer.Option(help="Datasets folder.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Over-refusal and its fix side by side: default vs SCANS on a seeded XSTest sample."""
    from safesteer.demo import DemoOptions, run_demo
    from safesteer.runner import RunError

    if limit < 1:
        err.print("[red]error:[/red] --limit must be at least 1")
        raise typer.Exit(2)
    options = DemoOptions(
        model=model,
        limit=limit,
        max_new_tokens=max_new_tokens,
        output_dir=str(output_dir),
        artifact=str(artifact) if artifact else None,
        examples=examples,
        seed=seed,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
        device=_device(device),
        dtype=dtype,
    )
    with _user_errors(RunError):
        run_demo(options)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="An output folder of `safesteer eval`.")],
) -> None:
    """Write report.md, report.json and PNG plots for an evaluation folder."""
    from safesteer.evaluation.report import write_report

    with _user_errors(FileNotFoundError):
        written = write_report(run_dir)
    for name, path in written.items():
        err.print(f"{name}: {path}")


@app.command()
def compare(
    folders: Annotated[
        list[str],
        typer.Argument(help="Eval folders, each DIR or DIR=LABEL (label prefixes methods)."),
    ],
    judge: Annotated[str, typer.Option(help="paper, strict or llm.")] = "strict",
    out: Annotated[Path | None, typer.Option(help="Also write the Markdown table here.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
) -> None:
    """One refusal table from several eval folders, with the pooled Table-2 Avg and 95 % CIs."""
    import json

    from safesteer.evaluation.compare import compare as compare_folders
    from safesteer.evaluation.compare import markdown

    with _user_errors(FileNotFoundError):
        table = compare_folders(folders, judge, bootstrap)
    text = markdown(table)
    typer.echo(text)
    if out is not None:
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")


@app.command()
def analyze(
    artifact: Annotated[Path, typer.Option(help="A fitted SCANS artifact.")],
    model: ModelOpt = None,
    top_k: Annotated[int, typer.Option(help="Tokens shown per layer.")] = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Logit lens of the refusal vectors: top tokens per layer and a suggested steering range."""
    from rich.table import Table

    from safesteer.analysis import suggest_layers, vocabulary_projection
    from safesteer.methods.scans import ScansArtifact
    from safesteer.models import load_model

    with _user_errors():
        lm = load_model(model, dtype=dtype, device=_device(device))
        scans = ScansArtifact.load(artifact, lm)
        rows = vocabulary_projection(lm, scans, top_k=top_k)
    table = Table(title="refusal vector → vocabulary (final norm + LM head)")
    table.add_column("layer", justify="right")
    table.add_column("refusal-like share", justify="right")
    table.add_column("top tokens")
    steer = set(scans.settings.steer_layers)
    for row in rows:
        mark = " *" if row.layer in steer else ""
        table.add_row(f"{row.layer}{mark}", f"{row.refusal_share:.2f}", " ".join(row.tokens))
    Console().print(table)
    width = len(scans.settings.steer_layers)
    suggested = suggest_layers(rows, width)
    advice = (
        "no layer projects onto refusal-like tokens; keep the depth-scaled default"
        if suggested is None
        else f"suggested {width} layers by refusal-like tokens: {list(suggested)}"
    )
    Console().print(f"* = current steering layers; {advice}")


@contextmanager
def _user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn expected errors into a one-line message and exit code 1 (no traceback)."""
    kinds: tuple[type[Exception], ...] = (
        ModelLoadError,
        ArtifactError,
        DatasetError,
        ValueError,
        *extra,
    )
    try:
        yield
    except kinds as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def main() -> None:
    """Entry point of the ``safesteer`` command."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; finished rows are kept and the run resumes when started again")
        sys.exit(130)
