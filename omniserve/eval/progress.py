"""Live progress while suites run: suite name, items done/total and the score so far.

Fed by the runner from EvalScope's review files (one line per finished item), so it shows what
is actually scored, not what was sent. Disabled (a no-op) when output is not a terminal or the
user asked for quiet output, so logs and CI output stay clean.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class SuiteProgress:
    def __init__(self, console: Console | None = None, *, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("score {task.fields[score]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )

    def __enter__(self) -> SuiteProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, suite: str, total: int) -> TaskID | None:
        if self._progress is None:
            return None
        return self._progress.add_task(suite, total=total, score="-")

    def update(self, task: TaskID | None, done: int, score: float | None) -> None:
        if self._progress is not None and task is not None:
            self._progress.update(task, completed=done, score="-" if score is None else f"{score * 100:.1f}")

    def finish(self, task: TaskID | None, status: str, score: float | None) -> None:
        if self._progress is not None and task is not None:
            shown = "error" if score is None else f"{score * 100:.1f}"
            self._progress.update(task, score=f"{shown} ({status})")
