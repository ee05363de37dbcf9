"""Artifacts: tensors in safetensors, everything else in a JSON manifest. Never pickle."""

from __future__ import annotations

import json
import logging
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from safesteer import __version__
from safesteer.core.fingerprint import fingerprint_mismatch, is_legacy, legacy_checksums
from safesteer.core.handle import LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


class ArtifactError(RuntimeError):
    """An artifact is missing, malformed, or belongs to another model."""


def save_artifact(
    directory: str | Path, method: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
) -> Path:
    """Write ``DIR/manifest.json`` and ``DIR/tensors.safetensors``; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(out / TENSORS), metadata={"method": method})
    full = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "safesteer_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tensors": {k: list(v.shape) for k, v in contiguous.items()},
        **manifest,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out / MANIFEST)
    return out


def load_artifact(
    directory: str | Path, method: str | None = None, fit: str = "scans"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an artifact; checks the format version and (optionally) the method. ``fit``: the
    ``safesteer fit`` command the messages name for making the artifact anew."""
    path = Path(directory)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{path} is not a safesteer artifact (no {MANIFEST}). Create one with "
            f"`safesteer fit {fit} --out DIR`."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{manifest_path} is not valid JSON: {exc}. The artifact is damaged; refit it "
            f"(`safesteer fit {fit} --out DIR`)."
        ) from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format {version}; this safesteer reads format {FORMAT_VERSION}. "
            "Refit it with this version."
        )
    if method is not None and manifest.get("method") != method:
        raise ArtifactError(
            f"{path} holds a {manifest.get('method')!r} artifact, not {method!r}; pass a "
            f"{method} artifact here (`safesteer fit {method} --out DIR`)."
        )
    tensor_path = path / TENSORS
    if not tensor_path.is_file():
        raise ArtifactError(f"{path} lacks {TENSORS}; the artifact is incomplete, refit it.")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(
            f"{tensor_path} is not a readable safetensors file: {exc}; the artifact is damaged, "
            "refit it."
        ) from exc
    missing = sorted(set(manifest.get("tensors") or {}) - set(tensors))
    if missing:
        raise ArtifactError(
            f"{tensor_path} lacks the tensors {missing} listed in {MANIFEST}; "
            "the artifact is incomplete."
        )
    return manifest, tensors


def check_model(
    manifest: dict[str, Any], lm: LoadedModel, directory: str | Path, fit: str = "scans"
) -> None:
    """Fail with a clear message when the artifact was fitted on another model (``fit``: the
    ``safesteer fit`` command the messages name).

    Config facts, the chat-template hash and exact hashes of sampled weight rows must match
    (:mod:`safesteer.core.fingerprint`), so a fine-tune of the same base is refused. Artifacts
    written before those hashes existed (fingerprint version 1: checksums with a 2 % tolerance,
    e.g. the calibrated artifacts shipped in ``safesteer/methods/scans/calibrated``) are still
    loaded when config, chat template and checksums match, with a warning: they cannot tell a
    fine-tune apart.
    """
    expected = manifest.get("model_fingerprint")
    if not isinstance(expected, dict):
        raise ArtifactError(
            f"{directory} has no model fingerprint in its manifest; refit it "
            f"(`safesteer fit {fit} --model ... --out DIR`)."
        )
    legacy = is_legacy(expected)
    problem = fingerprint_mismatch(
        expected, lm.fingerprint(), legacy_checksums(lm) if legacy else None
    )
    if problem is not None:
        raise ArtifactError(
            f"The artifact in {directory} was fitted on {expected.get('name')!r}, not on the "
            f"loaded model {lm.name!r}: {problem}. Fit a new artifact for this model "
            f"(`safesteer fit {fit} --model ... --out DIR`) or load the model it was made for."
        )
    if legacy:
        log.warning(
            "%s has a version-1 model fingerprint (weight checksums with a 2 %% tolerance), which "
            "cannot tell fine-tunes of one base model apart; it was accepted because the config, "
            "chat template and checksums match %r. Refit it with this safesteer to store the "
            "exact fingerprint.",
            directory,
            lm.name,
        )
