"""The progress bar leaves plain status lines in a log when its output is not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from safesteer.core.progress import row_progress


def _run(console: Console, *, enabled: bool = True, every: float = 0.0) -> None:
    with row_progress(console, enabled=enabled, log_every_s=every) as progress:
        task = progress.add_task("evaluating (scans)", total=4, completed=1)
        for _ in range(3):
            progress.advance(task)


def test_a_log_file_gets_one_line_per_update_with_counts_and_time_left() -> None:
    log = io.StringIO()
    _run(Console(file=log, force_terminal=False, width=200))
    lines = [line for line in log.getvalue().splitlines() if line.startswith("evaluating (scans):")]
    assert [line.split(",")[0] for line in lines[:3]] == [
        "evaluating (scans): 2/4 (50.0 %)",
        "evaluating (scans): 3/4 (75.0 %)",
        "evaluating (scans): 4/4 (100.0 %)",
    ]
    assert "left" in lines[0] and "spent" in lines[0]
    assert "left" not in lines[2]  # finished


def test_the_interval_limits_lines_but_the_end_is_always_logged() -> None:
    log = io.StringIO()
    _run(Console(file=log, force_terminal=False, width=200), every=3600.0)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("evaluating (scans):")]
    assert lines[0].startswith("evaluating (scans): 4/4 (100.0 %)")
    assert len(lines) == 1


def test_a_terminal_gets_the_live_bar_and_no_status_lines() -> None:
    log = io.StringIO()
    _run(Console(file=log, force_terminal=True, width=200))
    assert "(50.0 %)" not in log.getvalue()


def test_a_disabled_bar_prints_nothing() -> None:
    log = io.StringIO()
    _run(Console(file=log, force_terminal=False, width=200), enabled=False)
    assert log.getvalue() == ""
