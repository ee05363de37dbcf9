"""The main job: fit (or load) SCANS, run it over a test set, judge, and write results.

Results are written as they are produced (``responses.jsonl``), so an interrupted run keeps its
finished rows and continues where it stopped when started again with the same settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from safesteer import __version__
from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.core.progress import row_progress
from safesteer.datasets import Prompt, load_test_set, stratified_sample
from safesteer.evaluation.judges.keyword import PaperJudge, StrictJudge
from safesteer.evaluation.metrics import classifier_metrics, count_empty, pooled_avg, refusal_rates
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
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import (
    ScansDecision,
    ScansResult,
    policy_coefficients,
    unsteered,
)
from safesteer.methods.scans.generate import scans_generate

log = logging.getLogger(__name__)
console = Console(stderr=True)


def select_prompts(
    prompts: Sequence[Prompt], anchors: Sequence[str], options: RunOptions
) -> list[Prompt]:
    """The test prompts: anchors removed, then a seeded sample keeping the safe/unsafe mix."""
    excluded = {a.strip() for a in anchors}
    kept = [p for p in prompts if p.text.strip() not in excluded]
    if not kept:
        raise RunError(f"test data {options.test_data!r} holds no prompts besides the anchors")
    return stratified_sample(kept, options.limit, options.seed)


def _row(index: int, prompt: Prompt, result: ScansResult) -> dict[str, Any]:
    return {
        "id": index,
        "prompt": prompt.text,
        "label": prompt.label,
        "subset": prompt.subset,
        "score": round(result.decision.score, 6),
        "sigma": result.decision.sigma,
        "refusal_probability": result.decision.refusal_probability,
        "predicted": "unsafe" if result.decision.sigma > 0 else "safe",
        "response": result.response,
        # True / False, or "empty" for a degenerate response (neither refused nor answered)
        "refused": PaperJudge().judge(prompt.text, result.response),
        "refused_strict": StrictJudge().judge(prompt.text, result.response),
        "new_tokens": len(result.token_ids),
        "stopped": result.stopped,
    }


def _read_done(path: Path, prompts: Sequence[Prompt]) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open() as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is truncated; it will be regenerated", path, line_no)
                continue
            index = row.get("id")
            if (
                isinstance(index, int)
                and index < len(prompts)
                and row["prompt"] == prompts[index].text
            ):
                done[index] = row
    return done


def _check_resume(out: Path, options: RunOptions) -> bool:
    """True when ``out`` holds an unfinished or finished run with the same settings."""
    settings_path = out / "settings.json"
    if not (out / "responses.jsonl").exists() or not settings_path.exists():
        return False
    previous = json.loads(settings_path.read_text()).get("resume_key")
    if previous != options.resume_key():
        changed = sorted(
            k for k in options.resume_key() if (previous or {}).get(k) != options.resume_key()[k]
        )
        raise RunError(
            f"{out} holds a run with other settings (changed: {', '.join(changed)}). "
            "Use another --output-dir, or delete the folder to start over."
        )
    return True


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Refusal rates per label and subset, pooled Avg and the classifier's quality.

    Empty (degenerate) responses count in neither the rates nor the Avg; ``n_empty`` says how many.
    """
    labels = [r["label"] for r in rows]
    subsets = [r["subset"] for r in rows]
    summary: dict[str, Any] = {"n": len(rows)}
    for key, column in (("paper_judge", "refused"), ("strict_judge", "refused_strict")):
        refused = [r[column] for r in rows]
        n_empty = count_empty(refused)
        summary[key] = {
            "by_label": refusal_rates(labels, labels, refused),
            "by_subset": refusal_rates(labels, subsets, refused),
            "avg": pooled_avg(labels, refused) if n_empty < len(rows) else None,
            "n_empty": n_empty,
        }
    summary["classifier"] = classifier_metrics(
        labels, [r["score"] for r in rows], [r["predicted"] for r in rows]
    )
    return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A readable table of refusal rates and classifier quality."""
    table = Table(title=f"SCANS run: {summary['n']} prompts ({out})")
    table.add_column("subset")
    table.add_column("label")
    table.add_column("n", justify="right")
    table.add_column("refusal % (paper)", justify="right")
    table.add_column("refusal % (strict)", justify="right")
    table.add_column("empty", justify="right")
    paper, strict = summary["paper_judge"], summary["strict_judge"]
    for name, row in paper["by_subset"].items():
        strict_rate = strict["by_subset"][name]["refusal_rate"]
        table.add_row(
            name,
            row["label"],
            str(row["n"]),
            _pct(row["refusal_rate"]),
            _pct(strict_rate),
            str(row.get("n_empty", 0)),
        )
    table.add_row(
        "Avg (pooled)",
        "",
        str(summary["n"]),
        _pct(paper["avg"]),
        _pct(strict["avg"]),
        str(paper.get("n_empty", 0)),
    )
    Console().print(table)
    cls = summary["classifier"]
    Console().print(
        "classifier (unsafe = positive): "
        f"precision {_num(cls['precision'])}  recall {_num(cls['recall'])}  F1 {_num(cls['f1'])}  "
        f"AUROC {_num(cls['auroc'])}  AUPRC {_num(cls['auprc'])}"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run(options: RunOptions, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run SCANS over the test data, writing responses, summary and settings to the output dir
    (locked while the run writes there)."""
    if options.method not in ("scans", "none"):
        raise RunError(f"unknown method {options.method!r}; use scans or none")
    check_options(options)  # before the lock: bad options never create the folder
    with exclusive_folder(Path(options.output_dir)):
        return _run(options, lm)


