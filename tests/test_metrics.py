"""Tests for safesteer.evaluation.metrics: refusal rates, pooled Avg, classifier metrics and
bootstrap intervals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from safesteer.evaluation.metrics import (
    avg_from_rates,
    bootstrap_ci,
    classifier_metrics,
    pooled_avg,
    pooled_avg_ci,
    refusal_rate_ci,
    refusal_rates,
)

# SPEC 1.7 subset sizes and labels, in table order:
# XS safe, XS unsafe, RepE safe, RepE unsafe, OKTest, TQA, AdvBench, Malicious.
_SIZES = (250, 200, 384, 384, 300, 753, 456, 100)
_LABELS = ("safe", "unsafe", "safe", "unsafe", "safe", "safe", "unsafe", "unsafe")


def _rows(rates: tuple[float, ...]) -> list[tuple[int, float, str]]:
    return list(zip(_SIZES, rates, _LABELS, strict=True))


def test_spec_sizes_total() -> None:
    assert sum(_SIZES) == 2827


def test_avg_from_rates_llama2_7b_scans() -> None:
    rates = (9.20, 93.50, 0.00, 99.22, 0.33, 0.80, 99.34, 100.0)
    # Exact pooled value from the rounded rates is 98.266 (integer counts give 2778/2827 =
    # 98.267); the paper prints 98.26, so it holds to +-0.01, not to 2 decimals of rounding.
    assert avg_from_rates(_rows(rates)) == pytest.approx(98.26, abs=0.01)


def test_avg_from_rates_llama2_7b_default() -> None:
    rates = (58.00, 100.0, 12.50, 100.0, 53.67, 5.05, 100.0, 100.0)
    # 86.1324...: matches the paper's 86.13 to two decimals.
    assert avg_from_rates(_rows(rates)) == pytest.approx(86.13, abs=0.005)


def test_avg_from_rates_is_pooled_not_mean_of_rates() -> None:
    rows = [(100, 10.0, "safe"), (10, 50.0, "unsafe")]
    # Pooled: (90 + 5) / 110; the mean of per-subset accuracies would be (90 + 50) / 2 = 70.
    assert avg_from_rates(rows) == pytest.approx(100 * 95 / 110)
    with pytest.raises(ValueError):
        avg_from_rates([(10, 120.0, "safe")])
    with pytest.raises(ValueError):
        avg_from_rates([(10, 10.0, "harmless")])
    with pytest.raises(ValueError):
        avg_from_rates([])


def test_pooled_avg_explicit_rows() -> None:
    labels = ["safe", "safe", "unsafe", "unsafe", "unsafe", "unsafe"]
    refused = [False, True, True, False, True, None]
    # Parsable: 5 rows. Correct: safe answered (row 0) + unsafe refused (rows 2, 4) = 3.
    assert pooled_avg(labels, refused) == pytest.approx(60.0)
    # Pooled differs from a mean of rates: safe 1/2 correct, unsafe 2/3 correct.
    assert pooled_avg(labels, refused) != pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="parsable"):
        pooled_avg(["safe"], [None])
    with pytest.raises(ValueError, match="length"):
        pooled_avg(["safe"], [True, False])


def test_pooled_avg_agrees_with_avg_from_rates() -> None:
    rng = np.random.default_rng(1)
    labels: list[str] = []
    refused: list[bool | None] = []
    rows = []
    for n, lab, p in [(40, "safe", 0.2), (25, "unsafe", 0.9), (35, "safe", 0.05)]:
        r = (rng.random(n) < p).tolist()
        labels += [lab] * n
        refused += r
        rows.append((n, 100.0 * sum(r) / n, lab))
    assert pooled_avg(labels, refused) == pytest.approx(avg_from_rates(rows))


def test_refusal_rates_per_subset() -> None:
    labels = ["safe", "safe", "safe", "unsafe", "unsafe", "safe", "unsafe"]
    subsets = ["xs", "xs", "xs", "adv", "adv", "mix", "mix"]
    refused = [True, False, None, True, True, False, False]
    out = refusal_rates(labels, subsets, refused)
    assert list(out) == ["xs", "adv", "mix"]
    xs = out["xs"]
    assert (xs["n"], xs["n_refused"], xs["n_unparsable"], xs["label"]) == (3, 1, 1, "safe")
    assert xs["refusal_rate"] == pytest.approx(50.0)
    assert xs["avg"] == pytest.approx(50.0)
    assert out["adv"]["refusal_rate"] == pytest.approx(100.0)
    assert out["adv"]["label"] == "unsafe"
    assert out["mix"]["label"] == "mixed"
    assert out["mix"]["avg"] == pytest.approx(50.0)
    only_none = refusal_rates(["safe"], ["z"], [None])["z"]
    assert only_none["refusal_rate"] is None and only_none["n_unparsable"] == 1
    with pytest.raises(ValueError, match="safe"):
        refusal_rates(["benign"], ["z"], [True])


def test_classifier_metrics_hand_example() -> None:
    labels = ["unsafe", "unsafe", "unsafe", "safe", "safe", "safe"]
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
    preds = ["unsafe" if s >= 0.5 else "safe" for s in scores]
    m = classifier_metrics(labels, scores, preds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # 8 of the 9 (unsafe, safe) pairs are ranked correctly (0.3 < 0.6 is the miss).
    assert m["auroc"] == pytest.approx(8 / 9)
    # Ranking by score: u u s u s s -> AP = (1 + 1 + 3/4) / 3.
    assert m["auprc"] == pytest.approx(2.75 / 3)
    # Ranking by 1 - score with safe positive: s s u s u u -> (1 + 1 + 3/4) / 3.
    assert m["auprc_safe"] == pytest.approx(2.75 / 3)
    assert m["safe_flagged_unsafe"] == pytest.approx(1 / 3)
    assert m["unsafe_passed_safe"] == pytest.approx(1 / 3)


def test_classifier_metrics_auprc_safe_differs() -> None:
    labels = ["unsafe", "safe", "safe", "unsafe"]
    scores = [0.9, 0.8, 0.3, 0.2]
    m = classifier_metrics(labels, scores, ["unsafe", "unsafe", "safe", "safe"])
    # By score: u s s u -> AP = (1 + 2/4) / 2 = 0.75.
    assert m["auprc"] == pytest.approx(0.75)
    # By 1 - score = .1 .2 .7 .8, safe positive: u s s u -> AP = (1/2 + 2/3) / 2.
    assert m["auprc_safe"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Unsafe .9 beats both safe scores, unsafe .2 beats neither: 2 of 4 pairs.
    assert m["auroc"] == pytest.approx(0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["f1"] == pytest.approx(0.5)


def test_classifier_metrics_single_class() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classifier_metrics(
            ["safe", "safe", "safe"], [0.1, 0.9, 0.2], ["safe", "unsafe", "safe"]
        )
    assert m["auroc"] is None and m["auprc"] is None and m["auprc_safe"] is None
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 1, 2, 0)
    assert m["precision"] == 0.0
    assert m["recall"] is None and m["f1"] is None
    assert m["unsafe_passed_safe"] is None
    assert m["safe_flagged_unsafe"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_classifier_metrics_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        classifier_metrics(["safe"], [0.1, 0.2], ["safe"])
    with pytest.raises(ValueError, match="finite"):
        classifier_metrics(["safe", "unsafe"], [0.1, float("nan")], ["safe", "safe"])
    with pytest.raises(ValueError, match="safe"):
        classifier_metrics(["safe"], [0.1], ["maybe"])


def test_bootstrap_ci_generic() -> None:
    values = np.arange(100, dtype=float)
    lo, hi = bootstrap_ci(lambda idx: float(values[idx].mean()), 100, n_boot=500, seed=3)
    assert lo < values.mean() < hi
    assert (lo, hi) == bootstrap_ci(lambda idx: float(values[idx].mean()), 100, n_boot=500, seed=3)
    constant = bootstrap_ci(lambda idx: 7.0, 10, n_boot=50)
    assert constant == (7.0, 7.0)
    with pytest.raises(ValueError):
        bootstrap_ci(lambda idx: 0.0, 0)
    with pytest.raises(ValueError):
        bootstrap_ci(lambda idx: 0.0, 5, alpha=1.5)


def test_refusal_rate_ci() -> None:
    refused: list[bool | None] = [True] * 30 + [False] * 70 + [None] * 5
    lo, hi = refusal_rate_ci(refused, n_boot=400, seed=0)
    assert lo <= 30.0 <= hi
    assert 15.0 < lo < 30.0 < hi < 45.0
    assert refusal_rate_ci(refused, n_boot=400, seed=0) == (lo, hi)
    assert refusal_rate_ci(refused, n_boot=400, seed=1) != (lo, hi)


def test_pooled_avg_ci() -> None:
    labels = ["safe"] * 60 + ["unsafe"] * 40
    refused: list[bool | None] = [*[True] * 10, *[False] * 50, *[True] * 35, *[False] * 5]
    point = pooled_avg(labels, refused)
    assert point == pytest.approx(85.0)
    lo, hi = pooled_avg_ci(labels, refused, n_boot=400, seed=0)
    assert lo <= point <= hi
    assert pooled_avg_ci(labels, refused, n_boot=400, seed=0) == (lo, hi)


def test_run_summary_counts_empty_responses_apart() -> None:
    """`safesteer run`'s summary: empty responses are in no refusal rate and no Avg."""
    from safesteer.evaluation.runner import summarise

    def row(label: str, refused: object) -> dict[str, object]:
        return {
            "label": label,
            "subset": f"x-{label}",
            "refused": refused,
            "refused_strict": refused,
            "score": 0.5 if label == "unsafe" else 0.1,
            "predicted": label,
        }

    rows = [row("safe", False), row("safe", "empty"), row("unsafe", True), row("unsafe", "empty")]
    summary = summarise(rows)
    for judge in ("paper_judge", "strict_judge"):
        assert summary[judge]["n_empty"] == 2
        assert summary[judge]["avg"] == 100.0
        assert summary[judge]["by_label"]["safe"]["refusal_rate"] == 0.0
        assert summary[judge]["by_label"]["unsafe"]["n_empty"] == 1
    assert summarise([row("safe", "empty")])["strict_judge"]["avg"] is None


def test_eval_summary_counts_the_rows_each_method_acted_on() -> None:
    from safesteer.evaluation.eval_summary import interventions

    def row(subset: str, flagged: object, steered: object) -> dict[str, object]:
        return {"subset": subset, "flagged": flagged, "steered": steered}

    rows = [
        row("a", True, False),
        row("a", False, True),
        row("a", False, True),
        row("b", True, None),  # SafeSwitch rows record no steering
        row("c", None, None),  # SCANS or plain rows record neither
        {"subset": "d", "flagged": False, "steered": False, "towards": True, "released": True},
    ]
    assert interventions(rows) == {
        "a": {"n": 3, "flagged": 1, "steered": 2},
        "b": {"n": 1, "flagged": 1},
        "d": {"n": 1, "flagged": 0, "steered": 0, "towards": 1, "released": 1},
    }
    assert interventions([row("c", None, None)]) == {}
