"""Benchmark plumbing: run_all reports every benchmark when one fails; safeswitch_overhead runs
from a fresh clone (a timing artifact instead of a fitted one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks import run_all
from transformers import PreTrainedTokenizerFast

from conftest import build_tiny


def test_run_one_reports_failures_and_missing_results(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    write = f"import json; open({str(out)!r}, 'w').write(json.dumps({{'targets': [1]}}))"
    ok = run_all.run_one("ok", [sys.executable, "-c", write], tmp_path, out)
    assert ok["status"] == "ok" and ok["targets"] == [1]
    crash = [sys.executable, "-c", "raise SystemExit('no artifact here')"]
    failed = run_all.run_one("crash", crash, tmp_path, tmp_path / "none.json")
    assert failed["status"] == "failed (rc 1)" and "no artifact here" in failed["error"]
    silent = run_all.run_one("silent", [sys.executable, "-c", "pass"], tmp_path, tmp_path / "x")
    assert silent["status"] == "failed (no result JSON)"


def test_run_all_reports_the_others_when_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(name: str, cmd: list[str], root: Path, out: Path) -> dict[str, Any]:
        if name == "memory":
            return {"benchmark": name, "status": "failed (rc 1)", "error": "boom"}
        return {"benchmark": name, "status": "ok", "targets": []}

    monkeypatch.setattr(run_all, "run_one", fake)
    code = run_all.main(
        ["--quick", "--only", "scans_e2e,memory,fit_time", "--out-dir", str(tmp_path)]
    )
    assert code == 1
    summary = json.loads((tmp_path / "run_all.quick.json").read_text())
    assert [(e["benchmark"], e["status"]) for e in summary] == [
        ("scans_e2e", "ok"),
        ("memory", "failed (rc 1)"),
        ("fit_time", "ok"),
    ]


def test_safeswitch_timing_artifact_runs_without_a_fitted_one(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    from benchmarks.safeswitch_overhead import timing_artifact

    from safesteer.core.generation import GenerationConfig
    from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
    from safesteer.methods.safeswitch.generate import switched_generate_ids

    lm = build_tiny("llama", tokenizer, seed=0)
    artifact = timing_artifact(lm, seed=0)
    artifact.save(tmp_path / "switch")
    loaded = SafeSwitchArtifact.load(tmp_path / "switch", lm)  # a valid artifact for the model
    assert loaded.settings.layer == lm.num_layers - 1
    _, decisions = switched_generate_ids(
        lm, loaded, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=3)
    )
    assert len(decisions) == 2


def test_scans_e2e_prompt_phase_matches_the_library(tokenizer: PreTrainedTokenizerFast) -> None:
    """N_PREFILL counts the forwards before decoding; a decode step must never count."""
    from benchmarks.scans_e2e import N_PREFILL, check_prompt_phase, single_forward_fused

    from conftest import BENIGN, HARMFUL
    from safesteer.core.generation import GenerationConfig, generate_ids
    from safesteer.core.layout import ChatLayout
    from safesteer.methods.scans.fit import fit_scans
    from safesteer.methods.scans.generate import scans_generate, scans_generate_two_pass
    from safesteer.methods.scans.settings import ScansSettings

    lm = build_tiny("llama", tokenizer, seed=0)
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    queries = HARMFUL[:2] + BENIGN[:2]
    encoded = [ChatLayout(lm.tokenizer).prompt_ids(q) for q in queries]
    calls: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    new_tokens = 5
    config = GenerationConfig(max_new_tokens=new_tokens)
    workloads = {
        "plain": lambda: generate_ids(lm, encoded, config),
        "fused": lambda: scans_generate(lm, artifact, queries, config, batch_size=4),
        "two_pass": lambda: scans_generate_two_pass(lm, artifact, queries, config, batch_size=4),
        "single": lambda: single_forward_fused(lm, artifact, queries, config),
    }
    try:
        from benchmarks.common import fixed_length

        for name, run in workloads.items():
            calls.clear()
            with fixed_length():
                run()
            check_prompt_phase(name, len(calls), new_tokens)
            assert len(calls) == N_PREFILL[name] + new_tokens - 1
    finally:
        handle.remove()
    with pytest.raises(RuntimeError, match="update N_PREFILL"):
        check_prompt_phase("fused", 3 + new_tokens - 1, new_tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_single_forward_prototype_equals_the_library(
    tokenizer: PreTrainedTokenizerFast, arch: str
) -> None:
    """The one-forward prototype gives the fused path's decisions and tokens, padding included."""
    from benchmarks.scans_e2e import single_forward_fused

    from conftest import BENIGN, HARMFUL
    from safesteer.core.generation import GenerationConfig
    from safesteer.methods.scans.decide import classify
    from safesteer.methods.scans.fit import fit_scans
    from safesteer.methods.scans.generate import scans_generate
    from safesteer.methods.scans.settings import ScansSettings

    lm = build_tiny(arch, tokenizer)
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2), None)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    queries = [*HARMFUL, *BENIGN, "Hi", "Write a story about a bank."]
    scores = sorted(d.score for d in classify(lm, artifact, queries))
    artifact = artifact.with_settings(threshold=(scores[4] + scores[5]) / 2)
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.1)
    reference = scans_generate(lm, artifact, queries, config, batch_size=len(queries))
    got = single_forward_fused(lm, artifact, queries, config)
    assert {r.decision.sigma for r in reference} == {-1, 1}
    assert [r.decision.sigma for r in reference] == [g[0] for g in got]
    assert [r.token_ids for r in reference] == [g[1] for g in got]


