"""``safesteer compare``: rates joined across folders; the Table-2 column only where it applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safesteer.evaluation.compare import collect, compare, markdown
from safesteer.evaluation.paired import (
    paired_changes,
    paired_markdown,
    relative_change,
    sign_test_p,
)


def _folder(root: Path, name: str, rows: list[tuple[str, str, str, bool]]) -> str:
    """An eval folder whose responses.jsonl holds (method, subset, label, refused) rows."""
    folder = root / name
    folder.mkdir()
    lines = [
        json.dumps(
            {
                "method": method,
                "id": i,
                "subset": subset,
                "label": label,
                "prompt": f"p{i}",
                "response": "r",
                "judges": {"strict": refused},
            }
        )
        for i, (method, subset, label, refused) in enumerate(rows)
    ]
    (folder / "responses.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_table2_subsets_get_the_pooled_avg_column(tmp_path: Path) -> None:
    rows = [("scans", "xstest-safe", "safe", False), ("scans", "xstest-unsafe", "unsafe", True)]
    rows += [("scans", "xstest-safe", "safe", True), ("scans", "xstest-unsafe", "unsafe", True)]
    table = compare([_folder(tmp_path, "a", rows)], "strict", n_boot=50)
    entry = table["methods"]["scans"]
    assert entry["subsets"]["xstest-safe"]["refusal"] == 50.0
    assert entry["table2_avg"] == 75.0  # 3 of 4 rows right
    text = markdown(table)
    assert "Table-2 Avg ↑" in text.splitlines()[0]
    assert "75.00" in text


def test_a_suite_without_table2_subsets_has_no_avg_column(tmp_path: Path) -> None:
    rows = [("default", "sorry-bench-eval", "unsafe", False)] * 3
    rows += [("safeswitch", "sorry-bench-eval", "unsafe", True)] * 3
    table = compare([_folder(tmp_path, "a", rows)], "strict", n_boot=50)
    lines = markdown(table).splitlines()
    assert lines[0] == "| method | sorry-bench-eval |"
    assert lines[1] == "|---|---:|"
    assert lines[3].startswith("| safeswitch | 100.0")
    assert all(line.count("|") == 3 for line in lines)


def test_labels_prefix_methods_from_each_folder(tmp_path: Path) -> None:
    one = _folder(tmp_path, "a", [("scans", "oktest", "safe", True)])
    two = _folder(tmp_path, "b", [("scans", "oktest", "safe", False)])
    table = compare([f"{one}=v1", f"{two}=v2"], "strict", n_boot=50)
    assert table["methods"]["v1:scans"]["subsets"]["oktest"]["refusal"] == 100.0
    assert table["methods"]["v2:scans"]["subsets"]["oktest"]["refusal"] == 0.0


def test_on_prompts_of_counts_only_the_prompts_of_a_sample_run(tmp_path: Path) -> None:
    full = [("scans", "oktest", "safe", i < 2) for i in range(6)]  # prompts p0..p5: p0, p1 refused
    sample = [("prompt", "oktest", "safe", True)] * 3  # prompts p0..p2
    a, b = _folder(tmp_path, "full", full), _folder(tmp_path, "sample", sample)
    everything = compare([a, b], "strict", n_boot=50)
    assert everything["methods"]["scans"]["subsets"]["oktest"]["n"] == 6
    same = compare([a, b], "strict", n_boot=50, on_prompts_of=Path(b))
    cell = same["methods"]["scans"]["subsets"]["oktest"]
    assert cell["n"] == 3 and round(cell["refusal"], 1) == 66.7  # p0, p1 of p0..p2
    assert same["methods"]["prompt"]["subsets"]["oktest"]["n"] == 3
    assert same["on_prompts_of"] == b
    twice = _folder(tmp_path, "twice", [("scans", "oktest", "safe", True)] * 2)
    (Path(twice) / "responses.jsonl").write_text(  # the same prompt text twice (ids 0, 1)
        (Path(twice) / "responses.jsonl").read_text().replace('"p1"', '"p0"')
    )
    once = _folder(tmp_path, "once", [("x", "oktest", "safe", True)])
    counted = compare([twice], "strict", n_boot=50, on_prompts_of=Path(once))
    assert counted["methods"]["scans"]["subsets"]["oktest"]["n"] == 1


def test_no_bootstrap_gives_rates_without_intervals(tmp_path: Path) -> None:
    rows = [("scans", "xstest-safe", "safe", False), ("scans", "xstest-unsafe", "unsafe", True)]
    folder = _folder(tmp_path, "a", rows)
    table = compare([folder], "strict", n_boot=0)
    entry = table["methods"]["scans"]
    assert entry["subsets"]["xstest-safe"]["ci95"] is None and entry["table2_avg_ci95"] is None
    assert markdown(table).splitlines()[2] == "| scans | 0.0 (n=1) | 100.0 (n=1) | 100.00 (n=2) |"
    with pytest.raises(ValueError, match="--bootstrap must be 0"):
        compare([folder], "strict", n_boot=-1)


def test_sign_test_matches_the_binomial_by_hand() -> None:
    assert sign_test_p(8, 0) == pytest.approx(2 / 2**8)
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) == 1.0
    assert sign_test_p(1, 4) == pytest.approx(2 * (1 + 5) / 2**5)
    with pytest.raises(ValueError, match="negative"):
        sign_test_p(-1, 2)


def test_paired_counts_match_prompts_by_text_across_runs(tmp_path: Path) -> None:
    """Two runs with the same prompts in another order (other ids): pairs follow the text, and a
    text held twice pairs occurrence by occurrence."""
    first = _folder(
        tmp_path,
        "a",
        [
            ("safeswitch", "xstest-unsafe", "unsafe", True),
            ("safeswitch", "xstest-unsafe", "unsafe", True),
            ("safeswitch", "xstest-safe", "safe", True),
        ],
    )
    rows = [json.loads(x) for x in (Path(first) / "responses.jsonl").read_text().splitlines()]
    rows[1]["prompt"] = rows[0]["prompt"]  # the same text twice
    (Path(first) / "responses.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    second = tmp_path / "b"
    second.mkdir()
    combined = [dict(r, method="combined") for r in reversed(rows)]
    for i, row in enumerate(combined):
        row["id"] = 10 + i
    combined[0]["judges"] = {"strict": False}  # the safe prompt: now answered
    combined[1]["judges"] = {"strict": False}  # one of the two copies: now answered
    (second / "responses.jsonl").write_text("\n".join(json.dumps(r) for r in combined) + "\n")
    paired = paired_changes(collect([first, str(second)]), "safeswitch", "strict")["combined"]
    assert paired["xstest-unsafe"] == {
        "n": 2,
        "refused_by_baseline_only": 1,
        "refused_by_method_only": 0,
        "sign_test_p": 1.0,
        "refused_by_baseline": 2,
        "refused_by_method": 1,
        "change": -0.5,
        "change_ci": paired["xstest-unsafe"]["change_ci"],
    }
    assert paired["all safe"]["refused_by_baseline_only"] == 1
    assert paired["all unsafe"]["n"] == 2
    text = paired_markdown({"combined": paired}, "safeswitch")
    assert "| combined | xstest-safe | 1 | 1 | 0 | 1 | 1 → 0 | -100.0 [-100.0, -100.0] |" in text
    table = compare([first, str(second)], "strict", n_boot=0, paired_against="safeswitch")
    unbooted = table["paired"]["methods"]["combined"]
    assert unbooted["xstest-unsafe"]["change_ci"] is None  # --bootstrap 0: no intervals
    assert {k: {**v, "change_ci": None} for k, v in paired.items()} == unbooted
    assert "| combined | xstest-safe | 1 | 1 | 0 | 1 | 1 → 0 | -100.0 |" in markdown(table)


def test_relative_change_and_its_paired_interval() -> None:
    # 40 prompts: the baseline refuses 20, the method 12 (10 of the same, 2 others)
    baseline = [True] * 20 + [False] * 20
    method = [True] * 10 + [False] * 10 + [True] * 2 + [False] * 18
    cell = relative_change(baseline, method, n_boot=2000, seed=1)
    assert (cell["refused_by_baseline"], cell["refused_by_method"]) == (20, 12)
    assert cell["change"] == pytest.approx(-0.4)
    low, high = cell["change_ci"]
    assert -1.0 <= low < -0.4 < high < 0.0  # fewer refusals, clearly
    assert relative_change(baseline, method, n_boot=2000, seed=1) == cell  # seeded
    same = relative_change(baseline, baseline, n_boot=200)
    assert same["change"] == 0.0 and same["change_ci"] == [0.0, 0.0]
    none = relative_change([False, False], [True, False])
    assert none["change"] is None and none["change_ci"] is None
    assert relative_change(baseline, method, n_boot=0)["change_ci"] is None
    with pytest.raises(ValueError, match="same length"):
        relative_change([True], [True, False])
