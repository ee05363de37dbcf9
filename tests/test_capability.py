"""Capability checks: perplexity against a hand computation, MMLU prompts and accuracy, XSum ROUGE.

Tiny in-process models and synthetic data folders keep these fast; the shared data folder is read
where a real file is needed (skipped without it); the embedded model only in two small slow tests.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rouge_score import rouge_scorer
from torch.nn import functional as F

from conftest import BENIGN, CORPUS, HARMFUL, build_tiny
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.datasets.registry import DatasetError, get_spec
from safesteer.evaluation.capability import (
    Intervention,
    _standard_rows,
    perplexity,
    scans_intervention,
)
from safesteer.evaluation.capability_mmlu import (
    format_mmlu_example,
    mmlu,
    mmlu_answer_ids,
    mmlu_prompt,
    read_mmlu_csv,
)
from safesteer.evaluation.capability_xsum import rouge_f1, xsum, xsum_prompt
from safesteer.methods.scans.decide import classify, policy_coefficients
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.settings import ScansSettings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = " ".join(CORPUS)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return build_tiny("llama", seed=11)


def _vectors(lm: LoadedModel, norm: float = 3.0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in (1, 2):
        v = torch.randn(lm.hidden_size, generator=gen)
        out[layer] = norm * v / v.norm()
    return out


def _constant(lm: LoadedModel, value: float) -> Intervention:
    return Intervention(_vectors(lm), lambda texts: torch.full((len(texts),), value), "test")


def _logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


# ------------------------------------------------------------------------------------------
# Perplexity
# ------------------------------------------------------------------------------------------


def test_standard_perplexity_matches_hand_computation(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    window = 24
    span = window - 1  # the tiny tokenizer starts plain text with BOS
    total, count, n_windows = 0.0, 0, 0
    for start in range(0, len(ids), span):
        chunk = ids[start : start + span]
        logits = _logits(lm, [tok.bos_token_id, *chunk])
        total += float(F.cross_entropy(logits[:-1], torch.tensor(chunk), reduction="sum"))
        count += len(chunk)
        n_windows += 1
    result = perplexity(lm, TEXT, window=window, batch_size=3, progress=False)
    assert result["n_tokens"] == count == len(ids) == result["n_text_tokens"]
    assert result["n_windows"] == n_windows == math.ceil(len(ids) / span)
    assert len(ids) % span != 0  # the last window is shorter: padding is exercised
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["variant"] == "standard" and result["window"] == window
    assert result["intervention"] is None
    json.dumps(result)


def test_windows_are_non_overlapping_and_cover_the_text(lm: LoadedModel) -> None:
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows, _ = _standard_rows(lm.tokenizer, ids, 16)
    assert all(len(r.context) + len(r.target) <= 16 for r in rows)
    assert [t for r in rows for t in r.target] == ids
    limited = perplexity(lm, TEXT, window=16, max_windows=2, progress=False)
    assert limited["n_windows"] == 2 and limited["n_tokens"] == 30


def test_chat_perplexity_matches_hand_computation(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    layout = ChatLayout(tok)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    window = 20
    total, count = 0.0, 0
    for start in range(0, 3 * window, window):
        chunk = ids[start : start + window]
        user = tok.decode(chunk[: window // 2], skip_special_tokens=True)
        reply = tok(
            tok.decode(chunk[window // 2 :], skip_special_tokens=True), add_special_tokens=False
        )["input_ids"]
        prompt = layout.prompt_ids(user)
        logits = _logits(lm, prompt + reply)
        scores = logits[len(prompt) - 1 : len(prompt) - 1 + len(reply)]
        total += float(F.cross_entropy(scores, torch.tensor(reply), reduction="sum"))
        count += len(reply)
    result = perplexity(
        lm, TEXT, window=window, max_windows=3, batch_size=3, variant="chat", progress=False
    )
    assert result["n_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert "SCANS-paper variant" in result["note"]


@pytest.mark.parametrize("variant", ["standard", "chat"])
def test_perplexity_with_zero_intervention_equals_without(lm: LoadedModel, variant: str) -> None:
    kwargs: dict[str, Any] = {"window": 20, "max_windows": 3, "batch_size": 2, "progress": False}
    base = perplexity(lm, TEXT, variant=variant, **kwargs)
    zero = perplexity(lm, TEXT, variant=variant, intervention=_constant(lm, 0.0), **kwargs)
    pos = perplexity(lm, TEXT, variant=variant, intervention=_constant(lm, 1.0), **kwargs)
    assert zero["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)
    assert abs(pos["perplexity"] - base["perplexity"]) > 1e-3 * base["perplexity"]
    assert pos["intervention"]["layers"] == [1, 2]
    assert pos["intervention"]["coefficients"]["n_positive"] == 3


def test_perplexity_reads_wikitext_and_fails_clearly(lm: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="wikitext2"):
        perplexity(lm, data_dir=tmp_path / "missing", progress=False)
    folder = tmp_path / "wikitext2"
    folder.mkdir()
    (folder / "wiki.test.raw").write_bytes(b" = Title = \r\n Some text here .\r\n")
    result = perplexity(lm, data_dir=tmp_path, window=32, progress=False)
    expected = lm.tokenizer(" = Title = \n\n Some text here .", add_special_tokens=False)
    assert result["n_tokens"] == len(expected["input_ids"])
    assert result["source"].startswith("wikitext2")


# ------------------------------------------------------------------------------------------
# MMLU
# ------------------------------------------------------------------------------------------

ROW = ("What is 2 + 2?", "3", "4", "5", "6", "B")


def test_mmlu_prompt_format() -> None:
    shot = ("Is the sky blue?", "Yes", "No", "Maybe", "Never", "A")
    expected = (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "Is the sky blue?\nA. Yes\nB. No\nC. Maybe\nD. Never\nAnswer: A\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert mmlu_prompt("high_school_math", [shot], ROW) == expected
    assert format_mmlu_example(ROW) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"


def test_mmlu_prompt_on_real_rows() -> None:
    if not (SHARED / "mmlu").is_dir():
        pytest.skip("shared MMLU data not found")
    dev = read_mmlu_csv(SHARED / "mmlu" / "mmlu_dev" / "abstract_algebra_dev.csv")
    test = read_mmlu_csv(SHARED / "mmlu" / "mmlu_test" / "abstract_algebra_test.csv")
    assert len(dev) == 5 and len(test) == 100
    assert dev[0] == (
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
        "0",
        "1",
        "2",
        "3",
        "B",
    )
    prompt = mmlu_prompt("abstract_algebra", dev[:1], test[0])
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
        "Answer: B\n\n" + test[0][0] + "\nA. "
    )
    assert prompt.endswith(f"\nD. {test[0][4]}\nAnswer:")


def test_mmlu_answer_ids_are_distinct(lm: LoadedModel) -> None:
    ids, rule = mmlu_answer_ids(lm.tokenizer)
    assert len(set(ids)) == 4
    # The tiny tokenizer splits " A" into "Ġ" + "A": the shared "Ġ" is not usable.
    assert rule == "last token of ' X'"
    assert lm.tokenizer.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]


SUBJECTS = ("abstract_algebra", "anatomy")


def _question(subject: str, i: int) -> tuple[str, str, str, str, str, str]:
    return (f"{subject} question {i}?", "cake", "sea", "bank", "dragon", "ABCD"[i % 4])


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file the registry expects; 3 test questions for SUBJECTS, 1 elsewhere."""
    root = tmp_path_factory.mktemp("data")
    for rel in get_spec("mmlu").files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        subject = path.name.rsplit("_", 1)[0]
        n = 5 if "_dev" in path.name else (3 if subject in SUBJECTS else 1)
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows(
                _question(subject, i + 7 * ("_dev" in rel)) for i in range(n)
            )
    return root


