"""The main job: fit (or load) SCANS, run it over a test set, judge, and write results.

Results are written as they are produced (``responses.jsonl``), so an interrupted run keeps its
finished rows and continues where it stopped when started again with the same settings.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safesteer import __version__
from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import Prompt, draw_anchors, load_test_set, stratified_sample
from safesteer.evaluation.judges import PaperJudge, StrictJudge
from safesteer.evaluation.metrics import classifier_metrics, count_empty, pooled_avg, refusal_rates
from safesteer.methods.scans.calibrated import CALIBRATED_DIR
from safesteer.methods.scans.method import (
    PRESETS,
    ScansArtifact,
    ScansDecision,
    ScansResult,
    default_settings,
    fit_scans,
    parse_layers,
    policy_coefficients,
    recalibrate_threshold,
    scans_generate,
    unsteered,
)
from safesteer.models import get_source, load_model

log = logging.getLogger(__name__)
console = Console(stderr=True)


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclass
class RunOptions:
    """Settings of ``safesteer run`` (also written to ``settings.json``)."""

    model: str | None = None
    preset: str | None = None
    test_data: str = "default"
    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    multiplier: float | None = None
    layers: str | None = None
    cls_layers: str | None = None
    anchor_size: int = 64
    threshold: float | None = None
    seed: int = 0
    artifact: str | None = None
    output_dir: str = "runs/scans"
    data_dir: str | None = None
    repetition_penalty: float = 1.0
    system_prompt: str | None = None
    method: str = "scans"
    recipe: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    device_map: str | None = None
    truncate: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def resume_key(self) -> dict[str, Any]:
        """The settings that must match for an existing output folder to be continued."""
        keep = [
            "model",
            "preset",
            "test_data",
            "limit",
            "max_new_tokens",
            "multiplier",
            "layers",
            "cls_layers",
            "anchor_size",
            "threshold",
            "seed",
            "artifact",
            "repetition_penalty",
            "system_prompt",
            "method",
            "recipe",
        ]
        key = {k: getattr(self, k) for k in keep}
        if self.truncate != "none":  # absent when off, so folders of older versions still resume
            key["truncate"] = self.truncate
        return key


def load_model_for(options: RunOptions | Any) -> LoadedModel:
    """Load the model named by a run's (or evaluation's) options, with a status line."""
    with console.status("Loading model"):
        return load_model(
            options.model,
            dtype=options.dtype,
            device=options.device,
            device_map=options.device_map,
        )


def fit_or_load(
    lm: LoadedModel,
    options: RunOptions,
    out_dir: Path | None,
    resuming: bool = False,
    *,
    save: bool = True,
) -> ScansArtifact:
    """Load ``options.artifact`` (checked against the model) or fit one from seeded anchors.

    A fitted artifact is saved to ``out_dir/artifact`` (unless ``save`` is False: the caller
    saves it with :func:`keep_artifact` once every check has passed); a resumed run loads it from
    there.
    """
    out_dir_for_saving = out_dir if save else None
    fitted_before = out_dir / "artifact" if out_dir is not None and resuming else None
    bundled = calibrated_for(options)
    if options.artifact:
        artifact = ScansArtifact.load(options.artifact, lm)
    elif fitted_before is not None and (fitted_before / "manifest.json").exists():
        # A resumed run reuses the artifact it fitted (same seed and anchors) instead of refitting.
        artifact = ScansArtifact.load(fitted_before, lm)
    elif bundled is not None:
        artifact = ScansArtifact.load(bundled, lm)
        console.print(f"Using the calibrated SCANS recipe shipped for this model ({bundled.name})")
        if out_dir_for_saving is not None:
            artifact.save(out_dir_for_saving / "artifact")
    else:
        settings = default_settings(lm.num_layers, options.preset)
        if options.system_prompt is not None:
            settings = replace(settings, system_prompt=options.system_prompt)
        if options.cls_layers:
            # calibrate T on the requested classification layers, not on the default ones
            settings = replace(settings, cls_layers=parse_layers(options.cls_layers, lm.num_layers))
        anchors = draw_anchors(options.anchor_size, options.seed, options.data_dir)
        with console.status(
            f"Fitting SCANS on {len(anchors.harmful)}+{len(anchors.benign)} anchors"
        ):
            artifact = fit_scans(
                lm,
                anchors.harmful,
                anchors.benign,
                settings,
                seed=options.seed,
                batch_size=options.batch_size,
            )
        if out_dir_for_saving is not None:
            artifact.save(out_dir_for_saving / "artifact")
    return apply_overrides(artifact, lm, options)


def keep_artifact(artifact: ScansArtifact, options: RunOptions | Any, out: Path) -> None:
    """Save a fitted (or shipped) artifact to ``out/artifact`` for resuming, once all checks
    passed; an artifact given with ``--artifact`` stays where it is."""
    if not options.artifact and not (out / "artifact" / "manifest.json").exists():
        artifact.save(out / "artifact")


RECIPES = ("auto", "paper", "calibrated")


def calibrated_for(options: RunOptions | Any) -> Path | None:
    """The calibrated artifact shipped for this model, when the recipe asks for it.

    ``auto`` (default) uses it when one is shipped and the anchors are the ones it was built on
    (seed 0, 64 + 64) and no preset is chosen; ``paper`` never; ``calibrated`` requires it.
    """
    recipe = getattr(options, "recipe", "auto")
    if recipe not in RECIPES:
        raise RunError(f"unknown recipe {recipe!r}; use {', '.join(RECIPES)}")
    if recipe == "paper":
        return None
    source = get_source(options.model)
    folder = CALIBRATED_DIR / source.name if source is not None else None
    shipped = folder is not None and (folder / "manifest.json").is_file()
    standard = options.seed == 0 and options.anchor_size == 64 and options.preset is None
    if recipe == "calibrated":
        if not shipped:
            raise RunError(
                "no calibrated SCANS artifact is shipped for this model; make one with "
                "`safesteer calibrate --model ... --out DIR` and pass --artifact DIR"
            )
        if not standard:
            raise RunError(
                "the shipped calibrated artifact was built with seed 0, 64 + 64 anchors and no "
                "preset; drop --seed/--anchor-size/--preset or calibrate anew"
            )
    return folder if shipped and standard else None


def apply_overrides(artifact: ScansArtifact, lm: LoadedModel, options: RunOptions) -> ScansArtifact:
    """Command-line values for alpha, layers and threshold replace the artifact's.

    New classification layers (``--cls-layers``) without ``--threshold`` recalibrate T for them
    on the artifact's anchors (the transition gate's T belongs to the layers it was calibrated
    on); an artifact without its anchors is refused with a message.
    """
    changes: dict[str, Any] = {}
    if options.multiplier is not None:
        changes["alpha"] = options.multiplier
    if options.layers:
        changes["steer_layers"] = parse_layers(options.layers, lm.num_layers)
    if options.cls_layers:
        cls_layers = parse_layers(options.cls_layers, lm.num_layers)
        settings = artifact.settings
        needs_new_t = (
            settings.gate == "transition"
            and options.threshold is None
            and cls_layers != settings.calibrated_layers
        )
        if needs_new_t:
            with console.status(f"Recalibrating T for classification layers {options.cls_layers}"):
                artifact = recalibrate_threshold(
                    lm, artifact, cls_layers, batch_size=options.batch_size
                )
            console.print(
                f"Threshold recalibrated on the anchors for classification layers "
                f"{options.cls_layers}: T = {artifact.settings.threshold:.4f}"
            )
        else:
            changes["cls_layers"] = cls_layers
    if options.threshold is not None:
        changes["threshold"] = options.threshold
    return artifact.with_settings(**changes) if changes else artifact


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


_DEVICE = re.compile(r"cpu|auto|mps|cuda(?::\d+)?")


def check_options(options: RunOptions | Any) -> None:
    """Refuse values that cannot work, before any model is loaded (shared by run and eval)."""
    problems = []
    if options.batch_size < 1:
        problems.append(f"--batch-size must be at least 1 (got {options.batch_size})")
    if options.limit is not None and options.limit < 1:
        problems.append(
            f"--limit must be at least 1, or omitted for all prompts (got {options.limit})"
        )
    if getattr(options, "max_new_tokens", 1) < 1:
        problems.append(f"--max-new-tokens must be at least 1 (got {options.max_new_tokens})")
    multiplier = getattr(options, "multiplier", None)
    if multiplier is not None and not math.isfinite(multiplier):
        problems.append(f"--multiplier must be a finite number (got {multiplier})")
    threshold = getattr(options, "threshold", None)
    if threshold is not None and not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        problems.append(
            f"--threshold must lie in [-1, 1] (cosine scores; a probe gate's lie in [0, 1]); "
            f"got {threshold}"
        )
    anchor_size = getattr(options, "anchor_size", 1)
    if anchor_size < 1:
        problems.append(f"--anchor-size must be at least 1 (got {anchor_size})")
    penalty = getattr(options, "repetition_penalty", 1.0)
    if not (math.isfinite(penalty) and penalty > 0):
        problems.append(
            f"--repetition-penalty must be a positive number (1.0 = off; got {penalty})"
        )
    preset = getattr(options, "preset", None)
    if preset is not None and preset not in PRESETS:
        problems.append(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = getattr(options, "recipe", "auto")
    if recipe not in RECIPES:
        problems.append(f"unknown recipe {recipe!r}; use {', '.join(RECIPES)}")
    device = getattr(options, "device", "cpu")
    if not _DEVICE.fullmatch(str(device)):
        problems.append(f"--device {device!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    bootstrap = getattr(options, "bootstrap", 0)
    if bootstrap < 0:
        problems.append(f"--bootstrap must be 0 (no intervals) or more (got {bootstrap})")
    truncate = getattr(options, "truncate", "none")
    if truncate not in TRUNCATE:
        problems.append(f"--truncate must be one of {', '.join(TRUNCATE)} (got {truncate!r})")
    out = Path(options.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"--output-dir {out} is an existing file; name a folder")
    if problems:
        raise RunError("; ".join(problems))


def context_length(lm: LoadedModel) -> int | None:
    """The model's context window in tokens, when its config states one."""
    config = lm.model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# What to do with a prompt longer than the context leaves room for: refuse it, or keep its end.
