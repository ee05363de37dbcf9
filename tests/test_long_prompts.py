"""Prompts longer than the context leaves room for: refused with a message, or (``--truncate
left``) cut from the left to the tokens that fit; never a hang."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.evaluation.eval_options import EvalOptions
from safesteer.evaluation.evaluate import evaluate
from safesteer.evaluation.run_setup import RunError, context_length, fit_prompt_lengths


@pytest.fixture
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["llama"]


def _long(lm: LoadedModel) -> str:
    limit = context_length(lm)
    assert limit is not None
    return " ".join(f"word{i % 7} sky" for i in range(limit)) + " THE END"


def test_long_prompt_is_refused_with_the_way_out(lm: LoadedModel) -> None:
    with pytest.raises(RunError, match=r"prompt 1 has .* tokens.*--truncate left"):
        fit_prompt_lengths(lm, ["short", _long(lm)], 8)


def test_truncate_left_keeps_the_end_and_fits(lm: LoadedModel) -> None:
    limit = context_length(lm)
    assert limit is not None
    text = _long(lm)
    short, cut = fit_prompt_lengths(lm, ["short", text], 8, "left")
    assert short == "short"
    assert text.endswith(cut) and cut.endswith("THE END") and len(cut) < len(text)
    total = len(ChatLayout(lm.tokenizer).encode(cut, "Sure").input_ids) + 8
    assert total <= limit


def test_reply_budget_larger_than_the_context_is_refused(lm: LoadedModel) -> None:
    limit = context_length(lm)
    assert limit is not None
    with pytest.raises(RunError, match="leaves no room for a prompt"):
        fit_prompt_lengths(lm, ["short"], limit, "left")


def test_unknown_truncate_value_is_refused(lm: LoadedModel) -> None:
    with pytest.raises(RunError, match="--truncate must be one of none, left"):
        fit_prompt_lengths(lm, ["short"], 8, "right")


def _data(tmp_path: Path, lm: LoadedModel) -> Path:
    path = tmp_path / "prompts.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "label"])
        writer.writerow(["Why is the sky blue?", "safe"])
        writer.writerow([_long(lm), "unsafe"])
    return path


def _options(tmp_path: Path, data: Path, **changes: object) -> EvalOptions:
    options = EvalOptions(
        suite=str(data),
        methods=["default", "prompt"],
        max_new_tokens=3,
        anchor_size=4,
        batch_size=4,
        bootstrap=10,
        output_dir=str(tmp_path / "out"),
    )
    for key, value in changes.items():
        setattr(options, key, value)
    return options


def test_eval_refuses_then_truncates_on_request(lm: LoadedModel, tmp_path: Path) -> None:
    data = _data(tmp_path, lm)
    with pytest.raises(RunError, match="--truncate left"):
        evaluate(_options(tmp_path, data), lm=lm, show=False)
    assert not (tmp_path / "out" / "responses.jsonl").exists()  # refused before generating
    out = tmp_path / "out2"
    evaluate(_options(tmp_path, data, truncate="left", output_dir=str(out)), lm=lm, show=False)
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {r["prompt"] for r in rows} == {"Why is the sky blue?", _long(lm)}  # original text
    settings = json.loads((out / "settings.json").read_text())
    assert settings["resume_key"]["truncate"] == "left"
