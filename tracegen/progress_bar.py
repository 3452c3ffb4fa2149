"""The one progress bar every long stage shows on stderr: name, bar, done/total, live stats, ETA."""

from __future__ import annotations

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
