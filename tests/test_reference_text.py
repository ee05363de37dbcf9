"""Reference text in calibration: its windows join the gate's training as benign prompts, and the
threshold may steer only a budgeted share of them towards refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from conftest import BENIGN, HARMFUL
from safesteer.core.handle import LoadedModel
from safesteer.datasets import Prompt
from safesteer.methods.scans.calibrate import CalibrationConfig, Calibrator
from safesteer.methods.scans.policy_choice import (
    choose_threshold,
    pareto_table,
    reference_toward,
)
from safesteer.methods.scans.reference_text import gate_prompts, reference_info, screen_windows

TEXT = "\n\n".join(
    f"Question {i}: which planet is the {i}th from the sun in this list? Answer: planet {i}."
    for i in range(40)
)


def test_gate_prompts_spread_windows_of_each_size_over_the_text(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prompts = gate_prompts(tokenizer, TEXT, (16, 64), 5)
    assert len(prompts) == 10
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert all(abs(n - 16) <= 2 for n in lengths[:5])
    assert all(abs(n - 64) <= 2 for n in lengths[5:])
    # the first window opens the text, the last of each size closes it
    assert TEXT.startswith(prompts[0]) and TEXT.startswith(prompts[5])
    assert TEXT.rstrip().endswith(prompts[4]) and TEXT.rstrip().endswith(prompts[9])
    # a size longer than the text gives no window; more windows than starts gives each start once
    assert gate_prompts(tokenizer, TEXT, (len(ids) + 1,), 5) == []
    assert len(gate_prompts(tokenizer, TEXT, (len(ids) - 1,), 5)) == 2
    with pytest.raises(ValueError, match="window sizes must be positive"):
        gate_prompts(tokenizer, TEXT, (0,), 5)


def test_screen_windows_are_consecutive_first_token_and_rest(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    firsts, rests = screen_windows(tokenizer, TEXT, 32, 3)
    assert len(firsts) == 3
    assert [f + r for f, r in zip(firsts, rests, strict=True)] == [
        ids[0:32],
        ids[32:64],
        ids[64:96],
    ]


def test_reference_budget_keeps_ordinary_text_away_from_refusal() -> None:
    # rows: safe, safe, unsafe, unsafe; the reference windows score like the second unsafe row
    labels = ["safe", "safe", "unsafe", "unsafe"]
    prob = np.array([0.1, 0.2, 0.4, 0.8])
    default = np.array([True, False, False, False])
    away = np.array([False, False, False, False])
    toward = np.array([True, True, True, True])
    reference = np.array([0.5, 0.6, 0.05])
    assert reference_toward(reference, "signed", 0.45, None) == pytest.approx(200 / 3)
    assert reference_toward(reference, "away-only", 0.01, None) == 0.0
    assert reference_toward(reference, "banded", 0.3, 0.7) == 0.0
    table = pareto_table(labels, prob, default, away, toward, "signed", reference=reference)
    assert all("reference_toward" in row for row in table)
    free = choose_threshold(table, default_unsafe=0.0, unsafe_budget=0.0)
    assert free["avg"] == 100.0 and free["reference_toward"] > 0
    kept = choose_threshold(table, 0.0, 0.0, reference_budget=0.0)
    assert kept["within_budget"] and kept["reference_toward"] == 0.0
    assert kept["threshold"] > 0.6 and kept["avg"] == 75.0
    # no threshold meets an impossible unsafe budget: the reference budget is not reported as met
    assert not choose_threshold(table, 200.0, 0.0, reference_budget=0.0)["within_budget"]


def test_reference_info_summarises_the_gate_on_reference_windows() -> None:
    info = reference_info(np.array([0.1, 0.6]), (64, 512))
    assert info["reference_windows"] == 2 and info["reference_flagged_at_half"] == 50.0
    assert info["reference_max_probability"] == pytest.approx(0.6)
    assert reference_info(np.array([]), (64,)) == {"reference_windows": 0}


def test_calibrator_records_reference_windows_as_benign_gate_rows(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["llama"]
    validation = [Prompt(t, "safe", "validation-plain", {"kind": "plain"}) for t in BENIGN[:2]]
    config = CalibrationConfig(reference_sizes=(16, 32), reference_per_size=3, batch_size=4)
    log: list[str] = []
    calibrator = Calibrator(
        lm, HARMFUL[:2], BENIGN[2:4], validation, tmp_path, config, log.append, fluency_text=TEXT
    )
    assert calibrator.references == gate_prompts(lm.tokenizer, TEXT, (16, 32), 3)
    assert len(calibrator.references) == 6
    states = calibrator.states()
    assert states.shape[0] == 2 + 2 + 6 + 2
    assert log == ["recording states of 12 prompts at every layer"]
    without = Calibrator(lm, HARMFUL[:2], BENIGN[2:4], validation, tmp_path / "no-text", config)
    assert without.references == [] and without.states().shape[0] == 6
    # a reference window that is also an anchor or a validation prompt is not counted twice
    twice = Calibrator(
        lm,
        HARMFUL[:2],
        [calibrator.references[0], BENIGN[2]],
        validation,
        tmp_path / "twice",
        config,
        fluency_text=TEXT,
    )
    assert twice.references == calibrator.references[1:]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("reference_sizes", (1,), "reference_sizes"),
        ("reference_per_size", -1, "reference_per_size"),
        ("reference_budget", 120.0, "percentage"),
    ],
)
def test_reference_settings_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**{field: value})  # type: ignore[arg-type]


def test_calibration_report_names_the_reference_windows(tmp_path: Path) -> None:
    from safesteer.evaluation.calibration_report import write_calibration_report

    shipped = Path(__file__).parents[1] / "docs/results/qwen05-calibration-v5/calibration.json"
    calibration = json.loads(shipped.read_text())
    # a calibration from before reference windows still renders, without their line
    before = write_calibration_report(calibration, tmp_path / "before").read_text()
    assert "reference-text windows" not in before and "steered towards" not in before
    calibration["gate"].update(reference_info(np.array([0.1, 0.7, 0.2, 0.05]), (64, 512)))
    for pick in calibration["chosen"]["per_policy"].values():
        pick["reference_toward"] = 25.0
    after = write_calibration_report(calibration, tmp_path / "after").read_text()
    assert "reference-text windows among its benign rows: 4 (sizes [64, 512] tokens)" in after
    assert "max 0.700, 25.0 % at 0.5 or above" in after
    assert "| reference windows steered towards refusal % |" in after
    policy_rows = [line for line in after.splitlines() if line.startswith("| signed, ")]
    assert policy_rows and policy_rows[0].endswith(" 25.0 |")
    # every row of the policy table has as many cells as its header
    table = [line for line in after.splitlines() if line.startswith("| ")][-6:]
    assert len({line.count("|") for line in table}) == 1
