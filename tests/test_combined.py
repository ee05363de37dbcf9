"""scans+safeswitch (prober gate, SCANS steering for benign rows, refusal head for flagged rows),
the prober + safety prompt baseline, and the eval options of SafeSwitch's comparison set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import BENIGN, HARMFUL, combined_scans, random_switch
from safesteer.core.generation import GenerationConfig, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.evaluation.eval_options import BALANCED_SAFETY_PROMPT, PROMPT_METHODS
from safesteer.evaluation.eval_summary import response_lengths
from safesteer.evaluation.evaluate import resolve_system_prompt
from safesteer.evaluation.judges.llm import (
    DEFAULT_JUDGE_TEMPLATE,
    PUBLISHED_TEMPLATE_NAME,
    judge_prompt_for,
)
from safesteer.evaluation.run_setup import RunError
from safesteer.evaluation.suites import get_suite
from safesteer.methods.combined import check_combinable, combined_batch, combined_generate
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.baselines import prober_prompt_generate
from safesteer.methods.safeswitch.fit import FitConfig
from safesteer.methods.safeswitch.generate import safeswitch_generate, switched_generate_ids
from safesteer.methods.safeswitch.probe import ProberConfig, fit_prober
from safesteer.methods.safeswitch.settings import (
    SAFESWITCH_SAFETY_PROMPT,
    SAFESWITCH_SYSTEM_PROMPT,
)
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.generate import scans_generate

QUERIES = [HARMFUL[0], BENIGN[0], HARMFUL[2], BENIGN[3], "Hi", "Write a story about a bank."]
CONFIG = GenerationConfig(max_new_tokens=8)


def _switch(lm: LoadedModel, mode: str = "two-stage") -> SafeSwitchArtifact:
    return random_switch(lm, mode)


@pytest.fixture(scope="module")
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def scans(lm: LoadedModel) -> ScansArtifact:
    return combined_scans(lm)


def _encoded(lm: LoadedModel, switch: SafeSwitchArtifact) -> list[list[int]]:
    layout = ChatLayout(lm.tokenizer, switch.settings.system_prompt)
    return [layout.prompt_ids(q) for q in QUERIES]


def _mixed(lm: LoadedModel) -> SafeSwitchArtifact:
    """Stage-1 threshold in the middle of the rows' probabilities, stage 2 always passes."""
    switch = _switch(lm)
    _, decisions = switched_generate_ids(lm, switch, _encoded(lm, switch), CONFIG, apply=False)
    p1 = sorted(d.stage1 for d in decisions if d.stage1 is not None)
    return switch.with_settings(threshold1=(p1[2] + p1[3]) / 2, threshold2=-1.0)


def test_benign_rows_are_steered_and_flagged_rows_switch(
    lm: LoadedModel, scans: ScansArtifact
) -> None:
    switch = _mixed(lm)
    encoded = _encoded(lm, switch)
    generated, decisions, (steered, _, _, _) = combined_batch(lm, switch, scans, encoded, CONFIG)
    assert any(steered) and not all(steered)
    switched, base_decisions = switched_generate_ids(lm, switch, encoded, CONFIG)
    away = scans_generate(
        lm,
        scans,
        QUERIES,
        CONFIG,
        batch_size=len(QUERIES),
        coefficients=lambda ds: -torch.ones(len(ds)),
    )
    for row, decision in enumerate(decisions):
        assert decision.stage1 == pytest.approx(base_decisions[row].stage1, abs=1e-4)
        assert steered[row] == (decision.stage1 < switch.settings.threshold1)
        if steered[row]:  # SCANS' away-steering, token for token, and never the refusal head
            assert not decision.flagged
            assert generated.token_ids[row] == away[row].token_ids
        else:  # unsteered; SafeSwitch's switch as without SCANS
            assert decision.flagged == base_decisions[row].flagged
            assert generated.token_ids[row] == switched.token_ids[row]
    moved = [generated.token_ids[r] != switched.token_ids[r] for r in range(len(QUERIES))]
    assert any(m for m, s in zip(moved, steered, strict=True) if s)  # the steering does act


def test_combined_batch_equals_rows_alone(lm: LoadedModel, scans: ScansArtifact) -> None:
    switch = _mixed(lm)
    encoded = _encoded(lm, switch)
    generated, decisions, (steered, _, _, _) = combined_batch(lm, switch, scans, encoded, CONFIG)
    for row, ids in enumerate(encoded):
        alone, (decision,), ((was_steered,), _, _, _) = combined_batch(
            lm, switch, scans, [ids], CONFIG
        )
        assert alone.token_ids[0] == generated.token_ids[row]
        assert (decision.flagged, was_steered) == (decisions[row].flagged, steered[row])


def test_zero_alpha_and_no_gate_reduce_to_safeswitch(lm: LoadedModel, scans: ScansArtifact) -> None:
    switch = _mixed(lm)
    plain = combined_generate(lm, switch, scans.with_settings(alpha=0.0), QUERIES, CONFIG)
    reference = safeswitch_generate(lm, switch, QUERIES, CONFIG)
    assert [r.token_ids for r in plain] == [r.token_ids for r in reference]
    everyone = switch.with_settings(threshold1=-1.0)  # stage 1 fires everywhere: nothing steered
    results = combined_generate(lm, everyone, scans, QUERIES, CONFIG, batch_size=4)
    assert not any(r.steered for r in results)
    assert [r.token_ids for r in results] == [
        r.token_ids for r in safeswitch_generate(lm, everyone, QUERIES, CONFIG)
    ]


