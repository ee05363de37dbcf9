"""``safesteer export gguf`` and ``safesteer import gguf``: llama.cpp control vectors
(registered in :mod:`safesteer.cli.main`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safesteer.cli.common import err

export_app = typer.Typer(
    help="Write safesteer artifacts in other tools' formats.", no_args_is_help=True
)
import_app = typer.Typer(help="Read other tools' steering vectors.", no_args_is_help=True)
out = Console()


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


@export_app.command("gguf")
def export_gguf(
    artifact: Annotated[Path, typer.Argument(help="A SCANS artifact folder.")],
    output: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    sign: Annotated[
        str,
        typer.Option(
            help="away (SCANS' branch for safe queries: fewer refusals) or toward (its branch "
            "for harmful ones: more refusals). llama.cpp applies one sign to every request."
        ),
    ],
    layers: Annotated[
        str | None, typer.Option(help="Layers to export, e.g. 5-10 (default: steering layers).")
    ] = None,
    model_hint: Annotated[
        str | None, typer.Option(help="llama.cpp architecture (default: from the artifact).")
    ] = None,
) -> None:
    """Write SCANS' steering vectors (alpha included) as a llama.cpp control vector."""
    from safesteer.methods.artifacts import ArtifactError
    from safesteer.methods.scans.artifact import ScansArtifact
    from safesteer.methods.scans.control_vectors import ControlVectorError, from_scans, write_gguf
    from safesteer.methods.scans.settings import parse_layers

    try:
        scans = ScansArtifact.load(artifact)
        chosen = None if layers is None else parse_layers(layers, int(scans.vectors.shape[0]))
        if sign not in ("away", "toward"):
            raise ControlVectorError(f"--sign {sign!r} must be away or toward")
        vector = from_scans(scans, sign, chosen, model_hint)  # type: ignore[arg-type]
        write_gguf(vector, output)
    except (ArtifactError, ControlVectorError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
    span = sorted(vector.directions)
    err.print(
        f"Wrote {output}: {len(span)} directions (layers {span[0]}..{span[-1]}), sign {sign}, "
        f"model hint {vector.model_hint}. llama.cpp: --control-vector {output} (or "
        f"--control-vector-scaled {output} STRENGTH) --control-vector-layer-range "
        f"{span[0]} {span[-1]}"
    )


@import_app.command("gguf")
def import_gguf(
    source: Annotated[Path, typer.Argument(help="A llama.cpp / repeng control vector (.gguf).")],
    artifact: Annotated[
        Path | None,
        typer.Option(help="A SCANS artifact whose steering direction the vector replaces."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--out", help="Where to write the new SCANS artifact.")
    ] = None,
    negate: Annotated[
        bool, typer.Option(help="The vector points away from refusal (flip it).")
    ] = False,
) -> None:
    """Show a control vector; with --artifact and --out, make it a SCANS steering direction."""
    from safesteer.methods.artifacts import ArtifactError
    from safesteer.methods.scans.artifact import ScansArtifact
    from safesteer.methods.scans.control_vectors import ControlVectorError, into_scans, read_gguf

    try:
        vector = read_gguf(source)
        if (artifact is None) != (output is None):
            raise ControlVectorError("give --artifact and --out together (or neither)")
        layers = sorted(vector.directions)
        norms = [float(vector.directions[layer].norm()) for layer in layers]
        out.print(
            f"{source}: model hint {vector.model_hint or '-'}, width {vector.hidden_size}, "
            f"{len(layers)} directions at layers {layers[0]}..{layers[-1]}, norms "
            f"{min(norms):.3g}..{max(norms):.3g}"
        )
        if artifact is not None and output is not None:
            scans = into_scans(vector, ScansArtifact.load(artifact), negate)
            scans.save(output)
            err.print(f"Wrote {output}: SCANS steering along {source.name} at layers {layers}")
    except (ArtifactError, ControlVectorError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