def test_real_tokens_of_the_single_forward_mask(tokenizer: PreTrainedTokenizerFast) -> None:
    """Decision cost in tokens: the 4-D mask's forward counts prompt + reply + 2 per row."""
    from benchmarks.common import timed_forwards
    from benchmarks.scans_e2e import single_forward_fused

    from conftest import BENIGN, HARMFUL
    from safesteer.core.generation import GenerationConfig
    from safesteer.core.layout import ChatLayout
    from safesteer.methods.scans.fit import fit_scans
    from safesteer.methods.scans.settings import ScansSettings

    lm = build_tiny("llama", tokenizer)
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2), 0.0)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    queries = ["Hi", HARMFUL[0], BENIGN[1]]
    layout = ChatLayout(lm.tokenizer)
    reply = len(layout.reply_ids("Sure"))
    expected = sum(len(layout.prompt_ids(q)) + reply + 2 for q in queries)
    with timed_forwards(lm.model, "cpu") as timer:
        single_forward_fused(lm, artifact, queries, GenerationConfig(max_new_tokens=2))
    assert timer.calls[0].real_tokens() == expected


def test_safeswitch_overhead_times_a_named_model_and_writes_its_own_result(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model DIR`` loads that model (not the embedded one), never takes the embedded model's
    default artifact, and writes ``safeswitch_overhead.<name>.quick.json``."""
    import benchmarks.safeswitch_overhead as bench

    folder = tmp_path / "tiny-llama"
    tiny = build_tiny("llama", tokenizer, seed=0)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(bench, "DEFAULT_ARTIFACT", tmp_path / "no-such-artifact")
    loaded: list[Any] = []
    real_load = bench.load_lm

    def spy_load(device: str, model: str | None = None) -> Any:
        loaded.append(real_load(device, model))
        return loaded[-1]

    monkeypatch.setattr(bench, "load_lm", spy_load)
    bench.main(["--quick", "--reps", "1", "--model", str(folder)])
    assert len(loaded) == 1 and loaded[0].hidden_size == tiny.hidden_size
    assert loaded[0].num_layers == tiny.num_layers
    result = json.loads(
        (tmp_path / "results" / "safeswitch_overhead.tiny-llama.quick.json").read_text()
    )
    assert result["settings"]["model"] == str(folder)
    assert result["settings"]["artifact"].startswith("timing artifact")
    assert [row[0] for row in result["tables"][0]["rows"]] == ["plain", "unflagged", "half flagged"]


def test_cpu_dtype_first_difference() -> None:
    from benchmarks.cpu_dtype import first_difference

    assert first_difference([1, 2, 3], [1, 2, 3]) == 3
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3, 4]) == 2  # a prefix differs where it ends
    assert first_difference([], [7]) == 0
