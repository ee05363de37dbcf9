"""The artifacts a server runs: each ``--artifact`` folder's method read from its manifest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import MANIFEST, ArtifactError
from safesteer.methods.combined_gate import METHOD as GATE_METHOD
from safesteer.methods.combined_gate import CombinedGate
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.serving.protocol import METHODS, Method


def artifact_method(directory: Path) -> str:
    """The ``method`` recorded in an artifact folder's manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an artifact folder (no {MANIFEST})")
    try:
        method = json.loads(path.read_text()).get("method")
    except (ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); refit the artifact") from None
    if method not in ("scans", "safeswitch", GATE_METHOD):
        raise ArtifactError(
            f"{directory} holds a {method!r} artifact; serve takes scans, safeswitch or "
            f"{GATE_METHOD}"
        )
    return str(method)


def load_methods(
    lm: LoadedModel, directories: Sequence[Path]
) -> tuple[ScansArtifact | None, SafeSwitchArtifact | None, CombinedGate | None]:
    """At most one SCANS artifact, one SafeSwitch artifact and one combined gate (which needs
    both), each checked against ``lm``."""
    scans: ScansArtifact | None = None
    safeswitch: SafeSwitchArtifact | None = None
    gate: CombinedGate | None = None
    for directory in directories:
        method = artifact_method(directory)
        if method == "scans":
            if scans is not None:
                raise ArtifactError("give at most one SCANS artifact")
            scans = ScansArtifact.load(directory, lm)
        elif method == GATE_METHOD:
            if gate is not None:
                raise ArtifactError("give at most one combined gate")
            gate = CombinedGate.load(directory, lm)
        else:
            if safeswitch is not None:
                raise ArtifactError("give at most one SafeSwitch artifact")
            safeswitch = SafeSwitchArtifact.load(directory, lm)
    if gate is not None and "scans+safeswitch" not in available_methods(scans, safeswitch):
        needs = artifact_hint("scans+safeswitch")
        raise ArtifactError(f"a combined gate works inside scans+safeswitch, which needs {needs}")
    return scans, safeswitch, gate


def available_methods(
    scans: ScansArtifact | None, safeswitch: SafeSwitchArtifact | None
) -> list[Method]:
    """The methods these artifacts can run: ``none`` always, each loaded method, and
    ``scans+safeswitch`` when both are loaded and SafeSwitch is two-stage (its gate)."""
    found: list[Method] = ["none"]
    if scans is not None:
        found.append("scans")
    if safeswitch is not None:
        found.append("safeswitch")
        if scans is not None and safeswitch.settings.mode == "two-stage":
            found.append("scans+safeswitch")
    return found


def artifact_hint(method: str) -> str:
    """What a server must load to run ``method``, and how to make it (for error messages)."""
    if method == "scans+safeswitch":
        return (
            "a SCANS artifact and a two-stage SafeSwitch artifact: pass --artifact twice (fit "
            "them with `safesteer fit scans` and `safesteer fit safeswitch --mode two-stage`)"
        )
    return f"its artifact: pass --artifact DIR (fit one with `safesteer fit {method} --out DIR`)"


def default_method(
    requested: str | None, scans: ScansArtifact | None, safeswitch: SafeSwitchArtifact | None
) -> Method:
    """``--method``, checked against what is loaded; else the first loaded of scans, safeswitch."""
    loaded = available_methods(scans, safeswitch)
    if requested is None:
        return loaded[1] if len(loaded) > 1 else "none"
    if requested not in METHODS:
        raise ValueError(f"unknown method {requested!r}; use {', '.join(METHODS)}")
    if requested not in loaded:
        raise ValueError(f"--method {requested} needs {artifact_hint(requested)}")
    return next(m for m in loaded if m == requested)
