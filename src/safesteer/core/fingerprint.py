"""Model fingerprints stored in artifacts: config facts, the chat-template hash and exact hashes of
sampled weight rows.

Version 2 (this one) hashes :data:`ROWS_PER_TENSOR` evenly spaced rows of *every* parameter
tensor, grouped as ``embed``, ``layer.<i>`` (one group per decoder layer) and ``other`` (final norm,
an untied LM head). A fine-tune of the same base — a LoRA merge, a full fine-tune, Vicuna against
Llama-2 — changes its rows, so it no longer matches. The rows are hashed twice, rounded to
bfloat16 and to float16, so that a float32 model matches its own bfloat16 or float16 copy (the
rounding of a rounded value is the same value); a bfloat16 copy against a float16 copy does not.

Version 1 (artifacts written before) stored sums of a few sampled weights, compared with a 2 %
tolerance, which fine-tunes pass. Those artifacts are still accepted, on config, chat template and
checksums, with a warning that asks for a refit (see :func:`fingerprint_mismatch`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from safesteer.core.layers import compact_ranges

if TYPE_CHECKING:  # type-only: the handle calls model_fingerprint lazily
    from safesteer.core.handle import LoadedModel

FINGERPRINT_VERSION = 2
ROWS_PER_TENSOR = 8
# Hashes are computed at these roundings; a match at either one is a match.
CANONICAL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_CHARS = 16  # 64 bits per group: enough to tell weights apart, short in the manifest


def weight_checksum(tensor: torch.Tensor) -> list[float]:
    """Version-1 checksum (sum and absolute sum of 4096 sampled values); kept to check old
    artifacts and SafeSwitch's base-head record."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].to(device="cpu", dtype=torch.float64)
    return [float(sample.sum()), float(sample.abs().sum())]


def sampled_rows(tensor: torch.Tensor, rows: int = ROWS_PER_TENSOR) -> torch.Tensor:
    """``rows`` evenly spaced rows (first and last included) of a tensor seen as 2-D, on the CPU.

    A 1-D tensor (norm weight, bias) is one row; an N-D tensor is viewed as ``[shape[0], -1]``.
    """
    data = tensor.detach()
    matrix = data.reshape(1, -1) if data.dim() < 2 else data.reshape(data.shape[0], -1)
    count = min(rows, matrix.shape[0])
    index = torch.linspace(0, matrix.shape[0] - 1, count).round().long().unique()
    return matrix[index.to(matrix.device)].to("cpu")


def _canonical_bytes(rows: torch.Tensor, dtype: torch.dtype) -> bytes:
    rounded = rows.to(torch.float32).to(dtype).contiguous()
    return rounded.view(torch.int16).numpy().tobytes()


def _groups(lm: LoadedModel) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """(group, [(parameter name, tensor)]) for the embedding, each decoder layer, the rest."""
    embedding = lm._embedding_weight()
    seen = {id(embedding)}
    yield "embed", [("weight", embedding)]
    for i, layer in enumerate(lm.layers):
        params: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in layer.named_parameters() if id(p) not in seen
        ]
        seen.update(id(p) for _, p in params)
        yield f"layer.{i}", params
    rest: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in lm.model.named_parameters() if id(p) not in seen
    ]
    yield "other", rest


def weight_hashes(lm: LoadedModel, rows: int = ROWS_PER_TENSOR) -> dict[str, dict[str, str]]:
    """``{canonical dtype: {group: hash}}`` over the sampled rows of every parameter tensor.

    Each hash covers the group's parameter names, shapes and rows rounded to the dtype. Weights
    not materialised (``meta``, e.g. offloaded by a device map) count by name and shape only.
    """
    digests: dict[str, dict[str, Any]] = {name: {} for name in CANONICAL_DTYPES}
    for group, params in _groups(lm):
        for canon in CANONICAL_DTYPES:
            digests[canon][group] = hashlib.sha256()
        for name, param in params:
            header = f"{name}:{list(param.shape)};".encode()
            sample = None if param.device.type == "meta" else sampled_rows(param, rows)
            for canon, dtype in CANONICAL_DTYPES.items():
                digests[canon][group].update(header)
                if sample is not None:
                    digests[canon][group].update(_canonical_bytes(sample, dtype))
    return {
        canon: {group: h.hexdigest()[:_HASH_CHARS] for group, h in groups.items()}
        for canon, groups in digests.items()
    }


def chat_template_sha256(lm: LoadedModel) -> str:
    """sha256 of the tokenizer's chat template (of the empty string when it has none)."""
    template = getattr(lm.tokenizer, "chat_template", None) or ""
    return hashlib.sha256(str(template).encode()).hexdigest()