def test_mmlu_accuracy_matches_direct_computation(lm: LoadedModel, mmlu_dir: Path) -> None:
    answer_ids, _ = mmlu_answer_ids(lm.tokenizer)
    accuracy = {}
    for subject in SUBJECTS:
        dev = [_question(subject, i + 7) for i in range(5)]
        hits = 0
        for i in range(3):
            row = _question(subject, i)
            ids = lm.tokenizer(mmlu_prompt(subject, dev[:2], row))["input_ids"]
            pred = int(_logits(lm, ids)[-1, answer_ids].argmax())
            hits += int("ABCD"[pred] == row[5])
        accuracy[subject] = 100.0 * hits / 3
    result = mmlu(lm, data_dir=mmlu_dir, subjects=SUBJECTS, k_shot=2, batch_size=4, progress=False)
    assert {s: v["accuracy"] for s, v in result["per_subject"].items()} == pytest.approx(accuracy)
    assert result["average"] == pytest.approx(sum(accuracy.values()) / 2)
    assert result["micro"] == pytest.approx(sum(accuracy.values()) / 2)  # equal subject sizes
    assert result["n_questions"] == 6 and result["n_shots_reduced"] == 0
    json.dumps(result)


def test_mmlu_limits_intervention_and_errors(lm: LoadedModel, mmlu_dir: Path) -> None:
    kwargs: dict[str, Any] = {
        "data_dir": mmlu_dir,
        "subjects": SUBJECTS,
        "k_shot": 1,
        "progress": False,
    }
    base = mmlu(lm, limit_per_subject=2, **kwargs)
    assert base["n_questions"] == 4
    zero = mmlu(lm, limit_per_subject=2, intervention=_constant(lm, 0.0), **kwargs)
    assert zero["per_subject"] == base["per_subject"]
    assert zero["intervention"]["coefficients"]["n_zero"] == 4
    short = mmlu(lm, limit_per_subject=1, max_prompt_tokens=60, **kwargs)
    assert short["n_shots_reduced"] == 2
    with pytest.raises(DatasetError, match="unknown MMLU subjects"):
        mmlu(lm, data_dir=mmlu_dir, subjects=["astrology"], progress=False)
    with pytest.raises(DatasetError, match="mmlu"):
        mmlu(lm, data_dir=mmlu_dir / "missing", progress=False)


