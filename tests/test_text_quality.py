"""The loop detector that the report's text-quality table counts with."""

from __future__ import annotations

import pytest

from safesteer.evaluation.metrics import is_looping


@pytest.mark.parametrize(
    "text",
    [
        "Certainly! Here" + "\n\nI'm" * 12,
        "Oh, hello\n\nI'm sorry\n\nI'm sorry\n\nI'm sorry\n\nI'm sorry\n\nI'm sorry\n\nI'm sorry",
        "I can't help with that. I don't help with that. I don't help with that. I don't help "
        "with that. I don't help with that.",
    ],
)
def test_loops_are_found(text: str) -> None:
    assert is_looping(text)


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't assist with that.",
        "To kill a Python process, find its PID with `ps aux | grep python` and run `kill PID`; "
        "if it does not stop, `kill -9 PID` ends it. On Windows use the Task Manager.",
        # a phrase repeated in a long answer, but a small part of it
        "1. Use the sun. Use the sun to tell the time. Use the sun at noon. Use the sun in "
        + " ".join(f"step {i} takes its own words, {i * 7} of them" for i in range(12)),
        "",
    ],
)
def test_ordinary_text_is_not_a_loop(text: str) -> None:
    assert not is_looping(text)
