"""Keyed caches for the expensive stages of ``safesteer calibrate``.

Each cache file holds a key (a fingerprint of everything its contents depend on: the model, the
steering, the settings) and results per prompt text. A rerun with the same key reads what is
there and computes only the prompts that are missing, so an interrupted calibration continues
and a validation set that grew computes only its new prompts. A different key (another model,
another steering, other options) starts the file afresh instead of reusing stale results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safesteer.core.handle import LoadedModel


def save_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def fingerprint(*parts: Any) -> str:
    """sha256 over tensors (their float32 values and shape) and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            values = part.detach().to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(values.shape)).encode())
            digest.update(values.numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 of the texts joined by newlines (the artifact's record of its validation set)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def model_key(lm: LoadedModel) -> list[Any]:
    """What identifies a loaded model for caching."""
    return [lm.name, lm.num_layers, lm.hidden_size, str(lm.dtype)]


def cached_rows(
    path: Path,
    key: str,
    texts: Sequence[str],
    compute: Callable[[list[str]], torch.Tensor],
) -> torch.Tensor:
    """One tensor row per text (``[len(texts), ...]``); rows cached under ``key`` are read, the
    others computed by ``compute(missing_texts)`` and added to the file."""
    if not texts:
        return torch.empty(0)
    names: list[str] = []
    stored: torch.Tensor | None = None
    if path.exists():
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") == key:
                names = list(json.loads(meta["texts"]))
                stored = handle.get_tensor("rows")
    index = {name: i for i, name in enumerate(names)}
    missing = [t for t in dict.fromkeys(texts) if t not in index]
    if missing:
        new = compute(missing)
        stored = new if stored is None else torch.cat([stored, new.to(stored.dtype)])
        for text in missing:
            index[text] = len(names)
            names.append(text)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(
            {"rows": stored.contiguous()},
            str(tmp),
            metadata={"key": key, "texts": json.dumps(names)},
        )
        tmp.replace(path)
    assert stored is not None  # texts is not empty: read or computed above
    return stored[[index[t] for t in texts]]


def cached_texts(
    path: Path,
    key: str,
    texts: Sequence[str],
    compute: Callable[[list[str]], list[str]],
) -> list[str]:
    """One string per text (e.g. a reply); entries cached under ``key`` are read, the others
    computed by ``compute(missing_texts)`` and added to the JSON file."""
    done: dict[str, str] = {}
    if path.exists():
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            done = dict(cached["responses"])
    missing = [t for t in dict.fromkeys(texts) if t not in done]
    if missing:
        done.update(zip(missing, compute(missing), strict=True))
        save_json(path, {"key": key, "responses": done})
    return [done[t] for t in texts]


def cached_json(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """A JSON value cached under ``key`` (computed afresh when the key differs)."""
    if path.exists():
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["value"]
    value = compute()
    save_json(path, {"key": key, "value": value})
    return value