def model_fingerprint(lm: LoadedModel) -> dict[str, Any]:
    """Config facts, the chat-template hash and exact hashes of sampled weight rows (version 2)."""
    config = lm.model.config
    facts = {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(lm.model).__name__,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "vocab_size": int(lm._embedding_weight().shape[0]),
    }
    return {
        "version": FINGERPRINT_VERSION,
        "name": lm.name,
        "config": facts,
        "config_sha256": hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest(),
        "chat_template_sha256": chat_template_sha256(lm),
        "weights": {
            "rows_per_tensor": ROWS_PER_TENSOR,
            "dtype": str(lm.dtype).removeprefix("torch."),
            "hashes": weight_hashes(lm),
        },
    }


def legacy_checksums(lm: LoadedModel) -> dict[str, list[float]]:
    """The version-1 checksums of ``lm`` (embedding, first and last layer's first parameter)."""
    first = next(lm.layers[0].parameters())
    last = next(lm.layers[-1].parameters())
    return {
        "embed": weight_checksum(lm._embedding_weight()),
        "first_layer": weight_checksum(first),
        "last_layer": weight_checksum(last),
    }


def is_legacy(fingerprint: dict[str, Any]) -> bool:
    """Whether a stored fingerprint is version 1 (tolerance checksums, no row hashes)."""
    return "weights" not in fingerprint and "checksums" in fingerprint


def _describe_groups(groups: list[str]) -> str:
    layers = sorted(int(g.split(".", 1)[1]) for g in groups if g.startswith("layer."))
    named = {"embed": "the embeddings", "other": "the final norm / LM head"}
    out = [named.get(g, g) for g in groups if not g.startswith("layer.")]
    if layers:
        out.append(f"decoder layer{'s' if len(layers) > 1 else ''} {compact_ranges(layers)}")
    return " and ".join(out)


def _weights_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    want = expected.get("hashes") or {}
    got = actual.get("hashes") or {}
    if expected.get("rows_per_tensor") != actual.get("rows_per_tensor"):
        return "the artifact's weight hashes sample other rows; refit it with this safesteer"
    if any(canon in got and want.get(canon) == got[canon] for canon in CANONICAL_DTYPES):
        return None
    canon = next((c for c in CANONICAL_DTYPES if c in want and c in got), None)
    if canon is None:
        return "the artifact stores no weight hashes this safesteer can compare"
    groups = list(dict.fromkeys([*want[canon], *got[canon]]))
    differing = [g for g in groups if want[canon].get(g) != got[canon].get(g)]
    fitted, loaded = expected.get("dtype"), actual.get("dtype")
    hint = (
        f"; if it is the same model in another dtype, load it in {fitted} or float32"
        if fitted != loaded
        else ""
    )
    return (
        f"the weights differ in {_describe_groups(differing)} (a fine-tune or another checkpoint "
        f"of the same architecture; artifact fitted in {fitted}, model loaded in {loaded}{hint})"
    )


def _legacy_mismatch(expected: dict[str, Any], checksums: dict[str, list[float]]) -> str | None:
    for key, (want_sum, want_abs) in expected.get("checksums", {}).items():
        got = checksums.get(key)
        if got is None:
            return f"checksum {key} missing"
        got_sum, got_abs = got
        scale = max(abs(want_abs), 1e-6)
        if abs(got_abs - want_abs) > 0.02 * scale or abs(got_sum - want_sum) > 0.02 * scale:
            return f"weights differ ({key} checksum {got} vs artifact {[want_sum, want_abs]})"
    return None


def fingerprint_mismatch(
    expected: dict[str, Any],
    actual: dict[str, Any],
    legacy: dict[str, list[float]] | None = None,
) -> str | None:
    """Explain how a stored fingerprint differs from a model's, or return ``None`` when they match.

    Compared exactly: config facts, the chat-template hash and (version 2) the weight-row hashes.
    A version-1 ``expected`` compares its checksums with the 2 % tolerance it was made for against
    ``legacy`` (:func:`legacy_checksums` of the model, or ``actual["checksums"]``); it cannot tell
    fine-tunes of one base apart, so callers should warn (:func:`is_legacy`).
    """
    if expected.get("config") != actual.get("config"):
        return (
            f"model config differs: artifact {expected.get('config')}, model {actual.get('config')}"
        )
    want_template = expected.get("chat_template_sha256")
    got_template = actual.get("chat_template_sha256")
    if want_template is not None and want_template != got_template:
        return (
            f"the chat template differs (sha256 {str(want_template)[:12]}… in the artifact, "
            f"{str(got_template)[:12]}… for the model)"
        )
    if "weights" in expected:
        if "weights" not in actual:
            return "the model's fingerprint has no weight hashes to compare"
        return _weights_mismatch(expected["weights"], actual["weights"])
    if "checksums" in expected:
        checksums = legacy if legacy is not None else actual.get("checksums")
        if checksums is None:
            return "the artifact's version-1 checksums need the model's legacy checksums"
        return _legacy_mismatch(expected, checksums)
    return "the artifact's fingerprint holds neither weight hashes nor checksums; refit it"