TRUNCATE = ("none", "left")


def fit_prompt_lengths(
    lm: LoadedModel,
    texts: Sequence[str],
    max_new_tokens: int,
    truncate: str = "none",
    system_prompts: Sequence[str | None] = (None,),
    reply_prefix: str = "Sure",
) -> list[str]:
    """The prompts as the model will see them: each must fit the context window together with
    the chat template (with any of ``system_prompts``), the reply prefix and ``max_new_tokens``.

    A longer prompt is refused with its index and token count (never a hang), or with
    ``truncate="left"`` cut from the left to its last tokens that fit (with a warning).
    """
    if truncate not in TRUNCATE:
        raise RunError(f"--truncate must be one of {', '.join(TRUNCATE)} (got {truncate!r})")
    limit = context_length(lm)
    if limit is None:
        return list(texts)
    tokenizer = lm.tokenizer
    overhead = max(
        len(ChatLayout(tokenizer, system).encode("x", reply_prefix).input_ids)
        for system in system_prompts
    )
    budget = limit - max_new_tokens - overhead - 4  # a few spare for merges at the joins
    if budget < 1:
        raise RunError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {limit:,} tokens ({overhead} go to the chat template); lower it."
        )
    fitted: list[str] = []
    for index, text in enumerate(texts):
        if len(text.encode("utf-8")) <= budget:  # a token covers at least one byte
            fitted.append(text)
            continue
        ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if len(ids) <= budget:
            fitted.append(text)
            continue
        if truncate != "left":
            raise RunError(
                f"prompt {index} has {len(ids):,} tokens ({len(text):,} characters); with "
                f"{max_new_tokens} new tokens it does not fit the model's context of {limit:,} "
                f"tokens (at most {budget:,} prompt tokens). Shorten or drop it, or pass "
                "--truncate left to keep its last tokens."
            )
        keep = budget
        while True:  # decoding and re-encoding can merge differently at the cut
            cut = str(tokenizer.decode(ids[-keep:]))
            if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= budget or keep == 1:
                break
            keep -= 1
        log.warning(
            "prompt %d has %d tokens; truncated from the left to its last %d", index, len(ids), keep
        )
        console.print(
            f"[yellow]prompt {index}: {len(ids):,} tokens, truncated from the left to its last "
            f"{keep:,}[/yellow]"
        )
        fitted.append(cut)
    return fitted


def check_prompt_lengths(lm: LoadedModel, texts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse prompts that cannot fit the context window with the reply (instead of hanging)."""
    fit_prompt_lengths(lm, texts, max_new_tokens)


def run(options: RunOptions, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run SCANS over the test data, writing responses, summary and settings to the output dir."""
    if options.method not in ("scans", "none"):
        raise RunError(f"unknown method {options.method!r}; use scans or none")
    check_options(options)
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
        Progress(
            TextColumn("[bold]generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("generate", total=len(prompts), completed=len(done))

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
