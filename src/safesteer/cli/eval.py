"""``safesteer eval``, ``demo``, ``report`` and ``compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safesteer.cli.common import (
    BatchOpt,
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
    combined_gate: Annotated[
        Path | None,
        typer.Option(
            help="scans+safeswitch: a second gate on steering (`safesteer fit combined-gate`)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Seeded sample of N prompts per subset.")
    ] = None,
    stratify: Annotated[
        str | None,
        typer.Option(
            help="With --limit: keep the share of each value of these prompt fields, "
            "comma-separated (SORRY-Bench eval: category, prompt_style)."
        ),
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
    judge_workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="Concurrent requests to the llm judge (a `safesteer serve` judge batches them).",
        ),
    ] = 1,
    judge_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            help="Seconds to wait for one llm-judge answer (a local judge on a CPU is slow).",
        ),
    ] = 60.0,
    system_prompt: Annotated[
        str,
        typer.Option(
            help="Prompt format of default/scans: suite (the suite's), model, safeswitch or TEXT."
        ),
    ] = "suite",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95 % intervals.")] = 1000,
    recipe: RecipeOpt = "auto",
    truncate: TruncateOpt = "none",
    rejudge: Annotated[
        bool,
        typer.Option(
            help="Judge every stored response again with --judge (after a judge's rule "
            "changed); the responses are kept and nothing is generated again."
        ),
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
) -> None:
    """Compare methods on a benchmark suite with one or more judges (resumable)."""
    from safesteer.evaluation.eval_options import EvalOptions
    from safesteer.evaluation.evaluate import evaluate
    from safesteer.evaluation.judges.llm import JudgeRequestError
    from safesteer.evaluation.run_setup import RunError

    options = EvalOptions(
        suite=suite,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        judges=[j.strip() for j in judge.split(",") if j.strip()],
        model=model,
        artifact=str(artifact) if artifact else None,
        safeswitch_artifact=str(safeswitch_artifact) if safeswitch_artifact else None,
        combined_gate=str(combined_gate) if combined_gate else None,
        limit=limit,
        stratify=[f.strip() for f in (stratify or "").split(",") if f.strip()],
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
        judge_workers=judge_workers,
        judge_timeout=judge_timeout,
        system_prompt=system_prompt,
        bootstrap=bootstrap,
        recipe=recipe,
        dtype=dtype,
        device=resolve_device(device),
        device_map=device_map,
        truncate=truncate,
        rejudge=rejudge,
    )
    with user_errors(RunError, JudgeRequestError):
        evaluate(options)
    err.print(f"Results in {output_dir}; render them with `safesteer report {output_dir}`.")


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
    from safesteer.evaluation.demo import DemoOptions, run_demo
    from safesteer.evaluation.run_setup import RunError

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
        device=resolve_device(device),
        dtype=dtype,
    )
    with user_errors(RunError):
        run_demo(options)


def report(
    run_dir: Annotated[Path, typer.Argument(help="An output folder of `safesteer eval`.")],
) -> None:
    """Write report.md, report.json and PNG plots for an evaluation folder."""
    from safesteer.evaluation.report import write_report

    with user_errors(FileNotFoundError):
        written = write_report(run_dir)
    for name, path in written.items():
        err.print(f"{name}: {path}")


def compare(
    folders: Annotated[
        list[str],
        typer.Argument(help="Eval folders, each DIR or DIR=LABEL (label prefixes methods)."),
    ],
    judge: Annotated[str, typer.Option(help="paper, strict or llm.")] = "strict",
    out: Annotated[
        Path | None,
        typer.Option(help="Also write the Markdown table here (.md added if no suffix) and JSON."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    on_prompts_of: Annotated[
        Path | None,
        typer.Option(
            help="An eval folder: count only the prompts it holds (compare a sample run with "
            "full-set runs on the same prompts)."
        ),
    ] = None,
    paired_against: Annotated[
        str | None,
        typer.Option(
            help="A method of the table (e.g. v4:safeswitch): also count, per subset, the "
            "prompts only it refuses and only each other method refuses, with a sign test."
        ),
    ] = None,
) -> None:
    """One refusal table from several eval folders, with the pooled Table-2 Avg and 95 % CIs."""
    import json

    from safesteer.evaluation.compare import compare as compare_folders
    from safesteer.evaluation.compare import markdown

    with user_errors(FileNotFoundError):
        table = compare_folders(
            folders,
            judge,
            bootstrap,
            on_prompts_of=on_prompts_of,
            paired_against=paired_against,
        )
    text = markdown(table)
    typer.echo(text)
    if out is not None:
        if not out.suffix:
            out = out.with_name(out.name + ".md")
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
