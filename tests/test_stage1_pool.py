"""Stage 1's threshold on a held-out pool: every harmless source within its budget, the pool drawn
from training sources only (never an evaluation set, never the fit's own prompts, never rows an
earlier eval tested on), the probabilities the runtime reads, and the artifact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import build_tiny, random_switch
from safesteer.cli.main import app
from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets import load_test_set
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, sha256_text
from safesteer.methods.safeswitch.generate import switched_generate_ids
from safesteer.methods.safeswitch.stage1_pool import (
    calibrate_stage1,
    held_out_pool,
    per_source_threshold,
    stage1_probabilities,
)
from safesteer.methods.safeswitch.train import (
    EVAL_SOURCES,
    HARMFUL_SOURCES,
    HARMLESS_SOURCES,
    TrainingPrompt,
    normalise,
)
from safesteer.models import load_model


def _saved_tiny(tokenizer: PreTrainedTokenizerFast, tmp_path: Path, seed: int) -> Path:
    """A tiny llama saved as an HF folder (what ``--model DIR`` loads)."""
    folder = tmp_path / "model"
    tiny = build_tiny("llama", tokenizer, seed=seed)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def _prompts(source: str, harmful: bool, n: int) -> list[TrainingPrompt]:
    return [TrainingPrompt(f"{source} {i}", harmful, source) for i in range(n)]


def test_every_harmless_source_meets_the_budget_and_the_threshold_never_drops() -> None:
    pool = _prompts("plain", False, 50) + _prompts("scary", False, 50) + _prompts("bad", True, 50)
    plain = [i / 100 for i in range(50)]  # 0.00 .. 0.49: never flagged at 0.5
    scary = [0.3 + i / 100 for i in range(50)]  # 0.30 .. 0.79: 30 of 50 at or above 0.5
    bad = [0.5 + i / 100 for i in range(50)]
    threshold, report = per_source_threshold(plain + scary + bad, pool, 0.5, 0.1)
    assert report["binding_source"] == "scary"
    assert sum(p >= threshold for p in scary) <= 5  # 10 % of 50
    assert sum(p >= threshold for p in scary[:-5]) == 0  # and no higher than it needs to be
    assert report["harmless"]["scary"] == {"before": [30, 50], "after": [5, 50]}
    assert report["harmless"]["plain"]["after"] == [0, 50]
    assert report["harmful"]["bad"]["before"] == [50, 50]
    assert report["harmful"]["bad"]["after"][0] == sum(p >= threshold for p in bad)
    # a current threshold already above what the sources need stays where it is
    high, _ = per_source_threshold(plain + scary + bad, pool, 0.95, 0.1)
    assert high == 0.95


def test_per_source_threshold_refuses_bad_input() -> None:
    pool = _prompts("plain", False, 3)
    with pytest.raises(ValueError, match=r"budget must be in \[0, 1\)"):
        per_source_threshold([0.1, 0.2, 0.3], pool, 0.5, 1.0)
    with pytest.raises(ValueError, match="2 probabilities for 3 pool prompts"):
        per_source_threshold([0.1, 0.2], pool, 0.5, 0.1)
    with pytest.raises(ValueError, match="no harmless prompts"):
        per_source_threshold([0.1], _prompts("bad", True, 1), 0.5, 0.1)


def test_pool_is_held_out_from_training_and_evaluation(shared_data: Path) -> None:
    first, _ = held_out_pool(set(), shared_data, per_source=20, seed=0)
    used = {sha256_text(p.text) for p in first[::2]}  # as if the fit had read every other one
    excluded = {sha256_text(p.text) for p in first[1::4]}  # and an eval had tested these
    pool, report = held_out_pool(used | excluded, shared_data, per_source=20, seed=0)
    assert not {sha256_text(p.text) for p in pool} & (used | excluded)
    evaluation = {
        normalise(p.text) for s in EVAL_SOURCES for p in load_test_set(s, data_dir=shared_data)
    }
    assert not {normalise(p.text) for p in pool} & evaluation
    assert sorted(report["eval_sets_checked"]) == sorted(EVAL_SOURCES)
    assert report["drawn"]["harmful"] == dict.fromkeys(HARMFUL_SOURCES, 20)
    assert set(report["drawn"]["harmless"]) == set(HARMLESS_SOURCES)
    assert all(0 < n <= 20 for n in report["drawn"]["harmless"].values())
    assert held_out_pool(used, shared_data, per_source=20, seed=0)[0] != pool  # excluded matter
    again, _ = held_out_pool(used | excluded, shared_data, per_source=20, seed=0)
    assert again == pool  # seeded
    with pytest.raises(ValueError, match="at least 1 prompt per source"):
        held_out_pool(set(), shared_data, per_source=0)


def test_pool_probabilities_are_the_runtime_decision(tiny_models: dict[str, LoadedModel]) -> None:
    """The threshold is chosen on the same P(harmful) stage 1 computes while generating."""
    lm = tiny_models["llama"]
    switch = random_switch(lm)
    texts = ["How do I kill a Python process?", "Write a poem.", "Hi", "Explain CRISPR in detail."]
    pooled = stage1_probabilities(lm, switch, texts, batch_size=2)
    layout = ChatLayout(lm.tokenizer, switch.settings.system_prompt)
    config = GenerationConfig(max_new_tokens=2)
    for text, p in zip(texts, pooled, strict=True):
        ids = [layout.prompt_ids(text)]
        decision = switched_generate_ids(lm, switch, ids, config, apply=False)[1][0]
        assert decision.stage1 == pytest.approx(p, abs=1e-5)


def test_calibrated_artifact_round_trip(
    tiny_models: dict[str, LoadedModel], shared_data: Path, tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    switch = random_switch(lm).with_settings(threshold1=0.0)  # flags everything
    switch.training = {"prompt_sha256": ["0" * 64]}
    calibrated = calibrate_stage1(
        lm, switch, 0.1, data_dir=shared_data, per_source=6, batch_size=8, exclude=["Hi there"]
    )
    report = calibrated.report["stage1_pool"]
    assert calibrated.settings.threshold1 == report["threshold"] > 0.0
    for counts in report["harmless"].values():
        flagged, n = counts["after"]
        assert flagged <= 0.1 * n
    assert calibrated.settings.threshold2 == switch.settings.threshold2
    assert calibrated.settings.steer_below == switch.settings.steer_below
    drawn = calibrated.training["stage1_pool"]
    n_pool = sum(n for side in drawn["drawn"].values() for n in side.values())
    assert drawn["excluded_prompts"] == 1
    assert len(calibrated.training_hashes()) == 1 + n_pool  # the pool joins the training hashes
    assert switch.settings.threshold1 == 0.0 and "stage1_pool" not in switch.report  # a copy
    calibrated.save(tmp_path / "v2")
    loaded = SafeSwitchArtifact.load(tmp_path / "v2", lm)
    assert loaded.settings == calibrated.settings
    assert loaded.training_hashes() == calibrated.training_hashes()
    assert loaded.report["stage1_pool"]["threshold"] == report["threshold"]
    with pytest.raises(ValueError, match="two-stage"):
        calibrate_stage1(lm, random_switch(lm, "direct"), 0.1, data_dir=shared_data, per_source=2)


def test_command_writes_a_bounded_copy_and_keeps_tested_rows_out(
    tokenizer: PreTrainedTokenizerFast, shared_data: Path, tmp_path: Path
) -> None:
    folder = _saved_tiny(tokenizer, tmp_path, seed=3)
    lm = load_model(str(folder))
    random_switch(lm).with_settings(threshold1=0.0).save(tmp_path / "v1")
    tested = load_test_set("alpaca-eval", data_dir=shared_data)[:40]
    run = tmp_path / "earlier-eval"
    run.mkdir()
    rows = [{"method": "default", "id": i, "prompt": p.text} for i, p in enumerate(tested)]
    (run / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["fit", "safeswitch-threshold", "--model", str(folder), "--data-dir", str(shared_data)]
    args += ["--safeswitch-artifact", str(tmp_path / "v1"), "--out", str(tmp_path / "v2")]
    args += ["--pool-per-source", "4", "--harmless-budget", "0.25", "--exclude-run", str(run)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "stage 1 threshold 0.000 →" in output
    assert "40 prompts of earlier eval runs kept out of the pool" in output
    bounded = SafeSwitchArtifact.load(tmp_path / "v2", lm)
    assert bounded.settings.threshold1 > 0.0
    assert SafeSwitchArtifact.load(tmp_path / "v1", lm).settings.threshold1 == 0.0
    assert not {sha256_text(p.text) for p in tested} & bounded.training_hashes()


def test_fit_with_a_pool_bounds_stage1_in_the_same_command(
    tokenizer: PreTrainedTokenizerFast, shared_data: Path, tmp_path: Path
) -> None:
    folder = _saved_tiny(tokenizer, tmp_path, seed=4)
    args = ["fit", "safeswitch", "--model", str(folder), "--data-dir", str(shared_data)]
    args += ["--limit", "24", "--harmless-budget", "0.1", "--pool-per-source", "3"]
    args += ["--head-prompts", "4", "--head-epochs", "1", "--label-tokens", "4"]
    args += ["--batch-size", "8", "--out", str(tmp_path / "ss")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fitted = SafeSwitchArtifact.load(tmp_path / "ss", load_model(str(folder)))
    pool = fitted.report["stage1_pool"]
    assert fitted.settings.threshold1 == pool["threshold"] >= pool["threshold_before"]
    assert pool["threshold_before"] == fitted.report["stage1_false_flags"]["threshold"]
    drawn = fitted.training["stage1_pool"]["drawn"]
    assert drawn["harmful"] == dict.fromkeys(HARMFUL_SOURCES, 3)
    n_pool = sum(n for side in drawn.values() for n in side.values())
    counts = fitted.training["counts"]
    head_only = counts["head_prompts"] - counts["head_prompts_with_pilot_available"]
    assert len(fitted.training_hashes()) == counts["prompts"] + head_only + n_pool
