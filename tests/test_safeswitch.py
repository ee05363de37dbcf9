"""SafeSwitch: per-row head switching, base rows untouched, base weights unchanged, probers,
refusal-head labels, artifacts, the refusal bank, training data, chat and eval wiring."""

from __future__ import annotations

import io
import random
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import BENIGN, HARMFUL, build_tiny, random_prober, random_switch
from safesteer.core.activations import capture
from safesteer.core.generation import GenerationConfig, generate_ids, stop_token_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets.refusals import (
    GENERIC_HARM,
    REFUSAL_TEMPLATES,
    SORRY_BENCH_CATEGORIES,
    harm_phrase,
    refusal_for,
    render_refusal,
)
from safesteer.evaluation.judges.keyword import is_refusal_strict
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, head_checksum
from safesteer.methods.safeswitch.fit import FitConfig, fit_safeswitch
from safesteer.methods.safeswitch.generate import safeswitch_generate, switched_generate_ids
from safesteer.methods.safeswitch.head import (
    IGNORE_INDEX,
    HeadConfig,
    build_head_example,
    end_of_turn_id,
    final_hidden_states,
    head_features,
    make_head_examples,
    train_refusal_head,
)
from safesteer.methods.safeswitch.probe import (
    ProberConfig,
    budget_threshold,
    calibrate_threshold,
    false_flag_threshold,
    train_prober,
)
from safesteer.methods.safeswitch.settings import SafeSwitchSettings
from safesteer.methods.safeswitch.train import (
    EVAL_SOURCES,
    HARMFUL_SOURCES,
    HARMLESS_SOURCES,
    TrainingPrompt,
    label_generation,
    load_training_prompts,
    normalise,
    split_rows,
)
from safesteer.models import wrap_model

QUERIES = [HARMFUL[0], BENIGN[0], HARMFUL[2], BENIGN[3], "Hi", "Write a story about a bank."]
CONFIG = GenerationConfig(max_new_tokens=10)


def _artifact(lm: LoadedModel, mode: str = "two-stage") -> SafeSwitchArtifact:
    return random_switch(lm, mode)


def _encoded(lm: LoadedModel, artifact: SafeSwitchArtifact) -> list[list[int]]:
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    return [layout.prompt_ids(q) for q in QUERIES]


def _mixed(lm: LoadedModel, mode: str = "two-stage") -> SafeSwitchArtifact:
    """Thresholds between the rows' own probabilities: one row fails stage 1, and about half of
    the rest are flagged."""
    artifact = _artifact(lm, mode)
    encoded = _encoded(lm, artifact)
    probe = artifact.with_settings(threshold1=-1.0, threshold2=-1.0)
    decisions = [switched_generate_ids(lm, probe, [e], CONFIG, apply=False)[1][0] for e in encoded]
    p1 = sorted(d.stage1 for d in decisions if d.stage1 is not None)
    if mode == "direct":
        return artifact.with_settings(threshold1=(p1[2] + p1[3]) / 2)
    t1 = (p1[0] + p1[1]) / 2
    p2 = sorted(d.stage2 for d in decisions if d.stage2 is not None and d.stage1 > t1)  # type: ignore[operator]
    middle = len(p2) // 2
    return artifact.with_settings(threshold1=t1, threshold2=(p2[middle - 1] + p2[middle]) / 2)


