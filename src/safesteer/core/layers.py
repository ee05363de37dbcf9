"""Decoder-layer discovery without per-architecture code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from safesteer.core.errors import ModelLoadError


def _num_layers_from_config(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _num_layers_from_config(text_config) if text_config is not None else None


def find_decoder_layers(
    model: nn.Module, layers_path: str | None = None
) -> tuple[str, list[nn.Module]]:
    """Find the decoder layers: the ``ModuleList`` of identical blocks, one per hidden layer.

    Works for Llama, Qwen2, Mistral, Gemma2, Phi3, GPT-2, GPT-NeoX and most other decoder-only
    models without per-model code. ``layers_path`` (a dotted attribute path) overrides discovery.
    """
    if layers_path is not None:
        try:
            module = model.get_submodule(layers_path)
        except AttributeError as exc:
            raise ModelLoadError(
                f"layers path {layers_path!r} does not exist in {type(model).__name__}: {exc}"
            ) from exc
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise ModelLoadError(f"{layers_path!r} in {type(model).__name__} is not a ModuleList.")
        return layers_path, list(module)
    expected = _num_layers_from_config(getattr(model, "config", None))
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                candidates.append((name, module))
    if expected is not None:
        exact = [c for c in candidates if len(c[1]) == expected]
        if exact:
            candidates = exact
    if not candidates:
        raise ModelLoadError(
            f"Could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            "identical blocks. Pass --layers-path (e.g. model.layers or transformer.h)."
        )
    # The shallowest list wins: nested per-layer lists (e.g. experts) sit deeper.
    candidates.sort(key=lambda c: (c[0].count("."), -len(c[1])))
    name, module = candidates[0]
    return name, list(module)


def compact_ranges(indices: Sequence[int], dash: str = "-") -> str:
    """Increasing layer indices as ranges: ``[10, 11, 12, 15]`` -> ``10-12, 15``."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}{dash}{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)
