"""``safesteer eval``: several methods on the same prompts, several judges, resumable.

Every (method, prompt) row is judged and appended to ``responses.jsonl`` as soon as its batch is
done; a restarted run with the same settings skips the rows already there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from safesteer import __version__
from safesteer.core.generation import GenerationConfig, generate_batched
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.core.progress import row_progress
from safesteer.evaluation.capability_suite import (
    CAPABILITY_METHODS,
    CapabilitySettings,
    headline,
    print_capability,
    run_capability,
)
from safesteer.evaluation.eval_options import (
    METHODS,
    PROMPT_METHODS,
    SAFESWITCH_FIT,
    SAFESWITCH_METHODS,
    EvalOptions,
    MethodOutput,
    OnBatch,
)
from safesteer.evaluation.eval_rows import (
    add_missing_verdicts,
    build_judges,
    check_resumed_rows,
    forget_verdicts,
    judge_outputs,
    load_suite_prompts,
    make_row,
    read_rows,
    sample_per_subset,
    write_rows,
)
from safesteer.evaluation.eval_summary import print_summary, summarise
from safesteer.evaluation.run_setup import (
    RunError,
    RunOptions,
    check_options,
    exclusive_folder,
    fit_or_load,
    fit_prompt_lengths,
    keep_artifact,
    load_model_for,
)
from safesteer.evaluation.suites import Suite, get_suite
from safesteer.methods.combined import check_combinable, combined_generate
from safesteer.methods.combined_gate import CombinedGate
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, sha256_text
from safesteer.methods.safeswitch.baselines import prober_prompt_generate
from safesteer.methods.safeswitch.generate import safeswitch_generate
from safesteer.methods.safeswitch.settings import SAFESWITCH_SAFETY_PROMPT, SAFESWITCH_SYSTEM_PROMPT
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import ScansDecision, policy_coefficients, unsteered
from safesteer.methods.scans.generate import scans_generate

console = Console(stderr=True)


def resolve_system_prompt(choice: str, suite: Suite) -> tuple[bool, str | None]:
    """``--system-prompt``: (whether to replace the SCANS artifact's format, the prompt).

    ``suite``: the suite's own choice (SafeSwitch's helpful prompt for ``safeswitch-paper``, else
    the artifact's format); ``model``: the artifact's format; ``safeswitch``: SafeSwitch's helpful
    prompt; any other text is used as the system prompt itself.
    """
    if choice == "suite":
        return (suite.system_prompt is not None, suite.system_prompt)
    if choice == "model":
        return (False, None)
    if choice == "safeswitch":
        return (True, SAFESWITCH_SYSTEM_PROMPT)
    if not choice.strip():
        raise RunError("--system-prompt is empty; use suite, model, safeswitch or a prompt text")
    return (True, choice)


def random_directions(artifact: ScansArtifact, seed: int) -> torch.Tensor:
    """Unit random directions per layer: the control that asks whether the refusal direction
    matters (same alpha, same per-row signs)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(artifact.vectors.shape, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True)


def run_method(
    method: str,
    lm: LoadedModel,
    artifact: ScansArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    batch_size: int,
    seed: int,
    on_batch: OnBatch,
    safeswitch: SafeSwitchArtifact | None = None,
    gate: CombinedGate | None = None,
) -> None:
    """Generate for ``queries`` with one method, reporting each finished batch (``gate``: the
    combined method's optional second gate)."""
    if method in SAFESWITCH_METHODS:
        if safeswitch is None:
            raise RunError(f"method {method!r} needs --safeswitch-artifact DIR ({SAFESWITCH_FIT})")

        def switched(indices: list[int], results: list[Any]) -> None:
            outputs = [
                MethodOutput(
                    r.response,
                    None,
                    r.decision.stage1,
                    r.decision.stage2,
                    r.decision.flagged,
                    getattr(r, "steered", None),
                    getattr(r, "gate", None),
                    getattr(r, "towards", None),
                    getattr(r, "released", None),
                )
                for r in results
            ]
            on_batch(indices, outputs)

        if method == "scans+safeswitch":
            combined_generate(
                lm,
                safeswitch,
                artifact,
                queries,
                config,
                batch_size=batch_size,
                on_batch=switched,
                gate=gate,
            )
        elif method == "prober+prompt":
            prober_prompt_generate(
                lm, safeswitch, queries, config, batch_size=batch_size, on_batch=switched
            )
        else:
            safeswitch_generate(
                lm,
                safeswitch,
                queries,
                config,
                batch_size=batch_size,
                always_on=method == "head",
                on_batch=switched,
            )
        return
    if method in PROMPT_METHODS:
        layout = ChatLayout(lm.tokenizer, PROMPT_METHODS[method])

        def plain(indices: list[int], texts: list[str]) -> None:
            on_batch(indices, [MethodOutput(t, None) for t in texts])

        encoded = [layout.prompt_ids(q) for q in queries]
        generate_batched(lm, encoded, config, batch_size, on_batch=plain)
        return
    choices: dict[str, tuple[Callable[[list[ScansDecision]], torch.Tensor], bool]] = {
        "default": (unsteered, False),
        "scans": (policy_coefficients(artifact), False),
        "random": (policy_coefficients(artifact), True),
    }
    if method not in choices:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    coefficients, use_random = choices[method]
    direction = random_directions(artifact, seed) if use_random else None

    def fused(indices: list[int], results: list[Any]) -> None:
        on_batch(indices, [MethodOutput(r.response, r.decision) for r in results])

    scans_generate(
        lm,
        artifact,
        queries,
        config,
        batch_size=batch_size,
        coefficients=coefficients,
        direction=direction,
        on_batch=fused,
    )


# --------------------------------------------------------------------------------------------
# the job


def evaluate(
    options: EvalOptions, lm: LoadedModel | None = None, *, show: bool = True
) -> dict[str, Any]:
    """Run every method on the suite's prompts, judge, summarise; resumable.

    ``show=False`` leaves printing the summary tables to the caller. The output folder is locked
    while the run writes there: a second run on it stops with a clear error.
    """
    _check_methods(options)
    check_options(options)  # before the lock: bad options never create the folder
    with exclusive_folder(Path(options.output_dir)):
        return _evaluate(options, lm, show=show)


def _check_methods(options: EvalOptions) -> None:
    """Refuse unknown methods, and SafeSwitch methods without their artifact."""
    if options.suite == "capability":
        bad = [m for m in options.methods if m not in CAPABILITY_METHODS]
        if bad:
            raise RunError(
                f"capability checks take methods {', '.join(CAPABILITY_METHODS)}, not {bad}"
            )
    else:
        unknown = [m for m in options.methods if m not in METHODS]
        if unknown:
            raise RunError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        needs_switch = [m for m in options.methods if m in SAFESWITCH_METHODS]
        if needs_switch and not options.safeswitch_artifact:
            raise RunError(
                f"method(s) {needs_switch} need --safeswitch-artifact DIR ({SAFESWITCH_FIT})"
            )
    if options.combined_gate and "scans+safeswitch" not in options.methods:
        raise RunError(
            "--combined-gate is a gate of the scans+safeswitch method only; add that method to "
            "--methods or drop --combined-gate"
        )


def _evaluate(options: EvalOptions, lm: LoadedModel | None, *, show: bool) -> dict[str, Any]:
    capability = options.suite == "capability"
    judges = build_judges(options)
    suite = Suite("capability", ()) if capability else get_suite(options.suite)
    all_prompts = [] if capability else load_suite_prompts(suite, options.data_dir)
    out = Path(options.output_dir)
    settings_path = out / "settings.json"
    responses_path = out / "responses.jsonl"
    resuming = False
    if settings_path.exists() and responses_path.exists():
        previous = json.loads(settings_path.read_text()).get("resume_key")
        if previous != options.resume_key():
            now = options.resume_key()
            changed = sorted(
                k for k in set(now) | set(previous or {}) if (previous or {}).get(k) != now.get(k)
            )
            raise RunError(
                f"{out} holds an evaluation with other settings (changed: {', '.join(changed)}); "
                "use another --output-dir or delete it to start over."
            )
        resuming = True
    if lm is None:
        lm = load_model_for(options)
    run_options = RunOptions(
        model=options.model,
        recipe=options.recipe,
        artifact=options.artifact,
        anchor_size=options.anchor_size,
        seed=options.seed,
        batch_size=options.batch_size,
        data_dir=options.data_dir,
    )
    artifact = fit_or_load(lm, run_options, out, resuming, save=False)
    override, system_text = resolve_system_prompt(options.system_prompt, suite)
    if override and not capability:
        artifact = artifact.with_settings(system_prompt=system_text)
    if capability:
        out.mkdir(parents=True, exist_ok=True)
        keep_artifact(artifact, run_options, out)
        return _evaluate_capability(options, lm, artifact, out, settings_path)
    anchors = {
        a.strip() for a in artifact.anchors.get("harmful", []) + artifact.anchors.get("benign", [])
    } | {t.strip() for t in lm.trained_on}  # a fine-tune's own training prompts
    switch, gate = None, None
    if options.safeswitch_artifact and any(m in SAFESWITCH_METHODS for m in options.methods):
        switch = SafeSwitchArtifact.load(options.safeswitch_artifact, lm)
        if "scans+safeswitch" in options.methods:
            if options.combined_gate:
                gate = CombinedGate.load(options.combined_gate, lm)
            check_combinable(switch, artifact, gate)
        if override and switch.settings.system_prompt != system_text:
            console.print(
                "[yellow]note:[/yellow] SafeSwitch's methods keep the prompt format their probers "
                "were trained in, not --system-prompt"
            )
    trained = switch.training_hashes() if switch is not None else set()  # never test on these
    prompts = sample_per_subset(
        [
            p
            for p in all_prompts
            if p.text.strip() not in anchors and sha256_text(p.text) not in trained
        ],
        options.limit,
        options.seed,
        options.stratify,
    )
    systems: list[str | None] = [artifact.settings.system_prompt]
    systems += [text for name, text in PROMPT_METHODS.items() if name in options.methods]
    if switch is not None:
        systems.append(switch.settings.system_prompt)
    if "prober+prompt" in options.methods:
        systems.append(SAFESWITCH_SAFETY_PROMPT)
    model_texts = fit_prompt_lengths(
        lm,
        [p.text for p in prompts],
        options.max_new_tokens,
        options.truncate,
        systems,
        artifact.settings.reply_prefix,
    )
    rows = read_rows(responses_path)
    check_resumed_rows(rows, prompts, out)
    # Every check passed: only now is anything written (no half-made folder after an error).
    out.mkdir(parents=True, exist_ok=True)
    keep_artifact(artifact, run_options, out)
    settings = {
        "safesteer_version": __version__,
        "suite": suite.name,
        "methods": options.methods,
        "judges": options.judges,
        "options": asdict(options),
        "resume_key": options.resume_key(),
        "model": lm.name,
        "scans": artifact.settings.to_json(),
        "safeswitch": None if switch is None else switch.settings.to_json(),
        "combined_gate": None if gate is None else gate.summary(),
        "n_prompts": len(prompts),
    }
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    if options.rejudge:
        forget_verdicts(rows, judges, options.methods)
    added = add_missing_verdicts(rows, judges, options.methods)
    if added:
        console.print(
            "Judged earlier rows with the judge(s) added on resume: "
            + ", ".join(f"{name} ({n} rows)" for name, n in added.items())
        )
    if responses_path.exists():
        # keep the new verdicts, and drop a line cut short by a kill before appending after it
        write_rows(responses_path, rows, options.methods)
    config = GenerationConfig(options.max_new_tokens, options.repetition_penalty)
    total = len(prompts) * len(options.methods)
    with (
        responses_path.open("a") as handle,
        row_progress(console) as progress,
    ):
        done = sum(1 for m in options.methods for i in range(len(prompts)) if (m, i) in rows)
        task = progress.add_task("evaluating", total=total, completed=done)
        for method in options.methods:
            todo = [i for i in range(len(prompts)) if (method, i) not in rows]
            if not todo:
                continue
            progress.update(task, description=f"evaluating ({method})")

            def write(
                local: list[int],
                outputs: list[MethodOutput],
                method: str = method,
                todo: list[int] = todo,
            ) -> None:
                indices = [todo[k] for k in local]
                verdicts = judge_outputs(judges, [prompts[i] for i in indices], outputs)
                for index, output, verdict in zip(indices, outputs, verdicts, strict=True):
                    row = make_row(method, index, prompts[index], output, verdict)
                    rows[(method, index)] = row
                    handle.write(json.dumps(row) + "\n")
                handle.flush()
                progress.advance(task, len(local))

            run_method(
                method,
                lm,
                artifact,
                [model_texts[i] for i in todo],
                config,
                options.batch_size,
                options.seed,
                write,
                safeswitch=switch,
                gate=gate,
            )
    ordered = write_rows(responses_path, rows, options.methods)
    summary = summarise(ordered, suite, options)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if show:
        print_summary(summary)
    return summary


def _evaluate_capability(
    options: EvalOptions,
    lm: LoadedModel,
    artifact: ScansArtifact,
    out: Path,
    settings_path: Path,
) -> dict[str, Any]:
    """The capability suite: perplexity, MMLU, XSum per method.

    ``--limit N`` sets the perplexity windows, MMLU questions per subject and XSum articles.
    """
    limit = options.limit
    settings = CapabilitySettings(
        ppl_windows=limit if limit is not None else 16,
        mmlu_per_subject=limit if limit is not None else 20,
        xsum_articles=limit if limit is not None else 20,
        xsum_new_tokens=options.max_new_tokens,
        batch_size=min(options.batch_size, 8),
    )
    settings_path.write_text(
        json.dumps(
            {
                "safesteer_version": __version__,
                "suite": "capability",
                "methods": options.methods,
                "judges": [],
                "options": asdict(options),
                "resume_key": options.resume_key(),
                "model": lm.name,
                "scans": artifact.settings.to_json(),
                "capability": asdict(settings),
            },
            indent=2,
        )
        + "\n"
    )
    results = run_capability(
        lm,
        artifact,
        options.methods,
        out,
        settings,
        options.data_dir,
        random_directions(artifact, options.seed),
        options.seed,
    )
    table = headline(results)
    summary: dict[str, Any] = {
        "suite": "capability",
        "metric": "capability",
        "n_prompts": 0,
        "methods": options.methods,
        "judges": [],
        "results": {},
        "capability": results,
        "capability_table": table,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_capability(table)
    return summary