def test_steering_threshold_below_stage1_leaves_unsure_rows_alone(
    lm: LoadedModel, scans: ScansArtifact
) -> None:
    switch = _mixed(lm)
    encoded = _encoded(lm, switch)
    _, decisions, _ = combined_batch(lm, switch, scans, encoded, CONFIG)
    p1 = sorted(d.stage1 for d in decisions if d.stage1 is not None)
    strict = switch.with_settings(steer_below=(p1[0] + p1[1]) / 2)  # only the clearest row
    generated, decisions, (steered, _, _, _) = combined_batch(lm, strict, scans, encoded, CONFIG)
    assert sum(steered) == 1
    switched, _ = switched_generate_ids(lm, strict, encoded, CONFIG)
    for row, decision in enumerate(decisions):
        assert steered[row] == (decision.stage1 < strict.settings.steer_below)
        if not steered[row]:  # between the two thresholds: unsteered, as SafeSwitch alone
            assert generated.token_ids[row] == switched.token_ids[row]
    assert strict.settings.steering_threshold == strict.settings.steer_below
    assert switch.settings.steering_threshold == switch.settings.threshold1


def test_direct_prober_cannot_gate(lm: LoadedModel, scans: ScansArtifact) -> None:
    with pytest.raises(ValueError, match="two-stage"):
        check_combinable(_switch(lm, "direct"), scans)
    with pytest.raises(ValueError, match="two-stage"):
        combined_generate(lm, _switch(lm, "direct"), scans, QUERIES, CONFIG)


def test_prober_prompt_answers_flagged_rows_under_the_safety_prompt(lm: LoadedModel) -> None:
    switch = _mixed(lm).with_settings(threshold2=0.5)
    results = prober_prompt_generate(lm, switch, QUERIES, CONFIG, batch_size=4)
    flagged = [r.decision.flagged for r in results]
    _, decisions = switched_generate_ids(lm, switch, _encoded(lm, switch), CONFIG, apply=False)
    assert flagged == [d.flagged for d in decisions]
    safety = ChatLayout(lm.tokenizer, SAFESWITCH_SAFETY_PROMPT)
    own = generate_ids(lm, _encoded(lm, switch), CONFIG)
    for row, result in enumerate(results):
        if result.decision.flagged:
            again = generate_ids(lm, [safety.prompt_ids(QUERIES[row])], CONFIG)
            expected = lm.tokenizer.decode(again.token_ids[0], skip_special_tokens=True).strip()
        else:
            expected = lm.tokenizer.decode(own.token_ids[row], skip_special_tokens=True).strip()
        assert result.response == expected


def test_judge_templates(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert judge_prompt_for("default").template == DEFAULT_JUDGE_TEMPLATE
    published = judge_prompt_for("published", shared_data)
    assert "{question}" in published.template and "{answer}" in published.template
    assert published.template != DEFAULT_JUDGE_TEMPLATE
    from safesteer.evaluation.judges.llm import load_judge_prompt

    assert published == load_judge_prompt(shared_data, PUBLISHED_TEMPLATE_NAME)
    text = tmp_path / "judge.txt"
    text.write_text("Q: {question}\nA: {answer}\nComplies (1/0)?")
    assert judge_prompt_for(str(text)).template.startswith("Q: {question}")
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholders")
    with pytest.raises(ValueError, match="placeholder"):
        judge_prompt_for(str(bad))
    with pytest.raises(ValueError, match="neither default, published nor an existing file"):
        judge_prompt_for(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="cannot read the published judge prompt"):
        judge_prompt_for("published", tmp_path)
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="--data-dir"):
        judge_prompt_for("published", None)


def test_paper_thresholds_are_fixed_at_one_half() -> None:
    assert FitConfig().prober_config.fixed_threshold is None
    assert FitConfig(thresholds="paper").prober_config.fixed_threshold == 0.5
    with pytest.raises(ValueError, match="calibrated or paper"):
        FitConfig(thresholds="tuned")  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=generator)
    y = (x[:, 0] > 0.8).long()  # imbalanced: the calibrated threshold moves off 0.5
    splits = {"train": list(range(40)), "val": list(range(40, 50)), "test": list(range(50, 60))}
    fixed = fit_prober(x, y, splits, ProberConfig(max_epochs=5, fixed_threshold=0.5))
    assert fixed.threshold == 0.5


def test_system_prompt_choices_and_suite() -> None:
    suite = get_suite("safeswitch-paper")
    assert "alpaca-eval" in suite.parts and suite.system_prompt == SAFESWITCH_SYSTEM_PROMPT
    assert resolve_system_prompt("suite", suite) == (True, SAFESWITCH_SYSTEM_PROMPT)
    assert resolve_system_prompt("suite", get_suite("xstest")) == (False, None)
    assert resolve_system_prompt("model", suite) == (False, None)
    assert resolve_system_prompt("Be brief.", suite) == (True, "Be brief.")
    with pytest.raises(RunError, match="empty"):
        resolve_system_prompt("  ", suite)
    assert PROMPT_METHODS == {
        "prompt": SAFESWITCH_SAFETY_PROMPT,
        "prompt-balanced": BALANCED_SAFETY_PROMPT,
    }
    lengths = response_lengths(
        [
            {"subset": "a", "response": "one two three"},
            {"subset": "a", "response": "x"},
            {"subset": "b", "response": ""},
        ]
    )
    assert lengths == {"a": {"n": 2, "mean_words": 2.0}, "b": {"n": 1, "mean_words": 0.0}}