def _run(options: RunOptions, lm: LoadedModel | None) -> dict[str, Any]:
    out = Path(options.output_dir)
    resuming = _check_resume(out, options)
    # Read the test data first: a bad file fails before minutes of loading and fitting.
    test_prompts = load_test_set(options.test_data, data_dir=options.data_dir)
    if lm is None:
        lm = load_model_for(options)
    artifact = fit_or_load(lm, options, out, resuming, save=False)
    anchors = list(artifact.anchors.get("harmful", [])) + list(artifact.anchors.get("benign", []))
    anchors += sorted(lm.trained_on)  # a fine-tune's own training prompts are never test prompts
    prompts = select_prompts(test_prompts, anchors, options)
    model_texts = fit_prompt_lengths(
        lm,
        [p.text for p in prompts],
        options.max_new_tokens,
        options.truncate,
        [artifact.settings.system_prompt],
        artifact.settings.reply_prefix,
    )
    # Every check passed: only now is anything written (no half-made folder after an error).
    out.mkdir(parents=True, exist_ok=True)
    keep_artifact(artifact, options, out)
    settings = {
        "safesteer_version": __version__,
        "options": asdict(options),
        "resume_key": options.resume_key(),
        "model": lm.name,
        "scans": artifact.settings.to_json(),
        "calibration": artifact.calibration,
        "n_prompts": len(prompts),
        "torch": torch.__version__,
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    responses_path = out / "responses.jsonl"
    done = _read_done(responses_path, prompts)
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        console.print(f"Resuming: {len(done)} of {len(prompts)} prompts already done in {out}")
        # rewrite the file without truncated lines before appending
        with responses_path.open("w") as handle:
            for i in sorted(done):
                handle.write(json.dumps(done[i]) + "\n")
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens, repetition_penalty=options.repetition_penalty
    )
    coefficients = policy_coefficients(artifact) if options.method == "scans" else unsteered
    rows = dict(done)
    with (
        responses_path.open("a") as handle,
        row_progress(console) as progress,
    ):
        task = progress.add_task("generating", total=len(prompts), completed=len(done))

        def write(indices: list[int], results: list[ScansResult]) -> None:
            for local, result in zip(indices, results, strict=True):
                index = todo[local]
                row = _row(index, prompts[index], result)
                rows[index] = row
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            progress.advance(task, len(indices))

        if todo:
            scans_generate(
                lm,
                artifact,
                [model_texts[i] for i in todo],
                config,
                batch_size=options.batch_size,
                coefficients=coefficients,
                on_batch=write,
            )
    ordered = [rows[i] for i in sorted(rows)]
    # Rows were appended as batches finished (length-sorted); leave the file in prompt order.
    tmp = responses_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in ordered))
    tmp.replace(responses_path)
    summary = summarise(ordered)
    summary["settings"] = {"method": options.method, **artifact.settings.to_json()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    return summary


def decide_and_generate(
    lm: LoadedModel,
    artifact: ScansArtifact | None,
    prompts: Sequence[str],
    config: GenerationConfig,
    batch_size: int = 16,
    steer: bool = True,
) -> list[tuple[str, ScansDecision | None]]:
    """Responses (and SCANS decisions when an artifact is given) for ad-hoc prompts."""
    if artifact is None:
        from safesteer.core.generation import decode_texts, generate_ids
        from safesteer.core.layout import ChatLayout

        layout = ChatLayout(lm.tokenizer)
        texts = decode_texts(lm, generate_ids(lm, [layout.prompt_ids(p) for p in prompts], config))
        return [(t, None) for t in texts]
    chooser: Callable[[list[ScansDecision]], torch.Tensor] = (
        policy_coefficients(artifact) if steer else unsteered
    )
    results = scans_generate(
        lm, artifact, prompts, config, batch_size=batch_size, coefficients=chooser
    )
    return [(r.response, r.decision) for r in results]