@pytest.mark.parametrize(("arch", "mode"), [("llama", "two-stage"), ("qwen2", "direct")])
def test_switched_batch_equals_rows_alone(
    tiny_models: dict[str, LoadedModel], arch: str, mode: str
) -> None:
    lm = tiny_models[arch]
    artifact = _mixed(lm, mode)
    encoded = _encoded(lm, artifact)
    batch, decisions = switched_generate_ids(lm, artifact, encoded, CONFIG)
    flags = [d.flagged for d in decisions]
    assert any(flags) and not all(flags)
    base = generate_ids(lm, encoded, CONFIG)
    for row, ids in enumerate(encoded):
        alone, (decision,) = switched_generate_ids(lm, artifact, [ids], CONFIG)
        assert batch.token_ids[row] == alone.token_ids[0]
        assert decision.flagged == decisions[row].flagged
        assert decision.stage1 == pytest.approx(decisions[row].stage1, abs=1e-4)
        if decision.stage2 is None:
            assert decisions[row].stage2 is None
        else:
            assert decision.stage2 == pytest.approx(decisions[row].stage2, abs=1e-4)
        if decision.flagged:  # the refusal head really took over after the pilot tokens
            assert batch.token_ids[row] != base.token_ids[row]
            keep = artifact.settings.switch_step
            assert batch.token_ids[row][:keep] == base.token_ids[row][:keep]
    if mode == "two-stage":  # stage 2 runs only where stage 1 fired
        for d in decisions:
            assert (d.stage2 is not None) == (
                d.stage1 is not None and d.stage1 >= artifact.settings.threshold1
            )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_unflagged_rows_equal_the_base_model(
    tiny_models: dict[str, LoadedModel], arch: str
) -> None:
    lm = tiny_models[arch]
    artifact = _mixed(lm)
    encoded = _encoded(lm, artifact)
    base = generate_ids(lm, encoded, CONFIG)
    switched, decisions = switched_generate_ids(lm, artifact, encoded, CONFIG)
    for row, decision in enumerate(decisions):
        if not decision.flagged:
            assert switched.token_ids[row] == base.token_ids[row]
    never = artifact.with_settings(threshold1=2.0, threshold2=2.0)
    assert switched_generate_ids(lm, never, encoded, CONFIG)[0].token_ids == base.token_ids
    probes_only, _ = switched_generate_ids(lm, artifact, encoded, CONFIG, apply=False)
    assert probes_only.token_ids == base.token_ids
    # without a KV cache the step counting still switches at the same token
    nocache = GenerationConfig(max_new_tokens=6, use_cache=False)
    cached = GenerationConfig(max_new_tokens=6)
    assert (
        switched_generate_ids(lm, artifact, encoded, nocache)[0].token_ids
        == switched_generate_ids(lm, artifact, encoded, cached)[0].token_ids
    )