# ------------------------------------------------------------------------------------------
# XSum
# ------------------------------------------------------------------------------------------


def test_rouge_matches_rouge_score() -> None:
    predictions = ["The cat sat on the mat.", "Police arrested two men in London."]
    references = ["A cat was sitting on a mat.", "Two men were arrested by police in London."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    result = rouge_f1(predictions, references)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = 100.0 * sum(d[key].fmeasure for d in direct) / 2
        assert result[key] == pytest.approx(want)
        assert [p[key] for p in result["per_pair"]] == pytest.approx(
            [100.0 * d[key].fmeasure for d in direct]
        )


@pytest.fixture(scope="module")
def xsum_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xsum_data")
    (root / "xsum").mkdir()
    records = [
        {"id": str(i), "document": " ".join(CORPUS[i : i + 3]), "summary": CORPUS[i]}
        for i in range(5)
    ]
    (root / "xsum" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_xsum_small_run(lm: LoadedModel, xsum_dir: Path) -> None:
    result = xsum(
        lm, data_dir=xsum_dir, limit=2, max_new_tokens=4, max_document_tokens=30, progress=False
    )
    for key in ("rouge1", "rouge2", "rougeL", "n", "samples", "n_documents_truncated", "seed"):
        assert key in result
    assert result["n"] == 2 and len(result["samples"]) == 2
    assert result["n_documents_truncated"] >= 1
    assert result["max_document_tokens"] == 30
    summaries = [s["summary"] for s in result["samples"]]
    references = [s["reference"] for s in result["samples"]]
    assert result["rouge1"] == pytest.approx(rouge_f1(summaries, references)["rouge1"])
    assert "Based on the previous text" in xsum_prompt("x")
    json.dumps(result)
    zero = xsum(
        lm,
        data_dir=xsum_dir,
        limit=2,
        max_new_tokens=4,
        max_document_tokens=30,
        batch_size=1,
        intervention=_constant(lm, 0.0),
        progress=False,
    )
    assert [s["summary"] for s in zero["samples"]] == summaries


def test_xsum_missing_data_raises(lm: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="xsum"):
        xsum(lm, data_dir=tmp_path / "nowhere", limit=2, max_new_tokens=4, progress=False)


# ------------------------------------------------------------------------------------------
# SCANS interventions
# ------------------------------------------------------------------------------------------


def test_scans_intervention_modes(lm: LoadedModel) -> None:
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    texts = [HARMFUL[0], BENIGN[0], BENIGN[1]]
    sigma = [float(d.sigma) for d in classify(lm, artifact, texts)]
    by_class = scans_intervention(lm, artifact)
    assert by_class.coefficients(texts).tolist() == sigma
    assert set(by_class.vectors) == {1, 2}
    assert scans_intervention(lm, artifact, "safe").coefficients(texts).tolist() == [-1.0] * 3
    assert scans_intervention(lm, artifact, "unsafe").coefficients(texts).tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="2 coefficients for 3 texts"):
        Intervention({}, lambda t: torch.zeros(2)).coefficients(texts)


@pytest.mark.parametrize("policy", ["away-only", "banded"])
def test_scans_intervention_follows_the_artifacts_policy(lm: LoadedModel, policy: str) -> None:
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    fitted = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    texts = [*HARMFUL[:3], *BENIGN[:3]]
    decisions = classify(lm, fitted, texts)
    # banded: the band [T, toward) holds the middle score, so one row is left unsteered
    scores = sorted(d.score for d in decisions)
    toward = scores[-1] + 1.0 if policy == "away-only" else scores[-2]
    artifact = fitted.with_settings(
        policy=policy, threshold=scores[2], toward_threshold=toward if policy == "banded" else None
    )
    decisions = classify(lm, artifact, texts)
    got = scans_intervention(lm, artifact).coefficients(texts).tolist()
    assert got == policy_coefficients(artifact)(decisions).tolist()
    assert 0.0 in got  # not SCANS' signed sigma, which is never 0
    assert got != [float(d.sigma) for d in decisions]


# ------------------------------------------------------------------------------------------
# The embedded model (slow)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_answer_tokens(embedded: LoadedModel) -> None:
    ids, rule = mmlu_answer_ids(embedded.tokenizer)
    assert rule == "first token of ' X'" and len(set(ids)) == 4


@pytest.mark.slow
def test_embedded_perplexity_is_sane(embedded: LoadedModel) -> None:
    text = (
        "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and "
        "its cafes. Millions of tourists visit the city every year to see its monuments."
    )
    result = perplexity(embedded, text, window=32, batch_size=2, progress=False)
    assert result["prefix"].startswith("none")  # SmolLM2 adds no BOS to plain text
    assert 1.0 < result["perplexity"] < 200.0
