"""SCANS generation: the fused path (one prefill for decision and generation, cache rolled back
before the steered last token) and the two-pass reference path."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from safesteer.core.activations import forward, recording
from safesteer.core.generation import (
    Generated,
    GenerationConfig,
    StepCallback,
    decode_loop,
    generate_ids,
    length_sorted_batches,
    new_cache,
    rollback,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, ChatLayout, left_pad
from safesteer.core.steering import steering
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import (
    Coefficients,
    ScansDecision,
    ScansResult,
    _decisions,
    classify,
    policy_coefficients,
)


@torch.inference_mode()
def _fused_batch(
    lm: LoadedModel,
    artifact: ScansArtifact,
    encoded: list[list[int]],
    reply_ids: list[int],
    config: GenerationConfig,
    coefficients: Coefficients,
    direction: torch.Tensor | None,
    on_step: StepCallback | None = None,
) -> tuple[list[ScansDecision], Generated]:
    """Decision and steered decoding sharing one prefill.

    1. prefill every prompt followed by the reply prefix (unsteered) in one forward, keeping the KV
       cache, and read the classifier's states at the last prompt token and the reply's end;
    2. roll the cache back by ``len(reply_prefix) + 1`` tokens (to just before the last prompt
       token) and rerun that token steered, then decode with steering on.
    Extra work over plain generation: ``len(reply_prefix) + 1`` tokens per row, one extra forward.
    """
    pad_id = int(lm.tokenizer.pad_token_id)
    reply_len = len(reply_ids)
    batch = left_pad([ids + reply_ids for ids in encoded], pad_id, lm.device)
    cache = new_cache(lm, rollback=True)
    with recording(lm, artifact.settings.recorded_layers, [-1 - reply_len, -1]) as rec:
        forward(lm, batch, past_key_values=cache, use_cache=True)
    decisions = _decisions(artifact, rec.stacked())
    rollback(cache, reply_len + 1)
    last_column = batch.width - reply_len - 1  # every row's last prompt token (left padding)
    prompt = Batch(
        batch.input_ids[:, : last_column + 1],
        batch.attention_mask[:, : last_column + 1],
        batch.position_ids[:, : last_column + 1],
    )
    step = Batch(prompt.input_ids[:, -1:], prompt.attention_mask, prompt.position_ids[:, -1:])
    vectors, caps = artifact.steering_vectors(direction), artifact.steering_caps(direction)
    with steering(lm, vectors, coefficients(decisions), last_column, caps):
        out = forward(lm, step, past_key_values=cache, use_cache=True)
        generated = decode_loop(lm, prompt, out.logits[:, -1, :].float(), cache, config, on_step)
    return decisions, generated


def check_steerable(artifact: ScansArtifact, direction: torch.Tensor | None = None) -> None:
    """Refuse settings or tensors that would turn every response into nothing (NaN or inf)."""
    settings = artifact.settings
    if not math.isfinite(settings.alpha):
        raise ValueError(f"the steering strength alpha must be finite (got {settings.alpha})")
    if settings.threshold is not None and not math.isfinite(settings.threshold):
        raise ValueError(f"the threshold T must be finite (got {settings.threshold})")
    layers = list(settings.steer_layers)
    tensors = {"refusal vectors": artifact.vectors[layers], "reference": artifact.reference}
    tensors["layer norms"] = artifact.layer_norms[layers]
    if artifact.caps is not None and settings.away_mode == "clamp":
        tensors["projection caps"] = artifact.caps[layers]
    if direction is not None:
        tensors["direction"] = direction[layers]
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(
            f"the SCANS artifact holds non-finite values in its {', '.join(bad)}; refit it"
        )


def scans_generate(
    lm: LoadedModel,
    artifact: ScansArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    coefficients: Coefficients | None = None,
    direction: torch.Tensor | None = None,
    on_batch: Callable[[list[int], list[ScansResult]], None] | None = None,
) -> list[ScansResult]:
    """Classify and generate for ``queries`` in length-sorted batches (one prefill per batch).

    ``coefficients`` maps decisions to per-row steering signs (default: the artifact's policy).
    ``on_batch(indices, results)`` is called after every batch (e.g. to write results as they come).
    """
    check_steerable(artifact, direction)
    if coefficients is None:
        coefficients = policy_coefficients(artifact)
    if not config.use_cache:
        raise ValueError("the fused SCANS path needs the KV cache; use scans_generate_two_pass")
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    reply_ids = layout.reply_ids(artifact.settings.reply_prefix)
    encoded = [layout.prompt_ids(q) for q in queries]
    results: list[ScansResult | None] = [None] * len(queries)
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        decisions, generated = _fused_batch(
            lm, artifact, [encoded[i] for i in indices], reply_ids, config, coefficients, direction
        )
        batch_results = _results(lm, [queries[i] for i in indices], decisions, generated)
        for i, r in zip(indices, batch_results, strict=True):
            results[i] = r
        if on_batch is not None:
            on_batch(indices, batch_results)
    return [r for r in results if r is not None]


def _results(
    lm: LoadedModel, queries: Sequence[str], decisions: list[ScansDecision], generated: Generated
) -> list[ScansResult]:
    texts = [
        str(lm.tokenizer.decode(t, skip_special_tokens=True)).strip() for t in generated.token_ids
    ]
    return [
        ScansResult(q, d, text, ids, stop)
        for q, d, text, ids, stop in zip(
            queries, decisions, texts, generated.token_ids, generated.stopped, strict=True
        )
    ]


def scans_generate_two_pass(
    lm: LoadedModel,
    artifact: ScansArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    coefficients: Coefficients | None = None,
) -> list[ScansResult]:
    """The straightforward computation: a full classification forward, then a steered generation
    with its own prefill. Slower; kept as the reference the fused path is tested against."""
    if coefficients is None:
        coefficients = policy_coefficients(artifact)
    decisions = classify(lm, artifact, queries, batch_size)
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    encoded = [layout.prompt_ids(q) for q in queries]
    results: list[ScansResult | None] = [None] * len(queries)
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in indices)
        batch_decisions = [decisions[i] for i in indices]
        with steering(
            lm,
            artifact.steering_vectors(),
            coefficients(batch_decisions),
            width - 1,
            artifact.steering_caps(),
        ):
            generated = generate_ids(lm, [encoded[i] for i in indices], config)
        for i, r in zip(
            indices,
            _results(lm, [queries[i] for i in indices], batch_decisions, generated),
            strict=True,
        ):
            results[i] = r
    return [r for r in results if r is not None]
