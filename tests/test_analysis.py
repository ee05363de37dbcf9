"""Vocabulary projection of refusal vectors and the layer-suggestion helper."""

from __future__ import annotations

import torch

from safesteer.core.handle import LoadedModel
from safesteer.methods.scans.analysis import LayerTokens, suggest_layers, vocabulary_projection
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.settings import default_settings


def _artifact(lm: LoadedModel, vectors: torch.Tensor) -> ScansArtifact:
    n = lm.num_layers
    return ScansArtifact(
        vectors,
        torch.zeros_like(vectors),
        torch.ones(n),
        default_settings(n),
        {},
        lm.fingerprint(),
    )


def test_projection_finds_planted_token(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["llama"]
    head = lm.model.get_output_embeddings().weight.detach()
    target = int(lm.tokenizer.convert_tokens_to_ids("Ġcannot") or 0)
    if target == lm.tokenizer.unk_token_id or target == 0:
        target = 100
    vectors = torch.randn(lm.num_layers, lm.hidden_size) * 1e-3
    vectors[1] = head[target] / head[target].norm()
    rows = vocabulary_projection(lm, _artifact(lm, vectors), top_k=3, apply_norm=False)
    assert len(rows) == lm.num_layers
    assert lm.tokenizer.convert_ids_to_tokens(target) in rows[1].tokens


def test_suggest_layers_picks_densest_window() -> None:
    shares = [0.0, 0.0, 0.5, 0.8, 0.6, 0.0, 0.1]
    rows = [LayerTokens(i, [], s) for i, s in enumerate(shares)]
    assert suggest_layers(rows, 3) == (2, 3, 4)
    assert suggest_layers([LayerTokens(i, [], 0.0) for i in range(5)], 2) is None
