"""The one progress reporter every long step uses: bars (rich) and status lines.

Passes, calibration, fine-tuning and tuning take a :class:`Reporter` (or ``True``/``False``,
turned into one by :meth:`Reporter.of`). A quiet reporter (``--json`` output, tests,
benchmarks) prints nothing at all, so machine-readable stdout stays clean. Status lines go
to stdout, flushed at once (they are read live in logs). On a terminal a bar is rich's,
redrawn in place; elsewhere (CI logs, pipes) it is a plain line at every tenth of the way,
never a bar cut to 80 columns.
"""

from __future__ import annotations

import sys
import time
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


class LineBar(Bar):
    """A bar for logs: one full line each time another tenth of the total is done."""

    def __init__(self, description: str, total: float | None, stream: Any) -> None:
        super().__init__(None, None)
        self.description, self.total, self.stream = description, total, stream
        self.done, self.status, self._shown = 0.0, "", -1
        self._t0 = time.perf_counter()

    def advance(self, steps: float = 1) -> None:
        self.done += steps
        self._show()

    def update(self, completed: float | None = None, status: str | None = None) -> None:
        if completed is not None:
            self.done = completed
        if status is not None:
            self.status = status
        self._show()

    def _show(self, final: bool = False) -> None:
        tenth = int(10 * self.done / self.total) if self.total else 0
        if tenth == self._shown and not final:
            return
        self._shown = tenth
        count = f"{self.done:g}/{self.total:g}" if self.total else f"{self.done:g}"
        status = f" {self.status}" if self.status else ""
        print(f"{self.description}: {count}{status} ({time.perf_counter() - self._t0:.0f} s)",
              file=self.stream, flush=True)


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
        stream = self.stream or sys.stdout
        if not stream.isatty():
            bar = LineBar(description, total, stream)
            yield bar
            if bar.done and bar._shown != (int(10 * bar.done / bar.total) if bar.total else 0):
                bar._show(final=True)
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if remaining:
            columns.append(TimeRemainingColumn())
        columns.append(TextColumn("{task.fields[status]}"))
        with Progress(*columns, transient=transient) as progress:
            yield Bar(progress, progress.add_task(description, total=total, status=""))


def console(stderr: bool = False, file: Any = None) -> Any:
    """A rich console for tables and messages: the terminal's width on a terminal; in a log
    or a pipe, wide enough that no table column is cut (rich would assume 80 columns)."""
    from rich.console import Console

    stream = file or (sys.stderr if stderr else sys.stdout)
    return Console(file=stream, highlight=False, width=None if stream.isatty() else 240)
