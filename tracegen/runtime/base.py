"""The runtime protocol the agent loop talks to.

A :class:`Runtime` lives for a whole ``collect`` run; it opens one :class:`Episode` per trajectory.
State (files, processes, the simulator's memory of earlier calls) persists across the calls of one
episode and never leaks into another.

``Episode.call`` returns a :class:`ToolOutput` for anything the tool itself did, including a
non-zero exit, a timeout or an out-of-memory kill: those are observations the teacher must see.
It raises :class:`tracegen.errors.RuntimeToolError` only when the runtime could not run the call
at all (the engine is gone, the simulator API failed after retries); the agent records that as a
trajectory error.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from tracegen.records import Observation, RuntimeInfo, ToolCall, ToolSpec


class ToolOutput(NamedTuple):
    content: str
    """What the teacher sees (already capped/truncated for the model)."""
    observation: Observation


class Episode(Protocol):
    async def call(self, call: ToolCall, arguments: dict[str, Any], spec: ToolSpec) -> ToolOutput:
        """Run one tool call whose arguments already parsed; see the module docstring for raises."""
        ...

    async def close(self) -> None:
        """Release the episode's resources. Never raises."""
        ...


class Runtime(Protocol):
    def info(self) -> RuntimeInfo:
        """What goes into ``Trajectory.runtime`` (kind, image or simulator model)."""
        ...

    async def start(self) -> None:
        """Prepare shared resources (pools, clients) before the first episode."""
        ...

    async def open_episode(self, trajectory_id: str) -> Episode:
        """A fresh, isolated episode for one trajectory."""
        ...

    async def aclose(self) -> None:
        """Release everything this runtime created, also after errors. Never raises."""
        ...
