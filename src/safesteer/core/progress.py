"""Progress bars for long jobs that also leave a trace in a log file.

Rich draws a live bar only on a terminal; with output redirected (``nohup safesteer eval … >
run.log``, the usual way to run a long CPU job) it prints nothing until the job ends. The bar
made here prints a plain line instead, at most once a minute and at the end, with the rows done,
the time spent and a rough time left.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

LOG_EVERY_S = 60.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class LoggedProgress(Progress):
    """A rich ``Progress`` that writes a plain status line when its console is not a terminal."""

    def __init__(
        self, *columns: str | ProgressColumn, log_every_s: float = LOG_EVERY_S, **kwargs: Any
    ) -> None:
        super().__init__(*columns, **kwargs)
        self.log_every_s = log_every_s
        self._logged_at: dict[TaskID, float] = {}
        self._started: dict[TaskID, tuple[float, float]] = {}

    def _logs(self) -> bool:
        return not self.disable and not self.console.is_terminal

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        now = time.monotonic()
        self._started[task_id] = (now, self._tasks[task_id].completed)
        self._logged_at[task_id] = now
        return task_id

    def update(self, task_id: TaskID, *args: Any, **kwargs: Any) -> None:
        super().update(task_id, *args, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def status_line(self, task_id: TaskID) -> str:
        """``description: done/total (share), time spent, about time left``."""
        task = self._tasks[task_id]
        started, done_at_start = self._started[task_id]
        spent = time.monotonic() - started
        line = f"{task.description}: {task.completed:g}"
        if task.total:
            line += f"/{task.total:g} ({100 * task.completed / task.total:.1f} %)"
        line += f", {_clock(spent)} spent"
        new = task.completed - done_at_start
        if task.total and new > 0 and task.completed < task.total:
            left = (task.total - task.completed) * spent / new
            line += f", about {_clock(left)} left"
        return line

    def _maybe_log(self, task_id: TaskID) -> None:
        if not self._logs() or task_id not in self._started:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if finished or now - self._logged_at[task_id] >= self.log_every_s:
            self._logged_at[task_id] = now
            self.console.print(self.status_line(task_id), highlight=False, markup=False)


def row_progress(
    console: Console | None = None,
    *,
    enabled: bool = True,
    unit: str = "",
    log_every_s: float = LOG_EVERY_S,
) -> LoggedProgress:
    """The project's progress bar: description, bar, done/total, time spent."""
    columns: list[str | ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    return LoggedProgress(*columns, console=console, disable=not enabled, log_every_s=log_every_s)
