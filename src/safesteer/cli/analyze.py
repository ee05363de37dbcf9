"""``safesteer analyze``: logit lens of an artifact's refusal vectors and a layer suggestion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safesteer.cli.common import DeviceOpt, DtypeOpt, ModelOpt, resolve_device, user_errors


def analyze(
    artifact: Annotated[Path, typer.Option(help="A fitted SCANS artifact.")],
    model: ModelOpt = None,
    top_k: Annotated[int, typer.Option(help="Tokens shown per layer.")] = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Logit lens of the refusal vectors: top tokens per layer and a suggested steering range."""
    from rich.table import Table

    from safesteer.methods.scans.analysis import suggest_layers, vocabulary_projection
    from safesteer.methods.scans.artifact import ScansArtifact
    from safesteer.models import load_model

    with user_errors():
        lm = load_model(model, dtype=dtype, device=resolve_device(device))
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
