"""The demo's table and examples, built from judged rows (no generation here)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from safesteer.evaluation.demo import changed_examples, demo_table


def _row(method: str, i: int, label: str, refused: bool) -> dict[str, Any]:
    return {
        "method": method,
        "id": i,
        "label": label,
        "prompt": f"prompt {i}",
        "response": "I'm sorry." if refused else "Sure, here it is.",
        "judges": {"strict": refused, "paper": refused},
        "score": 0.1,
    }


def test_changed_examples_pick_rows_whose_verdict_differs() -> None:
    rows = {}
    for i, (label, before, after) in enumerate(
        [
            ("safe", True, False),
            ("safe", True, True),
            ("unsafe", False, True),
            ("safe", True, False),
        ]
    ):
        rows[("default", i)] = _row("default", i, label, before)
        rows[("scans", i)] = _row("scans", i, label, after)
    safe = changed_examples(rows, "safe", 5)
    assert [base["id"] for base, _ in safe] == [0, 3]
    assert all(b["judges"]["strict"] and not s["judges"]["strict"] for b, s in safe)
    assert [b["id"] for b, _ in changed_examples(rows, "unsafe", 5)] == [2]
    assert len(changed_examples(rows, "safe", 1)) == 1


def test_demo_table_shows_both_halves_per_method_and_judge() -> None:
    block = {
        "subsets": {
            "xstest-safe": {"refusal_rate": 40.0, "refusal_ci95": [30.0, 50.0]},
            "xstest-unsafe": {"refusal_rate": 80.0, "refusal_ci95": [70.0, 90.0]},
        },
        "main_avg": 70.0,
    }
    summary = {
        "n_prompts": 60,
        "methods": ["default", "scans"],
        "judges": ["strict"],
        "results": {"default": {"strict": block}, "scans": {"strict": block}},
    }
    console = Console(width=120, record=True)
    console.print(demo_table(summary))
    text = console.export_text()
    assert "40.0 [30-50]" in text and "80.0 [70-90]" in text
    assert text.count("strict") == 2 and "scans" in text
