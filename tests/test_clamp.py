"""Clamped away-steering: the projection on the direction is capped, states below the cap are left
alone, positive rows are still shifted, token scope and batched == single hold, and the setting
travels with the artifact (tiny in-process models, no downloads)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import BENIGN, HARMFUL
from safesteer.core.activations import forward, hidden_of
from safesteer.core.generation import GenerationConfig, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout, left_pad
from safesteer.core.steering import steering
from safesteer.datasets.validation import fluency_text
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.control_vectors import ControlVectorError, from_scans
from safesteer.methods.scans.directions import (
    choose_steering,
    projection_cap,
    reply_logprobs,
    sweep_pairs,
)
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.generate import scans_generate, scans_generate_two_pass
from safesteer.methods.scans.settings import ScansSettings, default_settings

LAYER = 1


def _unit(hidden: int, seed: int) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _layer_output(
    lm: LoadedModel,
    prompts: list[list[int]],
    vectors: dict[int, torch.Tensor] | None = None,
    coefficients: torch.Tensor | None = None,
    start: int = 0,
    caps: dict[int, float] | None = None,
) -> torch.Tensor:
    """The (steered) output of decoder layer LAYER for one no-cache forward."""
    batch = left_pad(prompts, int(lm.tokenizer.pad_token_id))
    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        seen.append(hidden_of(output).detach().float().clone())

    with torch.inference_mode():
        if vectors is None:
            handle = lm.layers[LAYER].register_forward_hook(hook)
            forward(lm, batch, use_cache=False)
        else:
            assert coefficients is not None
            with steering(lm, vectors, coefficients, start, caps):
                handle = lm.layers[LAYER].register_forward_hook(hook)  # after the steering hook
                forward(lm, batch, use_cache=False)
        handle.remove()
    return seen[0]


def _prompts(lm: LoadedModel) -> list[list[int]]:
    layout = ChatLayout(lm.tokenizer)
    return [layout.prompt_ids(q) for q in (HARMFUL[0], BENIGN[3], BENIGN[1])]


def test_clamp_caps_the_projection_and_leaves_low_states_alone(
    tiny_models: dict[str, LoadedModel],
) -> None:
    lm = tiny_models["llama"]
    prompts = _prompts(lm)
    unit = _unit(lm.hidden_size, 3)
    plain = _layer_output(lm, prompts)
    width = plain.shape[1]
    start = width - 4
    proj = plain @ unit
    cap = float(proj[:, start:].median())  # some states above the cap, some below
    vector = 2.5 * unit
    coefficients = torch.tensor([-1.0, 1.0, 0.0])
    steered = _layer_output(lm, prompts, {LAYER: vector}, coefficients, start, {LAYER: cap})
    change = steered - plain
    # columns before the start column are untouched in every row
    assert torch.allclose(change[:, :start], torch.zeros_like(change[:, :start]), atol=1e-5)
    # row 0 (away, clamped): projection = min(projection, cap), nothing orthogonal changes
    after = steered[0, start:] @ unit
    assert torch.allclose(after, proj[0, start:].clamp(max=cap), atol=1e-4)
    orthogonal = change[0] - (change[0] @ unit)[:, None] * unit
    assert float(orthogonal.abs().max()) < 1e-4
    below = proj[0, start:] <= cap
    assert bool(below.any()) and bool((~below).any())
    assert float(change[0, start:][below].abs().max()) < 1e-5
    # row 1 (towards): still the additive shift; row 2 (coefficient 0): unchanged
    assert torch.allclose(change[1, start:], vector.expand(width - start, -1), atol=1e-4)
    assert float(change[2].abs().max()) < 1e-5


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_clamped_batch_equals_rows_alone(
    tiny_models: dict[str, LoadedModel], arch: str, use_cache: bool
) -> None:
    lm = tiny_models[arch]
    prompts = _prompts(lm)
    unit = _unit(lm.hidden_size, 5)
    cap = float((_layer_output(lm, prompts) @ unit).median())
    vectors = {LAYER: 3.0 * unit}
    coefficients = [-1.0, 1.0, -1.0]
    config = GenerationConfig(max_new_tokens=5, use_cache=use_cache)
    width = max(len(p) for p in prompts)
    with steering(lm, vectors, torch.tensor(coefficients), width - 1, {LAYER: cap}):
        batched = generate_ids(lm, prompts, config).token_ids
    for prompt, coefficient, tokens in zip(prompts, coefficients, batched, strict=True):
        with steering(lm, vectors, torch.tensor([coefficient]), len(prompt) - 1, {LAYER: cap}):
            alone = generate_ids(lm, [prompt], config).token_ids[0]
        assert alone == tokens


def _clamp_artifact(lm: LoadedModel) -> ScansArtifact:
    base = fit_scans(lm, HARMFUL, BENIGN, default_settings(lm.num_layers), batch_size=3)
    caps = torch.full((lm.num_layers,), float("nan"))
    for layer in base.settings.steer_layers:
        caps[layer] = 0.25
    return replace(base, settings=replace(base.settings, away_mode="clamp"), caps=caps)


def test_clamp_artifact_round_trip_and_checks(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["qwen2"]
    artifact = _clamp_artifact(lm)
    artifact.save(tmp_path / "a")
    loaded = ScansArtifact.load(tmp_path / "a", lm)
    assert loaded.settings.away_mode == "clamp"
    assert loaded.steering_caps() == artifact.steering_caps()
    assert set(loaded.steering_caps() or {}) == set(artifact.settings.steer_layers)
    # another direction (the random control) is steered additively
    assert loaded.steering_caps(torch.zeros_like(loaded.vectors)) is None
    assert (
        replace(loaded, settings=replace(loaded.settings, away_mode="add")).steering_caps() is None
    )
    with pytest.raises(ArtifactError, match="caps"):
        replace(artifact, caps=None)
    settings_json = artifact.settings.to_json()
    assert ScansSettings.from_json(settings_json).away_mode == "clamp"
    with pytest.raises(ValueError, match="away_mode"):
        ScansSettings.from_json({**settings_json, "away_mode": "squash"})
    # llama.cpp control vectors only add: the away sign of a clamp cannot be exported
    with pytest.raises(ControlVectorError, match="clamp"):
        from_scans(artifact, "away")
    assert from_scans(artifact, "toward").directions


def test_projection_cap_is_a_quantile_of_projections() -> None:
    states = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 5.0], [4.0, -1.0]])
    direction = torch.tensor([2.0, 0.0])  # not unit: the cap is on the unit direction
    assert projection_cap(states, direction, 0.0) == pytest.approx(1.0)
    assert projection_cap(states, direction, 0.5) == pytest.approx(2.5)


def _row(mode: str, drop: float, plain: float, text: float, alpha: float = 0.1) -> dict[str, Any]:
    return {
        "direction": "refusal",
        "layers": [4, 5],
        "alpha": alpha,
        "away_mode": mode,
        "cap_quantile": 0.1 if mode == "clamp" else None,
        "caps": [0.0, 0.0] if mode == "clamp" else None,
        "refusal_logprob_drop": drop,
        "plain_ppl_ratio": plain,
        "text_ppl_ratio": text,
    }


def test_choose_steering_applies_the_text_budget() -> None:
    additive = _row("add", 0.4, 1.05, 1.40, alpha=0.1)  # fluent plain answers, broken text
    weak = _row("add", 0.1, 1.01, 1.05, alpha=0.05)
    clamp = _row("clamp", 0.25, 1.0, 1.07)
    best, toward = choose_steering([additive, weak, clamp], 0.10)
    assert best is clamp
    assert toward == 0.1  # the same pair's strongest additive alpha with fluent plain answers
    best, toward = choose_steering([additive, weak], 0.10)
    assert best is weak and toward == 0.05
    with pytest.raises(ValueError, match="fluency budget"):
        choose_steering([additive], 0.10)


def test_sweep_pairs_rank_fluent_pairs_first_on_both_fluency_measures() -> None:
    # Qwen-1.5B's screen: early windows kept plain answers fluent but broke the reference text;
    # they must not crowd out the stronger windows, which may be fluent at a lower alpha.
    early = _row("add", 0.4, 1.07, 1.45)
    strong = _row("add", 2.26, 1.44, 1.88)
    stronger = _row("add", 2.30, 1.40, 1.95)
    assert sweep_pairs([early, strong, stronger], 0.10) == [stronger, strong]
    fluent = _row("add", 0.2, 1.05, 1.08)
    assert sweep_pairs([early, strong, fluent, stronger], 0.10) == [fluent, stronger]
    assert sweep_pairs([early, strong, fluent], 0.10, count=1) == [fluent]


def test_fluency_text_is_mmlu_dev_only(shared_data: Path) -> None:
    text = fluency_text(shared_data)
    dev_row = (shared_data / "mmlu" / "mmlu_dev" / "astronomy_dev.csv").read_text()
    assert dev_row.split(",")[0] in text
    assert len(text.split("\n\n")) >= 285  # 57 subjects x 5 dev rows (some span paragraphs)
    test_row = (shared_data / "mmlu" / "mmlu_test" / "astronomy_test.csv").read_text()
    first_test_question = test_row.split(",")[0]
    assert first_test_question not in text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_clamped_scans_fused_equals_two_pass(
    tiny_models: dict[str, LoadedModel], arch: str
) -> None:
    lm = tiny_models[arch]
    artifact = _clamp_artifact(lm)
    queries = [HARMFUL[0], BENIGN[0], BENIGN[3], "Hi"]
    config = GenerationConfig(max_new_tokens=5)
    fused = scans_generate(lm, artifact, queries, config, batch_size=4)
    reference = scans_generate_two_pass(lm, artifact, queries, config, batch_size=4)
    assert [a.token_ids for a in fused] == [b.token_ids for b in reference]
    # only the away rows depend on the mode: rows steered towards refusal add +alpha*v in both
    additive = replace(artifact, settings=replace(artifact.settings, away_mode="add"))
    added = scans_generate(lm, additive, queries, config, batch_size=4)
    away = [i for i, r in enumerate(fused) if r.decision.sigma < 0]
    assert away, "the tiny model's gate should pass some rows"
    for i, (a, b) in enumerate(zip(fused, added, strict=True)):
        if i not in away:
            assert a.token_ids == b.token_ids


def test_reply_logprobs_with_caps(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["llama"]
    layout = ChatLayout(lm.tokenizer)
    prompts = [layout.prompt_ids(q) for q in (BENIGN[0], HARMFUL[1])]
    replies = [[5, 6, 7], [8, 9]]
    vectors = {LAYER: 3.0 * _unit(lm.hidden_size, 7)}
    unsteered = reply_logprobs(lm, prompts, replies)
    never = reply_logprobs(lm, prompts, replies, vectors, -1.0, caps={LAYER: 1e6})
    assert np.allclose(unsteered, never, atol=1e-6)  # nothing lies above a huge cap
    low = reply_logprobs(lm, prompts, replies, vectors, -1.0, caps={LAYER: -1e6})
    assert not np.allclose(unsteered, low)
    single = reply_logprobs(lm, prompts[:1], replies[:1], vectors, -1.0, caps={LAYER: -1e6})
    assert single[0] == pytest.approx(low[0], abs=1e-5)
