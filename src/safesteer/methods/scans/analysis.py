"""Analyses of fitted refusal directions: vocabulary projection (logit lens) and layer choice.

SCANS picks its "safety-critical" steering layers by projecting each layer's refusal vector onto the
vocabulary: in those layers the top tokens read like refusals (``_cannot``, ``_rejected``...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safesteer.core.handle import LoadedModel
from safesteer.methods.scans.artifact import ScansArtifact

REFUSAL_WORDS = (
    "cannot",
    "can't",
    "sorry",
    "unable",
    "refuse",
    "rejected",
    "impossible",
    "not",
    "apolog",
    "illegal",
    "unethical",
    "harmful",
    "inappropriate",
    "dangerous",
    "no",
)


@dataclass(frozen=True)
class LayerTokens:
    """Top vocabulary tokens of one layer's refusal vector and their refusal-word share."""

    layer: int
    tokens: list[str]
    refusal_share: float


def _final_norm(lm: LoadedModel) -> torch.nn.Module | None:
    base = getattr(lm.model, lm.model.base_model_prefix, None)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


@torch.inference_mode()
def vocabulary_projection(
    lm: LoadedModel, artifact: ScansArtifact, top_k: int = 10, apply_norm: bool = True
) -> list[LayerTokens]:
    """Project each layer's unit refusal vector through the (final norm and) LM head."""
    head = lm.model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm.model).__name__} has no output embeddings to project onto")
    weight = head.weight.detach().to("cpu", torch.float32)
    norm = _final_norm(lm) if apply_norm else None
    rows: list[LayerTokens] = []
    for layer in range(artifact.vectors.shape[0]):
        vector = artifact.vectors[layer].to(torch.float32)
        if norm is not None:
            param = next(norm.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            dtype = param.dtype if param is not None else torch.float32
            vector = norm(vector.to(device, dtype)[None, None, :])[0, 0].to("cpu", torch.float32)
        logits = weight @ vector
        top = torch.topk(logits, top_k).indices.tolist()
        tokens = [str(lm.tokenizer.convert_ids_to_tokens(i)) for i in top]
        share = sum(_is_refusal_token(t) for t in tokens) / max(1, len(tokens))
        rows.append(LayerTokens(layer, tokens, share))
    return rows


def _is_refusal_token(token: str) -> bool:
    text = token.lower().lstrip("▁Ġ_ ")
    return len(text) > 1 and any(text.startswith(w) for w in REFUSAL_WORDS)


def suggest_layers(rows: Sequence[LayerTokens], width: int) -> tuple[int, ...] | None:
    """The ``width`` consecutive layers whose projections hold the most refusal-like tokens.

    ``None`` when no layer projects onto refusal-like tokens (keep the depth-scaled default).
    """
    if not rows:
        raise ValueError("no layers to choose from")
    width = max(1, min(width, len(rows)))
    shares = [r.refusal_share for r in rows]
    if not any(shares):
        return None
    best = max(range(len(rows) - width + 1), key=lambda s: (sum(shares[s : s + width]), -s))
    return tuple(rows[i].layer for i in range(best, best + width))