def _tied_llama(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    return wrap_model(LlamaForCausalLM(config).eval(), tokenizer, name="tiny-tied-llama")


def _snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_unchanged(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(p.requires_grad and p.grad is not None for p in lm.model.parameters())


def test_base_weights_unchanged_and_tied(tokenizer: PreTrainedTokenizerFast) -> None:
    lm = _tied_llama(tokenizer)
    model = lm.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _snapshot(lm)
    layout = ChatLayout(lm.tokenizer)
    examples, _ = make_head_examples(
        lm, layout, HARMFUL, ["6", None, "14", "1"], None, HeadConfig(epochs=1, lr=1e-2)
    )
    features, targets = head_features(lm, examples, 2)
    delta, history = train_refusal_head(lm, features, targets, HeadConfig(epochs=3, lr=1e-2))
    assert history["loss_after"] < history["loss_before"]
    assert float(delta.float().abs().max()) > 0
    artifact = _artifact(lm)
    artifact.head_delta = delta
    safeswitch_generate(lm, artifact, QUERIES, CONFIG, always_on=True)
    safeswitch_generate(lm, _mixed(lm), QUERIES, CONFIG)
    _assert_unchanged(lm, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model.lm_head._forward_hooks and not model.lm_head._forward_pre_hooks


def test_prober_recovers_planted_signal_and_stops_early() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(900, 24, generator=generator) * 3 + 5  # offset and scale: standardised inside
    w = torch.randn(24, generator=generator)
    y = ((x - 5) @ w > 0).long()
    config = ProberConfig(max_epochs=400, patience=5, lr=3e-3)
    prober, history = train_prober(x[:600], y[:600], x[600:750], y[600:750], config)
    accuracy = float(((prober.probability(x[750:]) >= 0.5).long() == y[750:]).float().mean())
    assert accuracy > 0.95
    assert history["stopped_early"] and history["epochs_run"] < 400
    assert history["epochs_run"] - history["best_epoch"] == config.patience
    with torch.no_grad():
        val_loss = float(torch.nn.functional.cross_entropy(prober(x[600:750]), y[600:750]))
    assert val_loss == pytest.approx(history["best_loss"], rel=1e-5)  # best weights restored
    # label noise on a tiny set: validation loss turns up quickly and training stops
    noisy = torch.randint(0, 2, (60,), generator=generator)
    _, noisy_history = train_prober(x[:40], noisy[:40], x[40:60], noisy[40:60], config)
    assert noisy_history["epochs_run"] < 60


def test_calibrated_threshold() -> None:
    assert calibrate_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(0.5)
    t = calibrate_threshold([0.01, 0.02, 0.03, 0.04], [0, 0, 1, 1])
    assert 0.02 < t < 0.03
    assert calibrate_threshold([0.3, 0.7], [1, 1]) == 0.5


def test_calibrated_threshold_edge_cases() -> None:
    assert calibrate_threshold([], []) == 0.5
    assert calibrate_threshold([0.9], [1]) == 0.5  # one example, one class
    assert calibrate_threshold([0.2, 0.9], [0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 probabilities for 2 labels"):
        calibrate_threshold([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="1 probabilities for 0 labels"):
        calibrate_threshold([0.1], [])
    with pytest.raises(ValueError, match="finite"):
        calibrate_threshold([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        calibrate_threshold([0.1, 0.9], [0, 2])


def test_budget_threshold_bounds_the_share_below() -> None:
    probs = [0.9, 0.01, 0.5, 0.02, 0.7, 0.03, 0.8, 0.95, 0.6, 0.99]
    for budget in (0.0, 0.1, 0.25, 0.5):
        t = budget_threshold(probs, budget)
        assert sum(p < t for p in probs) <= budget * len(probs)
        assert sum(p <= t for p in probs) > budget * len(probs)  # the largest such t
    assert budget_threshold(probs, 0.0) == 0.01  # nothing below the lowest harmful value
    assert budget_threshold([], 0.05) == 0.0  # no evidence: steer nothing
    with pytest.raises(ValueError, match="budget"):
        budget_threshold(probs, 1.0)
    with pytest.raises(ValueError, match="finite"):
        budget_threshold([0.1, float("nan")], 0.1)
    settings = SafeSwitchSettings(threshold1=0.8, steer_below=0.1)
    assert SafeSwitchSettings.from_json(settings.to_json()) == settings
    assert SafeSwitchSettings.from_json({**settings.to_json(), "steer_below": None}) == replace(
        settings, steer_below=None
    )


def test_refusal_head_labels_mask_prompt_keep_end_of_turn(
    tiny_models: dict[str, LoadedModel],
) -> None:
    example = build_head_example([1, 2, 3], [40, 41], 9, pilot_ids=[7, 8])
    assert example.input_ids == (1, 2, 3, 7, 8, 40, 41, 9)
    assert example.labels == (IGNORE_INDEX,) * 5 + (40, 41, 9)
    lm = tiny_models["llama"]
    layout = ChatLayout(lm.tokenizer)
    eot = end_of_turn_id(lm)
    assert eot in stop_token_ids(lm)
    pilots = [[5, 6, 7]] * len(HARMFUL)
    examples, texts = make_head_examples(
        lm, layout, HARMFUL, [None] * 4, pilots, HeadConfig(pilot_fraction=0.5, seed=1)
    )
    for prompt, example, text in zip(HARMFUL, examples, texts, strict=True):
        labels = torch.tensor(example.labels)
        context = len(layout.prompt_ids(prompt)) + (3 if text.startswith("\n") else 0)
        assert bool((labels[:context] == IGNORE_INDEX).all())
        assert bool((labels[context:] != IGNORE_INDEX).all())
        assert int(labels[-1]) == eot
        assert lm.tokenizer.decode(labels[context:-1].tolist()) == text
    assert any(t.startswith("\n\n") for t in texts) and not all(t.startswith("\n") for t in texts)
    # cached features are the LM head's input at the column before each labelled token
    features, targets = head_features(lm, examples[:2], batch_size=2)
    assert targets.tolist() == [t for e in examples[:2] for t in e.labels if t != IGNORE_INDEX]
    hidden = final_hidden_states(lm, [examples[0].input_ids])[0]
    first = examples[0].labels.index(next(t for t in examples[0].labels if t != IGNORE_INDEX))
    assert torch.allclose(features[0], hidden[first - 1].float())
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([examples[0].input_ids])).logits[0]
    weight = lm.model.get_output_embeddings().weight
    assert torch.allclose(features[0] @ weight.T, logits[first - 1], atol=1e-4)


def test_refusal_bank() -> None:
    assert len(set(REFUSAL_TEMPLATES)) >= 20
    assert len(SORRY_BENCH_CATEGORIES) == 45
    for template in REFUSAL_TEMPLATES:
        assert template.count("{harm}") == 1
        for category in (None, "6", "14", 45, "unknown"):
            text = render_refusal(template, category)
            assert "{" not in text and "}" not in text
            assert is_refusal_strict(text), text  # declines in the opening
            # and in its first sentence alone: the head may drift after it
            assert is_refusal_strict(re.split(r"(?<=[.!?]) ", text)[0]), text
    assert "self-harm" in refusal_for("6", random.Random(0))
    assert "malicious software" in refusal_for(14, random.Random(0))
    assert GENERIC_HARM in refusal_for(None, random.Random(0))
    assert harm_phrase("99") == GENERIC_HARM
    drawn = {refusal_for("3", random.Random(seed)) for seed in range(200)}
    assert len(drawn) >= 20


def test_false_flag_threshold_bounds_the_share_flagged() -> None:
    probs = [0.9, 0.01, 0.5, 0.02, 0.7, 0.03, 0.8, 0.95, 0.6, 0.99]
    for budget in (0.0, 0.1, 0.25, 0.5, 0.95):
        t = false_flag_threshold(probs, budget)
        assert sum(p >= t for p in probs) <= budget * len(probs)
        assert sum(p >= t - 1e-9 for p in probs) > budget * len(probs)  # the smallest such t
    assert false_flag_threshold(probs, 0.0) > 0.99  # nothing flagged
    assert false_flag_threshold([], 0.05) == 0.0  # no evidence: no bound
    with pytest.raises(ValueError, match="budget"):
        false_flag_threshold(probs, 1.0)
    with pytest.raises(ValueError, match="finite"):
        false_flag_threshold([0.1, float("nan")], 0.1)
    with pytest.raises(ValueError, match="harmless_budget"):
        FitConfig(harmless_budget=-0.1)


def _fitted_tiny(lm: LoadedModel, harmless_budget: float | None = None) -> SafeSwitchArtifact:
    prompts = [
        TrainingPrompt(f"{text} {i}", True, "sorry-bench-train", str(i % 45 + 1))
        for i in range(8)
        for text in HARMFUL[:2]
    ] + [
        TrainingPrompt(f"{text} {i}", False, "truthfulqa") for i in range(8) for text in BENIGN[:2]
    ]

    class Judge:
        name = "length"

        def judge(self, prompt: str, response: str) -> bool:
            return len(response) % 2 == 0

    config = FitConfig(
        label_tokens=6,
        prober=ProberConfig(max_epochs=20),
        head=HeadConfig(epochs=1),
        harmless_budget=harmless_budget,
    )
    extra = [TrainingPrompt("Explain how to steal a car.", True, "trustllm-misuse-train")]
    return fit_safeswitch(lm, prompts, Judge(), config, head_extra=extra)


def test_fit_artifact_round_trip_and_wrong_model(
    tiny_models: dict[str, LoadedModel], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    artifact = _fitted_tiny(lm)
    assert artifact.settings.layer == lm.num_layers - 1
    assert artifact.settings.head_repetition_penalty == FitConfig().head_repetition_penalty == 1.3
    assert len(artifact.report["sweep"]) == lm.num_layers
    assert artifact.training["counts"]["prompts"] == 32
    assert artifact.training["counts"]["head_prompts"] == 12 + 1  # harmful train split + extra
    assert len(artifact.training_hashes()) == 33
    steer = artifact.report["steering"]  # the combined method's threshold, from validation
    assert steer["steer_below"] == artifact.settings.steer_below <= artifact.settings.threshold1
    assert steer["val_harmful_steered"] <= steer["budget"]
    artifact.save(tmp_path / "ss")
    loaded = SafeSwitchArtifact.load(tmp_path / "ss", lm)
    assert loaded.settings == artifact.settings
    assert torch.equal(loaded.head_delta, artifact.head_delta)
    for a, b in ((loaded.stage1, artifact.stage1), (loaded.stage2, artifact.stage2)):
        assert a is not None and b is not None
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    assert loaded.training_hashes() == artifact.training_hashes()
    forced = loaded.with_settings(threshold1=-1.0, threshold2=-1.0)
    before = safeswitch_generate(lm, forced, QUERIES, CONFIG)
    after = safeswitch_generate(
        lm, artifact.with_settings(threshold1=-1, threshold2=-1), QUERIES, CONFIG
    )
    assert [r.token_ids for r in before] == [r.token_ids for r in after]
    other = build_tiny("llama", tokenizer, seed=99)
    with pytest.raises(ArtifactError, match="fitted on"):
        SafeSwitchArtifact.load(tmp_path / "ss", other)
    unchecked = SafeSwitchArtifact.load(tmp_path / "ss")  # loaded before any model
    unchecked.check_fitted_on(lm, tmp_path / "ss")
    with pytest.raises(ArtifactError, match="fitted on"):
        unchecked.check_fitted_on(other, tmp_path / "ss")
    with pytest.raises(ArtifactError, match=r"not a safesteer artifact"):
        SafeSwitchArtifact.load(tmp_path / "missing", lm)


def test_harmless_budget_raises_stage1_threshold_until_validation_harmless_pass(
    tiny_models: dict[str, LoadedModel],
) -> None:
    lm = tiny_models["llama"]
    free = _fitted_tiny(lm)
    bounded = _fitted_tiny(lm, harmless_budget=0.0)
    bound = bounded.report["stage1_false_flags"]
    assert "stage1_false_flags" not in free.report
    assert bound["balanced_threshold"] == free.settings.threshold1  # same fit otherwise
    assert bounded.settings.threshold1 == bound["threshold"] >= free.settings.threshold1
    assert bound["val_harmless_flagged_after"] == 0.0
    assert bound["val_harmless_flagged_after"] <= bound["val_harmless_flagged_before"]
    assert bound["val_harmful_flagged_after"] <= bound["val_harmful_flagged_before"]
    assert bounded.report["stage1"]["threshold"] == bounded.settings.threshold1
    assert bounded.settings.threshold2 == free.settings.threshold2


def test_label_generation_features(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["qwen2"]
    layout = ChatLayout(lm.tokenizer)
    labelled = label_generation(lm, layout, QUERIES, n_decode=2, max_new_tokens=5, batch_size=4)
    encoded = [layout.prompt_ids(q) for q in QUERIES]
    captured = capture(lm, encoded, [-1], batch_size=4)[:, :, 0]  # same batches: same numerics
    assert torch.allclose(labelled.prompt_states, captured, atol=1e-5)
    # the stage-2 state: last layer at the 2nd generated token, from the same generation
    for i, ids in enumerate(encoded):
        pilot = labelled.pilots[i]
        assert len(pilot) == 2
        state = capture(lm, [ids + pilot], [-1], layers=[lm.num_layers - 1])[0, 0, 0]
        assert torch.allclose(labelled.pilot_states[i], state, atol=1e-4)


def test_split_rows_stratified() -> None:
    harmful = [True] * 40 + [False] * 20
    splits = split_rows(harmful, seed=3)
    assert sorted(i for rows in splits.values() for i in rows) == list(range(60))
    assert sum(harmful[i] for i in splits["val"]) == 6 and len(splits["val"]) == 9
    assert split_rows(harmful, seed=3) == splits != split_rows(harmful, seed=4)


def test_training_prompts_exclude_evaluation_sets(shared_data: Path) -> None:
    data = load_training_prompts(shared_data, limit=40, seed=0, head_extra=30)
    prompts, report = data.prompts, data.report
    assert len(prompts) == 40 and sum(p.harmful for p in prompts) == 20
    assert len(data.head_extra) == 30 and all(p.harmful for p in data.head_extra)
    assert not {p.text for p in data.head_extra} & {p.text for p in prompts}
    assert sorted(report["eval_sets_checked"]) == sorted(EVAL_SOURCES)
    from safesteer.datasets import load_test_set

    evaluation = {
        normalise(p.text) for s in EVAL_SOURCES for p in load_test_set(s, data_dir=shared_data)
    }
    assert not {normalise(p.text) for p in prompts + data.head_extra} & evaluation
    assert all(v > 0 for side in report["sources"].values() for v in side.values())
    assert set(report["sources"]["harmful"]) == set(HARMFUL_SOURCES)
    sorry = [p for p in prompts if p.source == "sorry-bench-train"]
    assert sorry and all(p.category in SORRY_BENCH_CATEGORIES for p in sorry)
    assert all(p.category is None for p in prompts if not p.source.startswith("sorry-bench"))
    # harmless prompts come from training splits and written prompts (never a SCANS test set),
    # and mixed-label sources give only their safe rows
    assert {p.source for p in prompts if not p.harmful} == set(HARMLESS_SOURCES)
    from safesteer.datasets.validation import written_prompts

    # the written prompts feed both sides, each with its own label (style-matched sources)
    written = {p.text: p.label for p in written_prompts()}
    for p in prompts:
        if p.source == "validation-written":
            assert written[p.text] == ("unsafe" if p.harmful else "safe")
    repe_safe = {
        p.text for p in load_test_set("repe-train", data_dir=shared_data) if p.label == "safe"
    }
    assert all(p.text in repe_safe for p in prompts if p.source == "repe-train")
    assert not {"truthfulqa", "heldout"} & set(report["sources"]["harmless"])


def test_training_prompts_written_batches(shared_data: Path) -> None:
    """``written="first"`` draws only the first written batch (the v1/v2 fits); "all" every one."""
    from safesteer.datasets.validation import WRITTEN_FILE, WRITTEN_FILES, written_prompts

    first = {p.text for p in written_prompts((WRITTEN_FILE,))}
    later = {p.text for p in written_prompts(WRITTEN_FILES[1:])}
    drawn = {}
    for choice in ("first", "all"):
        data = load_training_prompts(shared_data, limit=400, seed=0, written=choice)
        drawn[choice] = {p.text for p in data.prompts if p.source == "validation-written"}
        assert data.report["written"] == choice
    assert drawn["first"] and drawn["first"] <= first
    assert drawn["all"] & later and drawn["all"] <= first | later


def test_chat_loop_and_eval_wiring(tiny_models: dict[str, LoadedModel]) -> None:
    from safesteer.cli.chat import chat_loop, describe_switch
    from safesteer.evaluation.eval_options import EvalOptions, MethodOutput
    from safesteer.evaluation.evaluate import evaluate, run_method
    from safesteer.evaluation.run_setup import RunError

    lm = tiny_models["llama"]
    artifact = _mixed(lm)
    seen: list[str] = []

    def responder(prompts: Sequence[str]) -> list[tuple[str, str | None]]:
        seen.extend(prompts)
        result = safeswitch_generate(lm, artifact, prompts, CONFIG)[0]
        return [(result.response, describe_switch(result.decision))]

    out = io.StringIO()
    turns = chat_loop(responder, io.StringIO("Hi\n\nWhy is the sky blue?\n/quit\nignored\n"), out)
    assert turns == 2 and seen == ["Hi", "Why is the sky blue?"]
    assert out.getvalue().count("stage1") == 2
    assert chat_loop(responder, io.StringIO("Hello"), io.StringIO()) == 1  # EOF ends

    outputs: dict[str, list[MethodOutput]] = {}
    scans: Any = None  # SCANS artifact: unused by the SafeSwitch methods
    for method in ("safeswitch", "head"):
        collected: list[MethodOutput] = []

        def collect(
            idx: list[int], outs: list[MethodOutput], c: list[MethodOutput] = collected
        ) -> None:
            c.extend(outs)

        run_method(
            method,
            lm,
            scans,
            QUERIES,
            CONFIG,
            4,
            0,
            collect,
            safeswitch=artifact,
        )
        outputs[method] = collected
    assert all(o.flagged for o in outputs["head"])
    assert any(o.flagged for o in outputs["safeswitch"])
    assert all(o.stage1 is not None for o in outputs["safeswitch"])
    with pytest.raises(RunError, match="fit safeswitch"):
        evaluate(EvalOptions(methods=["default", "safeswitch"]), lm)


@pytest.mark.slow
def test_embedded_head_is_a_separate_tensor(embedded: LoadedModel) -> None:
    """SmolLM2 ties its head to the input embeddings: training and switching leave both alone."""
    lm = embedded
    model = lm.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert end_of_turn_id(lm) == lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    before = _snapshot(lm)
    layout = ChatLayout(lm.tokenizer)
    examples, _ = make_head_examples(lm, layout, HARMFUL[:2], ["7", None], None, HeadConfig())
    features, targets = head_features(lm, examples, 2)
    config = HeadConfig(epochs=1, token_batch=128, lr=1e-3)
    delta, history = train_refusal_head(lm, features, targets, config)
    assert history["loss_after"] < history["loss_before"]
    artifact = SafeSwitchArtifact(
        settings=SafeSwitchSettings(),
        stage1=random_prober(lm.hidden_size, 1),
        stage2=random_prober(lm.hidden_size, 2),
        head_delta=delta,
        model_fingerprint=lm.fingerprint(),
        base_head_checksum=head_checksum(lm),
    )
    safeswitch_generate(lm, artifact, [HARMFUL[0]], GenerationConfig(4), always_on=True)
    safeswitch_generate(lm, artifact, [BENIGN[0]], GenerationConfig(4))
    _assert_unchanged(lm, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(("arch", "use_cache"), [("llama", True), ("qwen2", False)])
def test_head_repetition_penalty_acts_on_head_rows_only(
    tiny_models: dict[str, LoadedModel], arch: str, use_cache: bool
) -> None:
    lm = tiny_models[arch]
    artifact = _mixed(lm)
    encoded = _encoded(lm, artifact)
    config = GenerationConfig(max_new_tokens=12, use_cache=use_cache)
    plain, decisions = switched_generate_ids(lm, artifact, encoded, config)
    # a huge penalty: a token the head has written is never its argmax again
    strict = artifact.with_settings(head_repetition_penalty=1e6)
    penalised, again = switched_generate_ids(lm, strict, encoded, config)
    keep = artifact.settings.switch_step
    assert [d.flagged for d in again] == [d.flagged for d in decisions]
    assert any(d.flagged for d in decisions)
    for row, decision in enumerate(decisions):
        if not decision.flagged:
            assert penalised.token_ids[row] == plain.token_ids[row]
            continue
        head_tokens = penalised.token_ids[row][keep:]
        assert len(head_tokens) == len(set(head_tokens)), head_tokens
        assert penalised.token_ids[row][:keep] == plain.token_ids[row][:keep]
    # always on: the first head token is not penalised, the rest never repeat
    always, _ = switched_generate_ids(lm, strict, encoded, config, always_on=True)
    for ids in always.token_ids:
        assert len(ids) == len(set(ids))
    # 1.0 is the plain head, and the batch still equals each row alone
    assert (
        switched_generate_ids(
            lm, artifact.with_settings(head_repetition_penalty=1.0), encoded, config
        )[0].token_ids
        == plain.token_ids
    )
    for row, ids in enumerate(encoded):
        alone = switched_generate_ids(lm, strict, [ids], config)[0]
        assert alone.token_ids[0] == penalised.token_ids[row]


def test_head_repetition_penalty_setting_round_trip_and_checks() -> None:
    settings = SafeSwitchSettings(head_repetition_penalty=1.3)
    assert SafeSwitchSettings.from_json(settings.to_json()) == settings
    old = settings.to_json()
    del old["head_repetition_penalty"]  # artifacts written before the setting existed
    assert SafeSwitchSettings.from_json(old).head_repetition_penalty == 1.0
    with pytest.raises(ValueError, match="head_repetition_penalty must be positive"):
        SafeSwitchSettings(head_repetition_penalty=0.0)
    with pytest.raises(ValueError, match="head_repetition_penalty must be positive"):
        FitConfig(head_repetition_penalty=-1.0)
