"""The one progress reporter every long step uses: bars (rich) and status lines.

Passes, calibration, fine-tuning and tuning take a :class:`Reporter` (or ``True``/``False``,
turned into one by :meth:`Reporter.of`). A quiet reporter (``--json`` output, tests,
benchmarks) prints nothing at all, so machine-readable stdout stays clean. Status lines go
to stdout, flushed at once (they are read live in logs); bars are rich's, which redraw in
place on a terminal and print once otherwise.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator


class Bar:
    """One task's bar: :meth:`advance` by steps, :meth:`update` to a count or status text."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, steps: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def update(self, completed: float | None = None, status: str | None = None) -> None:
        if self._progress is not None:
            fields: dict[str, Any] = {}
            if completed is not None:
                fields["completed"] = completed
            if status is not None:
                fields["status"] = status
            self._progress.update(self._task, **fields)


class Reporter:
    """Progress for a run: ``enabled=False`` is silent."""

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream

    @classmethod
    def of(cls, progress: "bool | Reporter | None") -> "Reporter":
        """A reporter from what callers pass: a Reporter, or whether to report at all."""
        return progress if isinstance(progress, Reporter) else cls(bool(progress))

    def line(self, text: str) -> None:
        """A status line (a layer rewritten, a fine-tuning step)."""
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    @contextmanager
    def bar(self, description: str, total: float | None, *, transient: bool = True,
            remaining: bool = False) -> Iterator[Bar]:
        """A bar of ``total`` steps for the duration of the ``with`` block; its ``status``
        text (set through :meth:`Bar.update`) shows after the count."""
        if not self.enabled:
            yield Bar(None, None)
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if remaining:
            columns.append(TimeRemainingColumn())
        columns.append(TextColumn("{task.fields[status]}"))
        with Progress(*columns, transient=transient) as progress:
            yield Bar(progress, progress.add_task(description, total=total, status=""))
