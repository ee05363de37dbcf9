"""`safesteer datasets`: list, verify and download the evaluation and anchor datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from safesteer.cli.common import err
from safesteer.datasets import (
    DATA_DIR_ENV,
    DatasetError,
    dataset_status,
    download,
    get_spec,
    verify_report,
)

datasets_app = typer.Typer(
    help=(
        "List, verify and download the evaluation and anchor datasets. Sets with a permissive "
        f"licence are bundled; the rest are read from --data-dir (or ${DATA_DIR_ENV})."
    ),
    no_args_is_help=True,
)

_out = Console()

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help=f"Folder laid out like shared/data (default: ${DATA_DIR_ENV}).",
        file_okay=False,
    ),
]


def _fail(exc: DatasetError) -> typer.Exit:
    err.print(f"error: {exc}", markup=False, highlight=False)
    return typer.Exit(code=1)


@datasets_app.command("list")
def list_command(data_dir: DataDirOption = None) -> None:
    """Show every registered set: rows, licence, bundled, available and where it is read from."""
    table = Table(title="safesteer datasets")
    for column in ("name", "rows", "licence", "bundled", "available", "where"):
        table.add_column(column, overflow="fold")
    for entry in dataset_status(data_dir):
        table.add_row(
            entry["name"],
            str(entry["rows"]),
            entry["licence"],
            "yes" if entry["bundled"] else "no",
            "[green]yes[/green]" if entry["available"] else "[red]no[/red]",
            entry["where"],
        )
    _out.print(table)


@datasets_app.command("verify")
def verify_command(
    name: Annotated[str, typer.Argument(help="Dataset name (see `safesteer datasets list`).")],
    data_dir: DataDirOption = None,
) -> None:
    """Check a set's files against their recorded sha256; exit 1 on any mismatch."""
    try:
        report = verify_report(name, data_dir)
    except DatasetError as exc:
        raise _fail(exc) from exc
    for entry in report:
        status = "OK" if entry["ok"] else f"MISMATCH (got {entry['actual']})"
        _out.print(f"{status}  {entry['path']}", markup=False, highlight=False)
    if not all(entry["ok"] for entry in report):
        err.print(
            f"error: {get_spec(name).name}: some files differ from the upstream release; "
            "replace them with the original files (or re-run `safesteer datasets download`).",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(code=1)


@datasets_app.command("download")
def download_command(
    name: Annotated[str, typer.Argument(help="Dataset name (see `safesteer datasets list`).")],
    dest: Annotated[
        Path,
        typer.Option("--dest", help="Data folder to write into (use it as --data-dir later)."),
    ],
) -> None:
    """Fetch a set from its upstream URL(s) into DEST, checking sha256 before writing."""
    try:
        paths = download(name, dest)
    except DatasetError as exc:
        raise _fail(exc) from exc
    spec = get_spec(name)
    _out.print(f"{spec.name}: licence {spec.licence}", markup=False, highlight=False)
    for path in paths:
        _out.print(f"saved {path}", markup=False, highlight=False)
