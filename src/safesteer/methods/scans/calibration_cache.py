"""Keyed caches for the expensive stages of ``safesteer calibrate``.

Each cache file holds a key (a fingerprint of everything its contents depend on: the model, the
steering, the settings) and results per prompt text. A rerun with the same key reads what is
there and computes only the prompts that are missing, so an interrupted calibration continues
and a validation set that grew computes only its new prompts. A different key (another model,
another steering, other options) starts the file afresh instead of reusing stale results.

With ``chunk`` set, missing prompts are computed and saved ``chunk`` at a time, so a stage that
is stopped half-way keeps what it finished (a larger model's stage can take an hour).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
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


def _stored(path: Path, key: str) -> dict[str, Any] | None:
    """The JSON cache at ``path`` when it was written under ``key``, else None."""
    if path.exists():
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached
    return None


Announce = Callable[[int], None]


def _chunks(
    missing: list[str], chunk: int | None, announce: Announce | None
) -> Iterator[list[str]]:
    """``missing`` in pieces of ``chunk`` (all at once when None); ``announce(len(missing))``
    first, when there is anything to compute."""
    if not missing:
        return
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if announce is not None:
        announce(len(missing))
    size = chunk or len(missing)
    for start in range(0, len(missing), size):
        yield missing[start : start + size]


def cached_rows(
    path: Path,
    key: str,
    texts: Sequence[str],
    compute: Callable[[list[str]], torch.Tensor],
    chunk: int | None = None,
    announce: Announce | None = None,
) -> torch.Tensor:
    """One tensor row per text (``[len(texts), ...]``); rows cached under ``key`` are read, the
    others computed by ``compute(missing_texts)`` and added to the file (after every ``chunk``
    texts when set; ``announce`` hears how many are missing)."""
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
    for piece in _chunks(missing, chunk, announce):
        new = compute(piece)
        stored = new if stored is None else torch.cat([stored, new.to(stored.dtype)])
        for text in piece:
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
    chunk: int | None = None,
    announce: Announce | None = None,
) -> list[str]:
    """One string per text (e.g. a reply); entries cached under ``key`` are read, the others
    computed by ``compute(missing_texts)`` and added to the JSON file (after every ``chunk``
    texts when set; ``announce`` hears how many are missing)."""
    cached = _stored(path, key)
    done: dict[str, str] = {} if cached is None else dict(cached["responses"])
    missing = [t for t in dict.fromkeys(texts) if t not in done]
    for piece in _chunks(missing, chunk, announce):
        done.update(zip(piece, compute(piece), strict=True))
        save_json(path, {"key": key, "responses": done})
    return [done[t] for t in texts]


class EntryCache:
    """Named JSON entries under one key, saved after every new entry (a stage made of many
    measurements keeps each one; a different key starts afresh)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        cached = _stored(path, key)
        self.entries: dict[str, Any] = {} if cached is None else dict(cached["entries"])

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The entry ``name``, computed by ``compute()`` and saved when it is not there."""
        if name not in self.entries:
            self.entries[name] = compute()
            save_json(self.path, {"key": self.key, "entries": self.entries})
        return self.entries[name]


def cached_json(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """A JSON value cached under ``key`` (computed afresh when the key differs)."""
    cached = _stored(path, key)
    if cached is not None:
        return cached["value"]
    value = compute()
    save_json(path, {"key": key, "value": value})
    return value
