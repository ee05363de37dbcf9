"""What ``safesteer run`` (and eval, chat, serve) needs before generating: options and their
checks, the model, the SCANS artifact (fit, loaded or the shipped calibrated one), prompt
lengths."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

try:  # POSIX: a run's output folder is locked while it writes (see exclusive_folder)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None  # type: ignore[assignment]

from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import draw_anchors
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.calibrated import CALIBRATED_DIR
from safesteer.methods.scans.fit import fit_scans, recalibrate_threshold
from safesteer.methods.scans.settings import PRESETS, default_settings, parse_layers
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


@contextmanager
def exclusive_folder(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder while a run writes there.

    A second run on the same folder (a resume started while the first still runs) gets a clear
    error instead of interleaving its writes. A folder this call created is removed again if the
    run left nothing in it (an error before any result). Callers check their options first
    (:func:`check_options`, which also refuses an output path that is a file).
    """
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create --output-dir {out}: {error.strerror}") from None
    lock_path = out / ".lock"
    handle = lock_path.open("a")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"another safesteer run is writing {out}; wait until it has finished, or "
                    "use another --output-dir"
                ) from None
        yield
    finally:
        handle.close()
        if created and [p.name for p in out.iterdir()] == [lock_path.name]:
            lock_path.unlink()
            out.rmdir()
