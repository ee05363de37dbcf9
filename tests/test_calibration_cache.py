"""Calibration's keyed caches: a rerun reads what is there, a grown validation set computes only
its new prompts, and any change the results depend on (model, steering, options) recomputes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import BENIGN, HARMFUL
from safesteer.core.handle import LoadedModel
from safesteer.datasets import Prompt
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.calibrate import CalibrationConfig, Calibrator
from safesteer.methods.scans.calibration_cache import (
    EntryCache,
    cached_json,
    cached_rows,
    cached_texts,
    fingerprint,
)
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.settings import default_settings


def _rows_of(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[float(len(t)), float(ord(t[0]))] for t in texts])


def test_cached_rows_computes_only_missing_texts_and_keeps_the_order(tmp_path: Path) -> None:
    path, asked = tmp_path / "rows.safetensors", []

    def compute(missing: list[str]) -> torch.Tensor:
        asked.append(list(missing))
        return _rows_of(missing)

    first = cached_rows(path, "k", ["bb", "a", "bb"], compute)
    assert asked == [["bb", "a"]]  # a duplicate is computed once
    assert torch.equal(first, _rows_of(["bb", "a", "bb"]))
    grown = cached_rows(path, "k", ["ccc", "a", "bb"], compute)
    assert asked[-1] == ["ccc"]
    assert torch.equal(grown, _rows_of(["ccc", "a", "bb"]))
    cached_rows(path, "k", ["a", "ccc"], compute)
    assert len(asked) == 2  # everything was there
    cached_rows(path, "other model", ["a"], compute)
    assert asked[-1] == ["a"]  # another key starts afresh
    assert cached_rows(path, "k", [], compute).numel() == 0


def test_cached_texts_and_json_recompute_when_the_key_changes(tmp_path: Path) -> None:
    path, asked = tmp_path / "replies.json", []

    def reply(missing: list[str]) -> list[str]:
        asked.append(list(missing))
        return [t.upper() for t in missing]

    assert cached_texts(path, "k1", ["x", "y"], reply) == ["X", "Y"]
    assert cached_texts(path, "k1", ["y", "z"], reply) == ["Y", "Z"]
    assert asked == [["x", "y"], ["z"]]
    cached_texts(path, "k2", ["y"], reply)
    assert asked[-1] == ["y"]
    calls: list[int] = []
    value = cached_json(tmp_path / "v.json", "a", lambda: calls.append(1) or [1, 2])
    assert value == [1, 2] and cached_json(tmp_path / "v.json", "a", lambda: [9]) == [1, 2]
    assert cached_json(tmp_path / "v.json", "b", lambda: [9]) == [9]


def test_fingerprint_sees_tensor_values_and_order() -> None:
    v = torch.ones(3)
    assert fingerprint(v, 1) == fingerprint(v.clone(), 1)
    assert fingerprint(v, 1) != fingerprint(v * 2, 1)
    assert fingerprint(v, 1) != fingerprint(1, v)
    assert fingerprint(None) != fingerprint(float("nan"))


def _paper_artifact(lm: LoadedModel) -> ScansArtifact:
    return fit_scans(lm, HARMFUL, BENIGN, default_settings(lm.num_layers), batch_size=3)


def _calibrator(lm: LoadedModel, texts: list[str], out: Path, log: list[str]) -> Calibrator:
    validation = [Prompt(t, "safe", "validation-plain", {"kind": "plain"}) for t in texts]
    return Calibrator(
        lm,
        HARMFUL[:2],
        BENIGN[:2],
        validation,
        out,
        CalibrationConfig(gen_tokens=3, batch_size=4),
        progress=log.append,
    )


def test_calibrator_states_and_replies_grow_with_the_validation_set(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    base = _paper_artifact(lm)
    texts = ["Hi", "Write a story about a bank.", BENIGN[3]]
    log: list[str] = []
    small = _calibrator(lm, texts[:2], tmp_path, log)
    small.states()
    small.replies("away", base, -1.0)
    grown = _calibrator(lm, texts, tmp_path, log)
    states = grown.states()
    replies = grown.replies("away", base, -1.0)
    assert log == [
        "recording states of 6 prompts at every layer",
        "generating validation replies (away, 2 prompts)",
        "recording states of 1 prompts at every layer",
        "generating validation replies (away, 1 prompts)",
    ]
    fresh_log: list[str] = []
    fresh = _calibrator(lm, texts, tmp_path / "fresh", fresh_log)
    torch.testing.assert_close(states, fresh.states(), rtol=1e-4, atol=1e-4)
    assert replies == fresh.replies("away", base, -1.0)


def test_calibrator_replies_are_recomputed_for_other_steering(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    base = _paper_artifact(lm)
    log: list[str] = []
    calibrator = _calibrator(lm, ["Hi", "Write a story about a bank."], tmp_path, log)
    calibrator.replies("away", base, -1.0)
    calibrator.replies("away", base, -1.0)
    assert len(log) == 1
    stronger = replace(base, settings=replace(base.settings, alpha=base.settings.alpha * 3))
    other_layers = replace(base, settings=replace(base.settings, steer_layers=(0,)))
    clamped: ScansArtifact = replace(
        base,
        settings=replace(base.settings, away_mode="clamp"),
        caps=torch.zeros(lm.num_layers),
    )
    for changed in (stronger, other_layers, clamped):
        calibrator.replies("away", changed, -1.0)
    calibrator.replies("away", base, 1.0)
    assert len(log) == 5
    # the unsteered replies do not depend on the artifact's steering
    calibrator.replies("default", base, 0.0)
    calibrator.replies("default", stronger, 0.0)
    assert len(log) == 6
    # ... but they do depend on the chat's system prompt
    prompted = replace(base, settings=replace(base.settings, system_prompt="Be brief."))
    calibrator.replies("default", prompted, 0.0)
    assert len(log) == 7


def test_settings_summary_names_the_choice_and_copes_without_a_threshold() -> None:
    settings = replace(default_settings(24), gate="probe", probe_layers=(14, 15), threshold=0.3161)
    line = settings.summary()
    assert "gate probe (layers [14, 15]" in line and "T 0.316" in line and "away add" in line
    assert "T not set" in replace(settings, threshold=None).summary()


def test_chunked_stages_keep_finished_chunks_when_stopped(tmp_path: Path) -> None:
    path, asked, heard = tmp_path / "replies.json", [], []

    def reply(missing: list[str]) -> list[str]:
        if "stop" in missing:
            raise KeyboardInterrupt
        asked.append(list(missing))
        return [t.upper() for t in missing]

    texts = ["a", "b", "c", "stop", "e"]
    with pytest.raises(KeyboardInterrupt):
        cached_texts(path, "k", texts, reply, chunk=2, announce=heard.append)
    assert asked == [["a", "b"]] and heard == [5]
    texts[3] = "d"
    assert cached_texts(path, "k", texts, reply, chunk=2, announce=heard.append) == list("ABCDE")
    assert asked[1:] == [["c", "d"], ["e"]] and heard == [5, 3]
    cached_texts(path, "k", texts, reply, chunk=2, announce=heard.append)
    assert heard == [5, 3]  # nothing missing: nothing announced

    rows_path = tmp_path / "rows.safetensors"
    with pytest.raises(KeyboardInterrupt):
        cached_rows(rows_path, "k", ["xy", "z", "stop"], lambda m: reply(m) and _rows_of(m), 2)
    again = cached_rows(rows_path, "k", ["xy", "z"], lambda m: pytest.fail(f"recomputed {m}"))
    assert torch.equal(again, _rows_of(["xy", "z"]))
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        cached_texts(tmp_path / "other.json", "k", ["a"], reply, chunk=0)


def test_entry_cache_saves_each_entry_and_starts_afresh_for_another_key(tmp_path: Path) -> None:
    path = tmp_path / "partial.json"
    first = EntryCache(path, "k")
    assert first.get("one", lambda: {"x": 1.5}) == {"x": 1.5}
    reopened = EntryCache(path, "k")
    assert reopened.get("one", lambda: pytest.fail("recomputed")) == {"x": 1.5}
    assert EntryCache(path, "other").get("one", lambda: 7) == 7


def test_screen_continues_from_the_candidates_it_scored_before_a_stop(
    tiny_models: dict[str, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safesteer.methods.scans.calibrate as calibrate

    lm = tiny_models["llama"]
    base = _paper_artifact(lm)
    kinds = ["scary", "scary", "plain", "plain"]
    validation = [
        Prompt(t, "safe", "validation", {"kind": k}) for t, k in zip(BENIGN[:4], kinds, strict=True)
    ]
    config = CalibrationConfig(
        alphas=(0.1, 0.2), window=2, window_stride=lm.num_layers, cap_quantiles=(0.5,)
    )
    calibrator = Calibrator(lm, HARMFUL[:2], BENIGN[:2], validation, tmp_path, config)
    refused = np.asarray([True, True, False, False])
    replies = ["I cannot help with that.", "Sorry, no.", "Sure, here it is.", "Of course."]
    last = torch.randn(4, lm.num_layers, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    args = (base, {"paper": base.vectors}, replies, refused, last)
    whole = calibrator.screen(*args)
    real, calls = calibrate.reply_logprobs, [0]

    def counted(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2 + 2 * 2 + 1:  # the third candidate's first pass
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(calibrate, "reply_logprobs", counted)
    measured = EntryCache(tmp_path / "screen-partial.json", "key")
    with pytest.raises(KeyboardInterrupt):
        calibrator.screen(*args, measured)
    calls[0] = -1000  # no further stop
    resumed = calibrator.screen(*args, EntryCache(tmp_path / "screen-partial.json", "key"))
    assert calls[0] == -1000 + 2 + 2 * (len(whole) - 2)  # two candidates were not scored again
    assert [r["alpha"] for r in resumed] == [r["alpha"] for r in whole]
    for got, want in zip(resumed, whole, strict=True):
        assert got["refusal_logprob_drop"] == pytest.approx(want["refusal_logprob_drop"], rel=1e-5)


def test_calibrator_replies_only_for_the_rows_asked(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    base = _paper_artifact(lm)
    log: list[str] = []
    texts = ["Hi", "Write a story about a bank.", BENIGN[3]]
    calibrator = _calibrator(lm, texts, tmp_path, log)
    some = calibrator.replies("away", base, -1.0, np.asarray([True, False, True]))
    assert some[1] is None and all(isinstance(r, str) for r in (some[0], some[2]))
    every = calibrator.replies("away", base, -1.0)
    assert log == [
        "generating validation replies (away, 2 prompts)",
        "generating validation replies (away, 1 prompts)",
    ]
    assert [every[0], every[2]] == [some[0], some[2]] and isinstance(every[1], str)
