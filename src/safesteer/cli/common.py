"""Shared by every command module: the error console, option aliases, device names, library
quieting and the user-error handler."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safesteer.core.errors import ModelLoadError
from safesteer.datasets import DatasetError
from safesteer.methods.artifacts import ArtifactError

err = Console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="A name from `safesteer models list` (e.g. qwen2.5-coder-0.5b), an HF directory, a "
        ".gguf file or a hub id; default: the embedded SmolLM2-135M."
    ),
]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option(help="accelerate device map, e.g. auto (several GPUs).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for anchors, sampling and calibration.")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per batch.")]
AnchorSizeOpt = Annotated[int, typer.Option(help="Harmful and benign anchors each.")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Datasets folder.")]
TruncateOpt = Annotated[
    str,
    typer.Option(
        help="A prompt too long for the model's context with --max-new-tokens: none (refuse it "
        "with a message) or left (cut it from the left, keeping its last tokens)."
    ),
]
RecipeOpt = Annotated[
    str,
    typer.Option(
        help="SCANS recipe when no --artifact is given: auto (the calibrated artifact shipped "
        "for the model if any, else the paper's), paper, or calibrated."
    ),
]


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn expected errors into a one-line message and exit code 1 (no traceback)."""
    kinds: tuple[type[Exception], ...] = (
        ModelLoadError,
        ArtifactError,
        DatasetError,
        ValueError,
        *extra,
    )
    try:
        yield
    except kinds as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def timestamped_lines(started: float) -> Callable[[str], None]:
    """A ``progress(message)`` callback that prints each message as a line stamped with the
    seconds since ``started`` (a ``time.perf_counter()`` value)."""

    def line(message: str) -> None:
        err.print(f"[dim]{time.perf_counter() - started:6.0f}s[/dim] {message}")

    return line


@contextmanager
def progress_lines(title: str) -> Iterator[Callable[[str], None]]:
    """A ``progress(message)`` callback: a live status line in a terminal, timestamped lines
    otherwise (a log file keeps what a long fit was doing)."""
    if err.is_terminal:
        with err.status(title) as status:
            yield status.update
        return
    yield timestamped_lines(time.perf_counter())
