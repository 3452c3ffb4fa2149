"""The one progress bar every long stage shows on stderr: name, bar, done/total, live stats, ETA.

When stderr is not a terminal (nohup, CI logs) a bar cannot redraw, so :class:`ProgressLines` writes
one plain line every ``$TRACEGEN_PROGRESS_EVERY_S`` seconds (default 30) instead.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class StageBar(NamedTuple):
    progress: Progress
    """Start/stop it as a context manager; ``update(task, stats=...)`` sets the stats text."""
    task: TaskID


def stage_bar(name: str, total: int, enabled: bool, stats: bool = True) -> StageBar:
    """A bar for ``total`` items of stage ``name``; silent (but still countable) when not ``enabled``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(name), BarColumn(), MofNCompleteColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    progress = Progress(
        *columns,
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        refresh_per_second=4,
    )
    return StageBar(progress, progress.add_task(name, total=total, stats=""))


def progress_interval_s() -> float:
    """Seconds between plain progress lines (``$TRACEGEN_PROGRESS_EVERY_S``, default 30)."""
    try:
        return max(0.1, float(os.environ.get("TRACEGEN_PROGRESS_EVERY_S", "30")))
    except ValueError:
        return 30.0


class ProgressLines:
    """A background thread printing ``line()`` to stderr every interval while the block runs, and once
    at its end; does nothing when stderr is a terminal (the bar shows there) or when not ``enabled``."""

    def __init__(self, line: Callable[[], str], enabled: bool) -> None:
        self._line = line
        self._active = enabled and not sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress-lines", daemon=True)

    def __enter__(self) -> ProgressLines:
        if self._active:
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._active:
            self._stop.set()
            self._thread.join()
            self._emit()

    def _loop(self) -> None:
        interval = progress_interval_s()
        while not self._stop.wait(interval):
            self._emit()

    def _emit(self) -> None:
        print(self._line(), file=sys.stderr, flush=True)
