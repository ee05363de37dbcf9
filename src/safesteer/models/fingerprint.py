"""Model fingerprints: config facts and sampled weight checksums stored in artifacts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from safesteer.models.handle import LoadedModel


def weight_checksum(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].to(device="cpu", dtype=torch.float64)
    return [float(sample.sum()), float(sample.abs().sum())]


def model_fingerprint(lm: LoadedModel) -> dict[str, Any]:
    """Config facts plus checksums of a few sampled weights, compared with a tolerance on load."""
    config = lm.model.config
    facts = {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(lm.model).__name__,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "vocab_size": int(lm._embedding_weight().shape[0]),
    }
    first = next(lm.layers[0].parameters())
    last = next(lm.layers[-1].parameters())
    checks = {
        "embed": weight_checksum(lm._embedding_weight()),
        "first_layer": weight_checksum(first),
        "last_layer": weight_checksum(last),
    }
    template = getattr(lm.tokenizer, "chat_template", None) or ""
    return {
        "name": lm.name,
        "config": facts,
        "config_sha256": hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest(),
        "checksums": checks,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Explain how two fingerprints differ, or return ``None`` when they match.

    Checksums compare with a 2 % relative tolerance so a bf16 copy of the same model matches.
    """
    if expected.get("config") != actual.get("config"):
        return (
            f"model config differs: artifact {expected.get('config')}, model {actual.get('config')}"
        )
    for key, (want_sum, want_abs) in expected.get("checksums", {}).items():
        got = actual.get("checksums", {}).get(key)
        if got is None:
            return f"checksum {key} missing"
        got_sum, got_abs = got
        scale = max(abs(want_abs), 1e-6)
        if abs(got_abs - want_abs) > 0.02 * scale or abs(got_sum - want_sum) > 0.02 * scale:
            return f"weights differ ({key} checksum {got} vs artifact {[want_sum, want_abs]})"
    return None
