"""Reports from a hand-written run directory: Markdown, JSON and PNG figures, no model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from safesteer.evaluation.report import write_report
from safesteer.evaluation.report.data import PLOT_FILES, ReportError, subset_order
from safesteer.evaluation.report.text import render_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLS_LAYERS = [10, 11, 12, 13, 14]
THRESHOLD = 0.3
# (subset, label, benchmark); deliberately not in SCANS Table 2 order.
SUBSETS = [
    ("advbench", "unsafe", "AdvBench"),
    ("oktest", "safe", "OKTest"),
    ("xstest-unsafe", "unsafe", "XSTest"),
    ("xstest-safe", "safe", "XSTest"),
]
# refusal rates per (method, judge, subset)
RATES = {
    ("default", "paper"): {
        "xstest-safe": 58.0,
        "xstest-unsafe": 100.0,
        "oktest": 53.67,
        "advbench": 100.0,
    },
    ("default", "strict"): {
        "xstest-safe": 50.0,
        "xstest-unsafe": 97.5,
        "oktest": 40.0,
        "advbench": 99.0,
    },
    ("scans", "paper"): {
        "xstest-safe": 9.2,
        "xstest-unsafe": 93.5,
        "oktest": 0.33,
        "advbench": 99.34,
    },
    ("scans", "strict"): {
        "xstest-safe": 8.0,
        "xstest-unsafe": 91.0,
        "oktest": 0.5,
        "advbench": 98.0,
    },
}
N_PER_SUBSET = 12


def _responses(with_scores: bool) -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for method in ("default", "scans"):
        idx = 0
        for subset, label, bench in SUBSETS:
            for k in range(N_PER_SUBSET):
                unsafe = label == "unsafe"
                scored = with_scores and method == "scans"
                score = (0.45 if unsafe else 0.15) + rng.gauss(0, 0.1) if scored else None
                cosines = (
                    [(0.2 if unsafe else 0.05) + 0.03 * j + rng.gauss(0, 0.05) for j in range(5)]
                    if scored
                    else None
                )
                paper = rng.random() < (0.9 if unsafe else 0.2)
                strict = paper if k % 4 else not paper
                rows.append(
                    {
                        "method": method,
                        "id": idx,
                        "subset": subset,
                        "benchmark": bench,
                        "label": label,
                        "prompt": f"Prompt {idx} of {subset}: how do I | kill a python process?",
                        "response": f"Response {idx}. I'm sorry, but I cannot help with that.",
                        "score": score,
                        "sigma": None if score is None else (1 if score >= THRESHOLD else -1),
                        "layer_cosines": cosines,
                        "judges": {"paper": paper, "strict": strict, "llm": None},
                        "correct": None,
                    }
                )
                idx += 1
    return rows


def _judge_block(method: str, judge: str, metric: str) -> dict[str, Any]:
    subsets = {}
    for subset, label, bench in SUBSETS:
        rate = RATES[(method, judge)][subset]
        subsets[subset] = {
            "label": label,
            "benchmark": bench,
            "n": 250,
            "n_refused": round(rate * 2.5),
            "n_unparsable": 2 if subset == "oktest" else 0,
            "refusal_rate": rate,
            "refusal_ci95": [max(0.0, rate - 3.0), min(100.0, rate + 3.0)],
            "compliance_rate": 100.0 - rate,
        }
    main = 98.26 if method == "scans" else 86.13
    block: dict[str, Any] = {
        "subsets": subsets,
        "benchmarks": {
            "XSTest": {"avg": main - 1, "avg_ci95": [main - 3, main + 1]},
            "OKTest": {"avg": main - 2, "avg_ci95": None},
            "AdvBench": {"avg": main + 1, "avg_ci95": [main - 1, main + 1.5]},
        },
        "main_avg": main,
        "main_avg_ci95": [main - 0.46, main + 0.44],
        "pooled_avg": main,
        "main_subsets": [s for s, _, _ in SUBSETS],
    }
    if metric == "compliance":
        block["weighted"] = {"TrustLLM": 42.5 if method == "scans" else 61.0}
    return block


def _summary(with_scores: bool, metric: str = "refusal") -> dict[str, Any]:
    methods, judges = ["default", "scans"], ["paper", "strict"]
    classifier: dict[str, Any] = {"default": None}
    classifier["scans"] = (
        {
            "n": 48,
            "tp": 22,
            "fp": 3,
            "tn": 21,
            "fn": 2,
            "precision": 0.88,
            "recall": 0.9167,
            "f1": 0.898,
            "accuracy": 0.8958,
            "auroc": 0.9123,
            "auprc": 0.9351,
            "auprc_safe": 0.9012,
        }
        if with_scores
        else None
    )
    return {
        "suite": "scans-compliance" if metric == "compliance" else "scans-small",
        "metric": metric,
        "n_prompts": 48,
        "methods": methods,
        "judges": judges,
        "results": {m: {j: _judge_block(m, j, metric) for j in judges} for m in methods},
        "classifier": classifier,
        "agreement": {
            m: {
                "paper~strict": {
                    "percent": 75.0,
                    "kappa": 0.48,
                    "n_compared": 48,
                    "disagreements": [0, 4, 8],
                }
            }
            for m in methods
        },
        "utility": {},
    }


def _make_run(
    root: Path, *, with_scores: bool = True, metric: str = "refusal", scans: bool = True
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "suite": "scans-small",
        "methods": ["default", "scans"],
        "judges": ["paper", "strict"],
        "options": {"limit": 12, "seed": 0, "max_new_tokens": 64},
        "scans": {
            "threshold": THRESHOLD,
            "cls_layers": CLS_LAYERS,
            "steer_layers": list(range(10, 21)),
            "alpha": 3.5,
            "alpha_mode": "absolute",
        }
        if scans
        else None,
        "model": "tiny-test-model",
    }
    (root / "settings.json").write_text(json.dumps(settings))
    lines = [json.dumps(r) for r in _responses(with_scores)]
    (root / "responses.jsonl").write_text("\n".join(lines) + "\n")
    (root / "summary.json").write_text(json.dumps(_summary(with_scores, metric)))
    return root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    run = _make_run(tmp_path_factory.mktemp("run") / "full")
    return run, write_report(run)


def test_files_written_and_pngs_valid(full_run: tuple[Path, dict[str, Path]]) -> None:
    run, paths = full_run
    assert set(paths) == {"markdown", "json", *PLOT_FILES}
    assert paths["markdown"] == run / "report.md"
    for name, file in PLOT_FILES.items():
        assert paths[name] == run / file
        data = (run / file).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({file})" in paths["markdown"].read_text()


def test_markdown_tables(full_run: tuple[Path, dict[str, Path]]) -> None:
    md = full_run[1]["markdown"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method") and "↓" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:6] == [
        "Method",
        "xstest-safe ↓",
        "xstest-unsafe ↑",
        "oktest ↓",
        "advbench ↑",
        "Avg ↑",
    ]
    assert "`tiny-test-model`" in md
    assert "judge `paper`" in md and "judge `strict`" in md
    scans_row = next(
        line for line in md.splitlines() if line.startswith("| scans ") and "9.20" in line
    )
    assert "93.50" in scans_row and "0.33" in scans_row and "99.34" in scans_row
    assert "98.26 [97.8, 98.7]" in scans_row
    assert "| default " in md and "58.00" in md and "53.67" in md
    # classifier and confusion matrix
    assert "AUROC" in md and "0.912" in md and "0.935" in md
    assert "TP (unsafe→unsafe)" in md
    # counts: 2 unparsable in oktest; per-benchmark Avg
    assert "(+2 unparsable)" in md and "Per-benchmark Avg" in md
    # agreement with example disagreements taken from responses.jsonl
    assert "Judge agreement" in md and "75.00" in md and "0.480" in md
    assert "Prompt 4 of advbench" in md and "\\|" not in md.split("Example disagreements")[1]
    assert "T = 0.3" in md and "10–20" in md and "α = 3.5 (absolute)" in md
    assert "skipped" not in md


def test_report_json_round_trips(full_run: tuple[Path, dict[str, Path]]) -> None:
    report = json.loads(full_run[1]["json"].read_text())
    paper = report["rates"]["paper"]
    assert [s["name"] for s in paper["subsets"]] == [
        "xstest-safe",
        "xstest-unsafe",
        "oktest",
        "advbench",
    ]
    for (method, judge), rates in RATES.items():
        row = report["rates"][judge]["rows"][method]
        for subset, rate in rates.items():
            assert row["subsets"][subset]["rate"] == pytest.approx(rate)
    scans = paper["rows"]["scans"]
    assert scans["main_avg"] == pytest.approx(98.26)
    assert scans["main_avg_ci95"] == pytest.approx([97.8, 98.7])
    assert scans["subsets"]["xstest-safe"]["ci95"] == pytest.approx([6.2, 12.2])
    assert report["classifier"]["scans"]["auroc"] == pytest.approx(0.9123)
    assert report["classifier"]["scans"]["confusion"] == {"tp": 22, "fp": 3, "tn": 21, "fn": 2}
    assert "default" not in report["classifier"]
    assert report["agreement"]["rows"][0]["n_disagreements"] == 3
    assert len(report["agreement"]["examples"]["paper~strict"]) == 5
    assert report["figures"]["roc"] == "roc.png"
    assert report["settings"]["scans"]["cls_layers"] == CLS_LAYERS


def test_missing_summary_is_a_clear_error(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    (run / "summary.json").unlink()
    with pytest.raises(ReportError, match="safesteer eval"):
        write_report(run)
    with pytest.raises(ReportError, match="not a directory"):
        write_report(tmp_path / "nowhere")


def test_malformed_summary_is_a_clear_error(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(run)


def test_without_scores_plots_are_skipped(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", with_scores=False)
    (run / "roc.png").write_bytes(PNG_MAGIC)  # stale figure from an earlier report
    paths = write_report(run)
    assert set(paths) == {"markdown", "json", "refusal_rates"}
    assert not (run / "roc.png").exists()
    md = paths["markdown"].read_text()
    for name in ("roc.png", "score_hist.png", "layer_cosines.png"):
        assert f"Figure `{name}` skipped" in md
    assert "](refusal_rates.png)" in md and "9.20" in md
    assert "No classifier metrics" in md
    report = json.loads(paths["json"].read_text())
    assert report["figures"]["roc"] is None and report["skipped_figures"]["roc"]


def test_only_summary_renders(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    (run / "responses.jsonl").unlink()
    (run / "settings.json").unlink()
    summary = json.loads((run / "summary.json").read_text())
    summary["utility"] = {"scans": {"triviaqa": {"n": 2000, "accuracy": 54.25}}}
    summary["capability"] = {
        m: {
            "perplexity": {"variant": "chat", "perplexity": ppl, "batch_size": 8},
            "mmlu": {"average": acc, "per_subject": {"law": {"accuracy": 1.0}}},
        }
        for m, ppl, acc in (("default", 7.76, 47.2), ("scans", 9.32, 40.5))
    }
    (run / "summary.json").write_text(json.dumps(summary))
    md = write_report(run)["markdown"].read_text()
    assert "responses.jsonl is missing" in md and "9.20" in md and "0.912" in md
    assert "triviaqa accuracy ↑ (n=2000)" in md and "54.25" in md
    capability = md.split("## Capability")[1]
    assert "perplexity[chat]" in capability and "9.320" in capability
    assert "mmlu.average" in capability and "40.500" in capability
    assert "batch_size" not in capability and "law" not in capability


def test_compliance_suite(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", metric="compliance")
    paths = write_report(run)
    md = paths["markdown"].read_text()
    assert "Compliance rates — judge `paper`" in md
    header = next(line for line in md.splitlines() if line.startswith("| Method") and "↓" in line)
    assert "xstest-safe ↑" in header and "xstest-unsafe ↓" in header and "advbench ↓" in header
    assert "90.80" in md  # 100 - 9.20
    assert "TrustLLM" in md and "42.50" in md
    report = json.loads(paths["json"].read_text())
    row = report["rates"]["paper"]["rows"]["scans"]
    assert row["subsets"]["xstest-safe"]["rate"] == pytest.approx(90.8)
    assert row["weighted"] == {"TrustLLM": 42.5}


def test_artifact_manifest_fills_scans_settings(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", scans=False)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    manifest = {
        "format_version": 1,
        "method": "scans",
        "settings": {"threshold": THRESHOLD, "cls_layers": CLS_LAYERS, "alpha": 3.5},
        "calibration": {"balanced_accuracy": 0.9},
    }
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    paths = write_report(run, artifact_dir=artifact)
    report = json.loads(paths["json"].read_text())
    assert report["settings"]["scans"]["threshold"] == THRESHOLD
    assert "balanced accuracy 0.900" in paths["markdown"].read_text()
    with pytest.raises(ReportError, match="manifest"):
        write_report(run, artifact_dir=tmp_path)


def test_render_table_and_subset_order() -> None:
    table = render_table(["Method", "rate"], [["a|b", 1.5], ["c", "–"]])
    lines = table.splitlines()
    assert lines[0].startswith("| Method") and lines[1].endswith(": |")
    assert "a\\|b" in lines[2] and len({len(x) for x in lines}) == 1
    with pytest.raises(ValueError):
        render_table(["a", "b"], [["only one"]])
    assert subset_order(
        ["zeta", "harmfulq", "malicious", "xstest-unsafe", "alpha", "repe-safe", "xstest-safe"]
    ) == ["xstest-safe", "xstest-unsafe", "repe-safe", "malicious", "harmfulq", "alpha", "zeta"]


def test_example_responses_show_the_first_prompt_where_methods_differ(
    full_run: tuple[Path, dict[str, Path]],
) -> None:
    run, paths = full_run
    report = json.loads(paths["json"].read_text())
    rows = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
    verdict = {(r["method"], r["id"]): r["judges"]["paper"] for r in rows}
    examples = {ex["subset"]: ex for ex in report["examples"]}
    assert list(examples) == subset_order(s for s, _, _ in SUBSETS)
    for subset, _, _ in SUBSETS:
        ids = sorted({r["id"] for r in rows if r["subset"] == subset})
        differ = [i for i in ids if verdict[("default", i)] != verdict[("scans", i)]]
        ex = examples[subset]
        assert ex["judge"] == "paper"
        assert ex["id"] == (differ[0] if differ else ids[0])
        assert ex["verdicts_differ"] is bool(differ)
        assert [r["method"] for r in ex["responses"]] == ["default", "scans"]
        assert {r["verdict"] for r in ex["responses"]} == (
            {True, False} if differ else {verdict[("default", ids[0])]}
        )
    md = paths["markdown"].read_text()
    section = md.split("## Example responses", 1)[1]
    first = examples[subset_order(examples)[0]]
    assert f"Prompt {first['id']} of {first['subset']}" in section
    assert "- **scans** (" in section and "Response " in section


def test_a_run_with_one_subset_shows_three_examples_differing_first(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "one")
    rows = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["subset"] == "oktest"]
    (run / "responses.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = json.loads(write_report(run)["json"].read_text())
    verdict = {(r["method"], r["id"]): r["judges"]["paper"] for r in rows}
    ids = sorted({r["id"] for r in rows})
    differ = [i for i in ids if verdict[("default", i)] != verdict[("scans", i)]]
    expected = (differ + [i for i in ids if i not in differ])[:3]
    assert [ex["id"] for ex in report["examples"]] == expected
    assert {ex["subset"] for ex in report["examples"]} == {"oktest"}


def test_text_quality_counts_looping_replies_per_method_and_subset(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "loops")
    rows = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
    looped = [r for r in rows if r["method"] == "scans" and r["subset"] == "advbench"][:5]
    for r in looped:
        r["response"] = "Sure" + "\n\nI'm sorry" * 8
    (run / "responses.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    paths = write_report(run)
    quality = json.loads(paths["json"].read_text())["text_quality"]["methods"]
    assert quality["scans"]["advbench"]["looping"] == 5
    assert quality["scans"]["advbench"]["n"] == N_PER_SUBSET
    assert quality["default"]["advbench"]["looping"] == 0
    assert all(cell["looping"] == 0 for s, cell in quality["scans"].items() if s != "advbench")
    md = paths["markdown"].read_text()
    line = next(x for x in md.splitlines() if x.startswith("| scans ") and "advbench" in x)
    assert "5 (41.7 %)" in line
