"""The live progress bar of ``collect`` (stderr): done / failed / in flight, turns, tokens/s, ETA, cost."""

from __future__ import annotations

import time
from types import TracebackType

from tracegen.config import Prices
from tracegen.progress_bar import ProgressLines, stage_bar
from tracegen.records import AssistantMessage, Trajectory


class CollectProgress:
    def __init__(self, total: int, prices: Prices | None, enabled: bool = True) -> None:
        self.prices = prices
        self.enabled = enabled
        self.done = self.failed = self.in_flight = self.turns = 0
        self.prompt_tokens = self.completion_tokens = 0
        self._started = time.monotonic()
        self.total = total
        self._progress, self._task = stage_bar("collect", total, enabled)
        self._lines = ProgressLines(self.line, enabled)

    def __enter__(self) -> CollectProgress:
        self._progress.start()
        self._lines.__enter__()
        return self

    def line(self) -> str:
        """One plain progress line, for logs that are not a terminal."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return (
            f"collect: {self.done}/{self.total} done, {self.failed} failed, {self.in_flight} in flight, "
            f"{self.turns} turns, {self.done / elapsed:.2f} trajectories/s, "
            f"{self.completion_tokens / elapsed:,.0f} tok/s, {elapsed:.0f} s"
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._refresh()
        self._progress.stop()
        self._lines.__exit__(exc_type, exc, tb)

    def started(self) -> None:
        self.in_flight += 1

    def turn(self, message: AssistantMessage) -> None:
        self.turns += 1
        self.prompt_tokens += message.usage.prompt_tokens
        self.completion_tokens += message.usage.completion_tokens
        if self.enabled:
            self._refresh()

    def finished(self, trajectory: Trajectory) -> None:
        self.in_flight -= 1
        self.done += 1
        self.failed += trajectory.stop_reason == "error"
        if self.enabled:
            self._progress.advance(self._task)
            self._refresh()

    def _refresh(self) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        stats = (
            f"failed {self.failed} · in flight {self.in_flight} · turns {self.turns} · "
            f"{self.completion_tokens / elapsed:,.0f} tok/s"
        )
        if self.prices is not None:
            stats += f" · ${self.prices.cost(self.prompt_tokens, self.completion_tokens):,.4f}"
        self._progress.update(self._task, stats=stats)
