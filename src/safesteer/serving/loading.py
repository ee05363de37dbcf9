"""The artifacts a server runs: each ``--artifact`` folder's method read from its manifest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import MANIFEST, ArtifactError
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.serving.protocol import Method


def artifact_method(directory: Path) -> str:
    """The ``method`` recorded in an artifact folder's manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an artifact folder (no {MANIFEST})")
    try:
        method = json.loads(path.read_text()).get("method")
    except (ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); refit the artifact") from None
    if method not in ("scans", "safeswitch"):
        raise ArtifactError(
            f"{directory} holds a {method!r} artifact; serve takes scans or safeswitch"
        )
    return str(method)


def load_methods(
    lm: LoadedModel, directories: Sequence[Path]
) -> tuple[ScansArtifact | None, SafeSwitchArtifact | None]:
    """At most one SCANS and one SafeSwitch artifact, each checked against ``lm``."""
    scans: ScansArtifact | None = None
    safeswitch: SafeSwitchArtifact | None = None
    for directory in directories:
        method = artifact_method(directory)
        if method == "scans":
            if scans is not None:
                raise ArtifactError("give at most one SCANS artifact")
            scans = ScansArtifact.load(directory, lm)
        else:
            if safeswitch is not None:
                raise ArtifactError("give at most one SafeSwitch artifact")
            safeswitch = SafeSwitchArtifact.load(directory, lm)
    return scans, safeswitch


def default_method(
    requested: str | None, scans: ScansArtifact | None, safeswitch: SafeSwitchArtifact | None
) -> Method:
    """``--method``, checked against what is loaded; else the first loaded of scans, safeswitch."""
    loaded: list[Method] = ["none"]
    if scans is not None:
        loaded.append("scans")
    if safeswitch is not None:
        loaded.append("safeswitch")
    if requested is None:
        return loaded[1] if len(loaded) > 1 else "none"
    if requested not in ("none", "scans", "safeswitch"):
        raise ValueError(f"unknown method {requested!r}; use none, scans or safeswitch")
    if requested not in loaded:
        raise ValueError(
            f"--method {requested} needs its artifact: pass --artifact DIR (fit one with "
            f"`safesteer fit {requested} --out DIR`)"
        )
    return requested
