"""What a check of ``tracegen filter`` is: one async protocol that the filter orchestrates.

A check has a ``name`` (the ``check`` of its verdicts and its journal key), a ``cost`` class, a
``key`` (a fingerprint of the settings that decide its verdicts) and:

- ``applies(t)``: whether it has anything to say about this sample (cheap, synchronous: the filter
  plans with it before starting a sandbox or a client);
- ``await check(t)``: the verdict, with optional JSON ``details`` journaled beside it (replay's
  per-call comparisons, the original a duplicate repeats);
- ``await check.aclose()``: release what it started.

The cost class decides how the filter runs it. ``cheap`` checks are pure functions of the records
(microseconds): run on every run in input order (the duplicate check depends on that order) and never
journaled. ``sandbox`` checks run code in Docker and ``model`` checks call an API: they run
concurrently, each class within its own concurrency, and every verdict is journaled under ``key``
so a re-run reuses it.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

from tracegen.records import Trajectory, Verdict

Cost = Literal["cheap", "sandbox", "model"]


class Checked(NamedTuple):
    verdict: Verdict
    details: Any = None
    """JSON-able facts behind the verdict, journaled with it (None: nothing to add)."""


class Check(Protocol):
    name: str
    cost: Cost
    key: str

    def applies(self, t: Trajectory) -> bool: ...

    async def __call__(self, t: Trajectory) -> Checked: ...

    async def aclose(self) -> None: ...
