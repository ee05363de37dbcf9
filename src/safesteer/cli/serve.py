"""``safesteer serve``: the OpenAI-compatible server (registered in :mod:`safesteer.cli.main`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from safesteer.cli.common import DtypeOpt, err

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, api_key: str | None) -> None:
    """Without an API key only a loopback address may be bound."""
    if api_key is None and host not in LOOPBACK:
        raise ValueError(
            f"binding to {host} needs an API key: pass --api-key KEY (or set SAFESTEER_API_KEY); "
            "without one the server listens on 127.0.0.1 only"
        )


def serve_command(
    model: Annotated[
        str | None,
        typer.Option(
            help="A name from `safesteer models list`, an HF directory, a .gguf file or a hub "
            "id; default: the embedded SmolLM2-135M."
        ),
    ] = None,
    artifact: Annotated[
        list[Path] | None,
        typer.Option(
            help="A SCANS or SafeSwitch artifact folder (repeat for both), or a combined gate "
            "(`safesteer fit combined-gate`) for scans+safeswitch."
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="Default method for requests without safesteer.method: none, scans, "
            "safeswitch or scans+safeswitch (needs both artifacts; default: the first "
            "artifact's, else none)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (not loopback: needs a key).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SAFESTEER_API_KEY", help="Require Authorization: Bearer KEY on every request."
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: the model's name).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most rows in one batch.")] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="Longest wait for more rows after a batch's first row (ms).")
    ] = 10.0,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask.")] = (
        512
    ),
    default_max_tokens: Annotated[
        int, typer.Option(help="max_tokens of a request that gives none.")
    ] = 128,
    repetition_penalty: Annotated[float, typer.Option(help="1.0 = off.")] = 1.0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    dtype: DtypeOpt = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
    device_map: Annotated[str | None, typer.Option(help="accelerate device map.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve the model over an OpenAI-compatible API, applying a safety method per request."""
    from safesteer.core.errors import ModelLoadError
    from safesteer.methods.artifacts import ArtifactError

    try:
        _serve(
            model, artifact or [], method, host, port, api_key, served_model_name, max_batch,
            batch_wait_ms, max_tokens_limit, default_max_tokens, repetition_penalty, threads,
            dtype, device, device_map, log_level,
        )  # fmt: skip
    except (ValueError, ArtifactError, ModelLoadError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def _serve(
    model: str | None,
    artifacts: list[Path],
    method: str | None,
    host: str,
    port: int,
    api_key: str | None,
    served_model_name: str | None,
    max_batch: int,
    batch_wait_ms: float,
    max_tokens_limit: int,
    default_max_tokens: int,
    repetition_penalty: float,
    threads: int | None,
    dtype: str,
    device: str,
    device_map: str | None,
    log_level: str,
) -> None:
    api_key = api_key or None
    check_host(host, api_key)
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} must lie in 1..65535")
    engine_settings_args = (max_batch, batch_wait_ms / 1000, repetition_penalty)
    import torch
    import uvicorn

    from safesteer.evaluation.run_setup import context_length
    from safesteer.models import load_model
    from safesteer.serving import Engine, EngineSettings, ServeSettings, create_app, load_methods
    from safesteer.serving.loading import default_method

    engine_settings = EngineSettings(*engine_settings_args)
    if threads is not None:
        if threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(threads)
    lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
    scans, safeswitch, gate = load_methods(lm, artifacts)
    chosen = default_method(method, scans, safeswitch)
    settings = ServeSettings(
        model_id=served_model_name or lm.name,
        default_method=chosen,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(default_max_tokens, max_tokens_limit),
        context=context_length(lm),
    )
    engine = Engine(
        lm, scans=scans, safeswitch=safeswitch, combined_gate=gate, settings=engine_settings
    )
    app = create_app(engine, settings)
    auth = "API key required" if api_key else "no API key (loopback only)"
    err.print(
        f"serving {settings.model_id!r} on http://{host}:{port}/v1 — methods "
        f"{', '.join(engine.methods())}, default {chosen}; {auth}; pid {os.getpid()}"
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None
    )
    uvicorn.Server(config).run()
