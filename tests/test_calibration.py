"""The calibrated SCANS recipe: probe gate inside the fused prefill, policies, teacher-forced
scoring under steering, threshold choice, the validation set and its leak check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BENIGN, HARMFUL
from safesteer.core.activations import capture
from safesteer.core.generation import GenerationConfig, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.core.steering import steering
from safesteer.datasets import DatasetError, load_test_set
from safesteer.datasets.validation import (
    assert_disjoint,
    evaluation_texts,
    normalise,
    validation_set,
    written_prompts,
)
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.calibration_config import CalibrationConfig
from safesteer.methods.scans.decide import away_only, classify, policy_coefficients, signed
from safesteer.methods.scans.directions import refusal_direction, reply_logprobs, windows
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.gate import (
    ProbeGate,
    cached_gate_choice,
    choose_gate,
    fit_probe,
    out_of_fold,
)
from safesteer.methods.scans.generate import scans_generate, scans_generate_two_pass
from safesteer.methods.scans.policy_choice import (
    choose_threshold,
    judged,
    needed_rows,
    outcome_rates,
    pareto_table,
    policy_outcomes,
    steered_rates,
)
from safesteer.methods.scans.settings import default_settings

QUERIES = [HARMFUL[0], BENIGN[0], HARMFUL[2], BENIGN[3], "Hi", "Write a story about a bank."]


def _states(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    layout = ChatLayout(lm.tokenizer)
    reply = len(layout.reply_ids("Sure"))
    return capture(lm, [layout.encode(t, "Sure").input_ids for t in texts], [-1 - reply, -1])


def _probe_artifact(lm: LoadedModel, policy: str = "away-only") -> ScansArtifact:
    base = fit_scans(lm, HARMFUL, BENIGN, default_settings(lm.num_layers), batch_size=3)
    texts = HARMFUL + BENIGN
    harmful = [True] * len(HARMFUL) + [False] * len(BENIGN)
    layers = (0, lm.num_layers - 1)
    probe = fit_probe(_states(lm, texts), harmful, layers, "last", c=1.0)
    settings = base.settings.__class__(
        **{
            **base.settings.__dict__,
            "gate": "probe",
            "policy": policy,
            "probe_layers": layers,
            "probe_kind": "last",
            "threshold": 0.5,
            "alpha": 0.5,
            "recipe": "calibrated",
        }
    )
    return ScansArtifact(
        base.vectors,
        base.reference,
        base.layer_norms,
        settings,
        base.anchors,
        base.model_fingerprint,
        base.calibration,
        probe,
    )


def test_probe_gate_matches_a_direct_computation(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["llama"]
    artifact = _probe_artifact(lm)
    assert artifact.probe is not None
    decisions = classify(lm, artifact, QUERIES)
    states = _states(lm, QUERIES)[:, list(artifact.settings.probe_layers)]
    direct = artifact.probe.probability(states)
    assert [d.score for d in decisions] == pytest.approx(direct.tolist(), abs=1e-5)
    assert all(0.0 <= d.score <= 1.0 for d in decisions)
    assert [d.sigma for d in decisions] == [1 if p >= 0.5 else -1 for p in direct.tolist()]
    # The paper's transition score is still reported next to the probe's.
    assert all(d.transition_score is not None and -1 <= d.transition_score <= 1 for d in decisions)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_probe_gate_fused_equals_two_pass(tiny_models: dict[str, LoadedModel], arch: str) -> None:
    lm = tiny_models[arch]
    artifact = _probe_artifact(lm, "signed")
    config = GenerationConfig(max_new_tokens=5)
    fused = scans_generate(lm, artifact, QUERIES, config, batch_size=4)
    reference = scans_generate_two_pass(lm, artifact, QUERIES, config, batch_size=4)
    for a, b in zip(fused, reference, strict=True):
        assert a.decision.score == pytest.approx(b.decision.score, abs=1e-5)
        assert a.decision.sigma == b.decision.sigma
        assert a.token_ids == b.token_ids


def test_away_only_leaves_flagged_rows_unsteered(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["llama"]
    artifact = _probe_artifact(lm, "away-only")
    assert policy_coefficients(artifact) is away_only
    assert policy_coefficients(artifact.with_settings(policy="signed")) is signed
    config = GenerationConfig(max_new_tokens=5)
    steered = scans_generate(lm, artifact, QUERIES, config, batch_size=6)
    sigmas = [r.decision.sigma for r in steered]
    assert set(sigmas) == {-1, 1}, "the tiny probe should flag some rows and pass others"
    layout = ChatLayout(lm.tokenizer)
    plain = generate_ids(lm, [layout.prompt_ids(q) for q in QUERIES], config).token_ids
    for result, ids, sigma in zip(steered, plain, sigmas, strict=True):
        if sigma > 0:  # flagged: exactly the model's own greedy tokens
            assert result.token_ids == ids
    assert any(
        r.token_ids != ids for r, ids, s in zip(steered, plain, sigmas, strict=True) if s < 0
    )


def test_banded_policy_steers_towards_only_above_its_second_threshold(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    base = _probe_artifact(lm, "signed")
    scores = sorted(d.score for d in classify(lm, base, QUERIES))
    threshold = base.settings.threshold or 0.0
    flagged = [s for s in scores if s >= threshold]
    assert len(flagged) >= 2, "the tiny probe should flag at least two rows"
    toward = (flagged[0] + flagged[-1]) / 2
    artifact = base.with_settings(policy="banded", toward_threshold=toward)
    decisions = classify(lm, artifact, QUERIES)
    coefficients = policy_coefficients(artifact)(decisions).tolist()
    expected = [
        -1.0 if d.score < threshold else (1.0 if d.score >= toward else 0.0) for d in decisions
    ]
    assert coefficients == expected
    assert 1.0 in coefficients and 0.0 in coefficients
    artifact.save(tmp_path / "banded")
    assert ScansArtifact.load(tmp_path / "banded", lm).settings.toward_threshold == toward
    with pytest.raises(ValueError, match="toward_threshold"):
        policy_coefficients(base.with_settings(policy="banded"))


def test_probe_artifact_round_trip(tiny_models: dict[str, LoadedModel], tmp_path: Path) -> None:
    lm = tiny_models["llama"]
    artifact = _probe_artifact(lm)
    artifact.save(tmp_path / "a")
    loaded = ScansArtifact.load(tmp_path / "a", lm)
    assert loaded.settings == artifact.settings
    assert loaded.probe is not None and artifact.probe is not None
    assert torch.equal(loaded.probe.weight, artifact.probe.weight)
    assert [d.score for d in classify(lm, loaded, QUERIES)] == pytest.approx(
        [d.score for d in classify(lm, artifact, QUERIES)]
    )


def test_reply_logprobs_match_steered_generation(tiny_models: dict[str, LoadedModel]) -> None:
    """Teacher forcing a greedy reply under steering gives the log-probs generation saw."""
    lm = tiny_models["llama"]
    artifact = _probe_artifact(lm)
    layout = ChatLayout(lm.tokenizer)
    prompts = [layout.prompt_ids(q) for q in QUERIES[:3]]
    vectors = artifact.steering_vectors()
    for coefficient in (0.0, -1.0):
        for prompt in prompts:  # batch 1: the greedy reply is the argmax at every step
            with steering(lm, vectors, torch.tensor([coefficient]), len(prompt) - 1):
                reply = generate_ids(lm, [prompt], GenerationConfig(4)).token_ids[0]
            batched = reply_logprobs(lm, [prompt] * 2, [reply, reply[:2]], vectors, coefficient)
            single = reply_logprobs(lm, [prompt], [reply], vectors, coefficient)
            assert batched[0] == pytest.approx(single[0], abs=1e-5)
            assert single[0] <= 0.0
    unsteered = reply_logprobs(lm, prompts, [[5, 6]] * 3)
    steered = reply_logprobs(lm, prompts, [[5, 6]] * 3, vectors, -1.0)
    assert not np.allclose(unsteered, steered)


def test_out_of_fold_probe_separates_a_planted_direction() -> None:
    generator = torch.Generator().manual_seed(0)
    n, hidden = 80, 16
    states = torch.randn(n, 3, 2, hidden, generator=generator)
    harmful = [i % 2 == 0 for i in range(n)]
    states[torch.tensor(harmful), 1, 0, 3] += 3.0  # layer 1, last-token feature 3
    oof = out_of_fold(states, harmful, [1], "last", c=1.0, folds=4)
    assert oof[np.asarray(harmful)].mean() > oof[~np.asarray(harmful)].mean() + 0.4
    gate = fit_probe(states, harmful, [1], "last")
    again = ProbeGate.from_tensors(gate.tensors(), [1], "last")
    assert torch.allclose(again.probability(states[:, [1]]), gate.probability(states[:, [1]]))


def test_gate_choice_is_cached_under_a_key_of_its_inputs(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    n, hidden = 60, 8
    states = torch.randn(n, 4, 2, hidden, generator=generator)
    harmful = [i % 2 == 0 for i in range(n)]
    states[torch.tensor(harmful), 2, 0, 1] += 3.0  # layer 2 carries the label
    path = tmp_path / "gate.json"
    first = cached_gate_choice(path, ["m"], states, harmful, n_layers=1)
    assert first == choose_gate(states, harmful, n_layers=1)
    assert first.layers == (2,)
    # a second call reads the file: a planted value there comes back unchanged
    stored = json.loads(path.read_text())
    stored["value"]["c"] = 123.0
    path.write_text(json.dumps(stored))
    assert cached_gate_choice(path, ["m"], states, harmful, n_layers=1).c == 123.0
    # other states (or another model) are another key: computed afresh
    moved = states.clone()
    moved[torch.tensor(harmful), 2, 0, 1] -= 3.0
    moved[torch.tensor(harmful), 0, 0, 1] += 3.0
    assert cached_gate_choice(path, ["m"], moved, harmful, n_layers=1).layers == (0,)
    assert cached_gate_choice(path, ["other"], moved, harmful, n_layers=1).c != 123.0


def test_refusal_direction_removes_the_label_axis() -> None:
    hidden = 4
    labels = ["safe", "safe", "unsafe", "unsafe"]
    refused = [True, False, True, False]
    harm = torch.tensor([0.0, 0.0, 5.0, 5.0])[:, None, None] * torch.eye(hidden)[0]
    refusal = torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None, None] * torch.eye(hidden)[1]
    last = harm + refusal  # [4, 1, hidden]
    direction = refusal_direction(last, labels, refused)
    assert direction is not None
    assert torch.allclose(direction[0], torch.eye(hidden)[1], atol=1e-6)
    assert refusal_direction(last, labels, [False] * 4) is None


def test_policy_outcomes_and_threshold_choice() -> None:
    labels = ["safe", "safe", "unsafe", "unsafe"]
    prob = np.array([0.1, 0.6, 0.7, 0.9])
    default = np.array([True, True, True, True])
    away = np.array([False, False, False, True])
    toward = np.array([True, True, True, True])
    assert policy_outcomes(prob, 0.65, default, away, toward, "away-only").tolist() == [
        False,
        False,
        True,
        True,
    ]
    table = pareto_table(labels, prob, default, away, toward, "away-only")
    best = choose_threshold(table, default_unsafe=100.0, unsafe_budget=0.0)
    assert best["within_budget"]
    assert (best["safe_refusal"], best["unsafe_refusal"], best["avg"]) == (0.0, 100.0, 100.0)
    assert 0.6 < best["threshold"] <= 0.7
    assert outcome_rates(labels, default) == {
        "safe_refusal": 100.0,
        "unsafe_refusal": 100.0,
        "avg": 50.0,
    }
    assert windows(24, 4, 2)[0] == (4, 5, 6, 7) and windows(24, 4, 2)[-1][-1] <= 19


def test_banded_outcomes_and_the_plain_prompt_budget() -> None:
    # rows: plain safe, scary safe, unsafe, unsafe
    labels = ["safe", "safe", "unsafe", "unsafe"]
    plain = np.array([True, False, False, False])
    prob = np.array([0.5, 0.2, 0.6, 0.9])
    default = np.array([False, True, False, True])
    away = np.array([False, False, False, False])
    toward = np.array([True, True, True, True])
    banded = policy_outcomes(prob, 0.4, default, away, toward, "banded", 0.8)
    assert banded.tolist() == [False, False, False, True]  # 0.5, 0.6 unsteered; 0.9 towards
    assert policy_outcomes(prob, 0.4, default, away, toward, "signed").tolist() == [
        True,
        False,
        True,
        True,
    ]
    rates = outcome_rates(labels, banded, plain)
    assert rates["plain_refusal"] == 0.0
    table = pareto_table(labels, prob, default, away, toward, "banded", plain)
    assert any(r.get("toward_threshold", 0) > r["threshold"] for r in table)
    # Without the plain budget signed-like thresholds (T 0.4, everything flagged towards) win on
    # Avg; with it, the plain prompt (0.5) must not be steered towards refusal.
    free = choose_threshold(table, default_unsafe=50.0, unsafe_budget=0.0)
    assert free["avg"] == 100.0
    kept = choose_threshold(table, 50.0, 0.0, default_plain=0.0, plain_budget=0.0)
    assert kept["within_budget"] and kept["plain_refusal"] == 0.0
    assert kept["toward_threshold"] > 0.5 or kept["threshold"] > 0.5
    with pytest.raises(ValueError, match="toward_threshold"):
        policy_outcomes(prob, 0.4, default, away, toward, "banded")


# ---------------------------------------------------------------------------------------------
# the validation set


def test_written_validation_prompts() -> None:
    prompts = written_prompts()
    kinds = {p.meta["kind"] for p in prompts}
    assert kinds == {"scary-benign", "plain", "harmful"}
    assert len(prompts) >= 1190
    # the second batch: every category has safe prompts and harmful contrasts
    by_category: dict[str, set[str]] = {}
    for p in prompts:
        if "category" in p.meta:
            by_category.setdefault(p.meta["category"], set()).add(p.label)
    howto = {k: by_category.pop(k) for k in list(by_category) if k.startswith("howto-")}
    short = {k: by_category.pop(k) for k in list(by_category) if k.endswith("-short")}
    assert len(by_category) == 9 and all(v == {"safe", "unsafe"} for v in by_category.values())
    # the fourth: minimal pairs, one safe prompt and one harmful twin each, in eight categories
    assert len(short) == 8 and all(v == {"safe", "unsafe"} for v in short.values())
    pairs = [p for p in prompts if p.meta.get("category", "").endswith("-short")]
    assert sum(p.label == "safe" for p in pairs) == sum(p.label == "unsafe" for p in pairs) == 115
    # the third: benign how-to requests, plain and alarming, and harmful ones in the same forms
    assert howto == {
        "howto-plain": {"safe"},
        "howto-alarming": {"safe"},
        "howto-harmful": {"unsafe"},
    }
    openers = ("how to ", "how do i ", "how can i ")
    for kind in ("plain", "harmful"):
        rows = [p for p in prompts if p.meta.get("category", "").startswith("howto-")]
        rows = [p for p in rows if p.meta["kind"] == kind]
        share = np.mean([p.text.lower().startswith(openers) for p in rows])
        assert 0.5 <= share <= 0.7, (kind, share)  # the same forms on both sides
    assert {p.label for p in prompts if p.meta["kind"] == "harmful"} == {"unsafe"}
    assert {p.label for p in prompts if p.meta["kind"] != "harmful"} == {"safe"}
    keys = [normalise(p.text) for p in prompts]
    assert len(keys) == len(set(keys))


def test_validation_set_is_disjoint_from_every_test_set(shared_data: Path) -> None:
    prompts = validation_set(shared_data)
    forbidden = evaluation_texts(shared_data)
    assert len(forbidden) > 5000  # every registered test set was read
    assert not {normalise(p.text) for p in prompts} & forbidden
    sources = {p.meta.get("source") for p in prompts}
    plain_repe = [p for p in prompts if p.meta["source"] == "repe-train"]
    assert len(plain_repe) > 50 and {(p.label, p.meta["kind"]) for p in plain_repe} == {
        ("safe", "plain")
    }
    assert {
        "written",
        "repe-train",
        "sorry-bench-train",
        "trustllm-misuse-train",
        "trustllm-jailbreak-train",
    } <= sources


def test_leak_check_catches_a_planted_test_prompt(shared_data: Path) -> None:
    forbidden = evaluation_texts(shared_data)
    xstest = load_test_set("xstest", data_dir=shared_data)[7].text
    planted = "  " + xstest.upper().replace(" ", "   ") + " "
    with pytest.raises(DatasetError, match="1 prompt"):
        assert_disjoint(["a harmless new prompt", planted], forbidden)
    oktest = load_test_set("oktest", data_dir=shared_data)[0].text
    with pytest.raises(DatasetError):
        assert_disjoint([oktest.replace("'", "\u2019")], forbidden)
    assert_disjoint(["a harmless new prompt"], forbidden)


# ---------------------------------------------------------------------------------------------
# recipes: which artifact a run uses


def test_recipe_selection() -> None:
    from safesteer.evaluation.run_setup import RunError, RunOptions, calibrated_for
    from safesteer.methods.scans.calibrated import CALIBRATED_DIR

    qwen = RunOptions(model="qwen2.5-coder-0.5b")
    assert calibrated_for(qwen) == CALIBRATED_DIR / "qwen2.5-coder-0.5b"
    assert (CALIBRATED_DIR / "qwen2.5-coder-0.5b" / "manifest.json").is_file()
    assert calibrated_for(RunOptions(model="qwen-0.5b", recipe="calibrated")) is not None
    bigger = RunOptions(model="qwen2.5-coder-1.5b")
    assert calibrated_for(bigger) == CALIBRATED_DIR / "qwen2.5-coder-1.5b"
    assert calibrated_for(RunOptions(model="qwen2.5-coder-0.5b", recipe="paper")) is None
    assert calibrated_for(RunOptions(model="qwen2.5-coder-0.5b", seed=3)) is None
    assert calibrated_for(RunOptions()) is None  # embedded model: nothing shipped, paper recipe
    with pytest.raises(RunError, match="no calibrated SCANS artifact"):
        calibrated_for(RunOptions(recipe="calibrated"))
    with pytest.raises(RunError, match="seed 0"):
        calibrated_for(RunOptions(model="qwen2.5-coder-0.5b", recipe="calibrated", seed=1))
    with pytest.raises(RunError, match="unknown recipe"):
        calibrated_for(RunOptions(recipe="best"))


@pytest.mark.parametrize("model", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_shipped_artifact_is_calibrated_and_refuses_another_model(
    model: str, tiny_models: dict[str, LoadedModel]
) -> None:
    from safesteer.methods.artifacts import ArtifactError
    from safesteer.methods.scans.calibrated import CALIBRATED_DIR

    folder = CALIBRATED_DIR / model
    artifact = ScansArtifact.load(folder)
    s = artifact.settings
    assert (s.recipe, s.gate, s.alpha_mode) == ("calibrated", "probe", "relative")
    assert s.policy in ("signed", "away-only", "banded") and 0.0 < (s.threshold or 0) < 1.0
    assert artifact.probe is not None and len(s.probe_layers) == 3
    assert artifact.calibration["cls_layers"] == list(s.cls_layers)
    # a refusal gate, when shipped, reads the probe's layers and stands at its recorded threshold
    if s.refusal_threshold is not None:
        assert artifact.refusal_probe is not None
        assert artifact.refusal_probe.layers == artifact.probe.layers
        recorded = artifact.calibration["gate"]["refusal_gate"]["threshold"]
        assert s.refusal_threshold == pytest.approx(recorded)
    if model == "qwen2.5-coder-0.5b":
        assert s.refusal_threshold is not None  # v7 ships one
    else:  # v3: v2 without its refusal gate; the manifest says why and what validation measured
        assert s.refusal_threshold is None and artifact.refusal_probe is None
        removed = artifact.calibration["refusal_gate_removed"]
        assert removed["validation"]["threshold"] == pytest.approx(s.threshold)
        chosen = artifact.calibration["chosen"]["validation"]
        assert removed["validation"]["safe_refusal"] < chosen["safe_refusal"]
    with pytest.raises(ArtifactError, match="not on the loaded model"):
        ScansArtifact.load(folder, tiny_models["qwen2"])


def test_restricted_threshold_range_reads_only_the_replies_it_generates() -> None:
    """The calibration generates steered replies only for ``needed_rows``; every table row in the
    range must be the same whatever the other rows' steered outcomes are."""
    rng = np.random.default_rng(3)
    n = 300
    probabilities = np.concatenate([rng.beta(0.3, 0.3, n - 4), [0.0, 0.01, 0.99, 1.0]])
    labels = ["unsafe" if p > 0.5 else "safe" for p in probabilities]
    default, away, toward = (rng.random(n) < 0.5 for _ in range(3))
    plain = rng.random(n) < 0.3
    span = (0.05, 0.9)
    need_away, need_toward = needed_rows(probabilities, span)
    assert not need_away[probabilities >= 0.9].any() and need_away[probabilities < 0.9].all()
    assert need_toward.sum() == (probabilities >= 0.05).sum()
    scrambled_away = np.where(need_away, away, ~away)
    scrambled_toward = np.where(need_toward, toward, ~toward)
    for policy in ("signed", "away-only", "banded"):
        table = pareto_table(labels, probabilities, default, away, toward, policy, plain, 10, span)
        again = pareto_table(
            labels,
            probabilities,
            default,
            scrambled_away,
            scrambled_toward,
            policy,
            plain,
            10,
            span,
        )
        assert table == again
        thresholds = {row["threshold"] for row in table}
        assert min(thresholds) == 0.05 and max(thresholds) == 0.9
        full = pareto_table(labels, probabilities, default, away, toward, policy, plain, 10)
        assert {0.0, 1.01} <= {row["threshold"] for row in full}
    with pytest.raises(ValueError, match="threshold range must satisfy"):
        pareto_table(
            labels, probabilities, default, away, toward, "signed", threshold_range=(0.5, 0.5)
        )
    with pytest.raises(ValueError, match="threshold_range must satisfy"):
        CalibrationConfig(threshold_range=(0.9, 0.1))
    with pytest.raises(ValueError, match="save_every must be at least 1"):
        CalibrationConfig(save_every=0)


def test_steered_rates_are_named_by_the_rows_they_cover() -> None:
    labels = ["safe", "safe", "unsafe", "unsafe"]
    plain = np.asarray([True, False, False, False])
    refused = np.asarray([False, True, True, True])
    everything, some = np.ones(4, dtype=bool), np.asarray([True, True, False, False])
    rates = steered_rates(labels, plain, refused, some, refused, everything)
    assert set(rates) == {"away_2_rows_that_some_threshold_uses", "toward_all_rows"}
    assert rates["away_2_rows_that_some_threshold_uses"]["safe_refusal"] == 50.0
    assert rates["toward_all_rows"]["unsafe_refusal"] == 100.0
    assert judged(["I cannot help with that.", None], np.asarray([False, True])).tolist() == [
        True,
        True,
    ]
