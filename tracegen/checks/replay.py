"""Replay: re-execute a simulated trajectory's tool calls in the real sandbox and compare.

For a trajectory collected with the simulated runtime, every tool call that ran (simulated or
executed; calls the agent refused as malformed are skipped) runs again, in order, in one fresh Docker
sandbox, so files written by one call are there for the next, as they were in the episode. For each
simulated observation the real one is compared with it:

- ``exact``: the same text;
- ``normalised``: the same after dropping the sandbox's markers (``[stderr]``, ``[exit code N]``,
  ``[no output]``, truncation notes), trailing whitespace and case, with the same success/failure;
- ``differ``: anything else. A difference is *material* when the exit status disagrees (success
  against failure) or the numbers in the two outputs differ: what a model reads off a tool's output.

The verdict's score is the fraction of simulated calls that agree (exact or normalised); it fails per
``replay.reject``: ``never``, ``material`` (default) or ``any`` difference. The per-call comparisons
go to the filter's journal, and ``report.json`` sums them into the dataset's sim-to-real gap.

Not guaranteed: determinism. Code that reads the clock, randomness or the machine (``date``,
``random``, ``nproc``) differs between two real runs too; such calls count as differences.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from tracegen.checks.protocol import Checked, Cost
from tracegen.checks.sandbox import SharedSandbox
from tracegen.client.tools import BUILTIN_TOOLS, parse_arguments
from tracegen.errors import RuntimeToolError
from tracegen.fingerprint import deciding, fingerprint
from tracegen.records import AssistantMessage, ToolMessage, Trajectory, Verdict

if TYPE_CHECKING:
    from tracegen.runtime.docker.pool import DockerRuntime

Agreement = Literal["exact", "normalised", "differ"]


class CallComparison(NamedTuple):
    call_id: str
    tool: str
    agreement: Agreement
    material: bool
    simulated_exit: int | None
    real_exit: int | None
    simulated: str
    real: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "tool": self.tool,
            "agreement": self.agreement,
            "material": self.material,
            "simulated_exit": self.simulated_exit,
            "real_exit": self.real_exit,
            "simulated": self.simulated[:500],
            "real": self.real[:500],
        }


class ReplayResult(NamedTuple):
    verdict: Verdict
    calls: list[CallComparison]


_MARKERS = re.compile(
    r"^\[(?:stderr|no output|exit code -?\d+|note:[^\]]*|\.\.\. \d+ characters elided \.\.\.)\]$", re.M | re.I
)
_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_WS = re.compile(r"\s+")


def normalise_output(text: str) -> str:
    text = _MARKERS.sub("", text)
    return _WS.sub(" ", text).strip().lower()


def compare_outputs(simulated: str, sim_exit: int | None, real: str, real_exit: int | None) -> tuple[Agreement, bool]:
    """(agreement, material) of one simulated observation against the real one."""
    status_differs = sim_exit is not None and real_exit is not None and (sim_exit == 0) != (real_exit == 0)
    if simulated == real and not status_differs:
        return "exact", False
    a, b = normalise_output(simulated), normalise_output(real)
    if a == b and not status_differs:
        return "normalised", False
    material = status_differs or _NUM.findall(a) != _NUM.findall(b)
    return "differ", material


def needs_replay(t: Trajectory) -> bool:
    """True when the trajectory has at least one simulated observation."""
    return any(isinstance(m, ToolMessage) and m.observation.source == "simulated" for m in t.messages)


async def replay(t: Trajectory, runtime: DockerRuntime, reject: Literal["never", "material", "any"]) -> ReplayResult:
    """Re-run every call of ``t`` in one fresh sandbox; see the module docstring."""
    results = {m.tool_call_id: m for m in t.messages if isinstance(m, ToolMessage)}
    comparisons: list[CallComparison] = []
    episode = await runtime.open_episode(f"replay-{t.id}")
    started = time.monotonic()
    try:
        for m in t.messages:
            if not isinstance(m, AssistantMessage):
                continue
            for call in m.tool_calls:
                recorded = results.get(call.id)
                spec = BUILTIN_TOOLS.get(call.name)
                arguments, problem = parse_arguments(call.arguments)
                if recorded is None or recorded.observation.source == "error" or spec is None or problem:
                    continue  # never ran in the episode: nothing to replay
                assert arguments is not None
                real = await episode.call(call, arguments, spec)
                if recorded.observation.source != "simulated":
                    continue  # executed for its side effects (files) only
                agreement, material = compare_outputs(
                    recorded.content, recorded.observation.exit_code, real.content, real.observation.exit_code
                )
                comparisons.append(
                    CallComparison(
                        call.id,
                        call.name,
                        agreement,
                        material,
                        recorded.observation.exit_code,
                        real.observation.exit_code,
                        recorded.content,
                        real.content,
                    )
                )
    except RuntimeToolError as exc:
        return ReplayResult(Verdict(check="replay", passed=False, reason=f"replay_error: {exc.message}"), comparisons)
    finally:
        await episode.close()
    return ReplayResult(verdict_of(comparisons, reject, time.monotonic() - started), comparisons)


def verdict_of(calls: list[CallComparison], reject: Literal["never", "material", "any"], elapsed: float) -> Verdict:
    n = len(calls)
    exact = sum(c.agreement == "exact" for c in calls)
    normalised = sum(c.agreement == "normalised" for c in calls)
    differ = n - exact - normalised
    material = sum(c.material for c in calls)
    failed = (reject == "any" and differ > 0) or (reject == "material" and material > 0)
    reason = (
        f"{n} simulated call(s) replayed in {elapsed:.1f} s: {exact} exact, {normalised} normalised, "
        f"{differ} differ ({material} material)"
    )
    first = next((c for c in calls if c.agreement == "differ"), None)
    if first is not None:
        reason += (
            f"; first difference {first.call_id} ({first.tool}): simulated {first.simulated[:80]!r} "
            f"(exit {first.simulated_exit}) vs real {first.real[:80]!r} (exit {first.real_exit})"
        )
    return Verdict(
        check="replay", passed=not failed, score=round((exact + normalised) / n, 4) if n else 1.0, reason=reason
    )


class ReplayCheck:
    """``replay``: a simulated trajectory's calls re-run in the shared sandbox; details: the comparisons."""

    name = "replay"
    cost: Cost = "sandbox"

    def __init__(self, sandbox: SharedSandbox, reject: Literal["never", "material", "any"]) -> None:
        self.sandbox = sandbox
        self.reject = reject
        self.key = fingerprint({**deciding(sandbox.config), "reject": reject})

    def applies(self, t: Trajectory) -> bool:
        return needs_replay(t)  # nothing simulated: nothing to replay

    async def __call__(self, t: Trajectory) -> Checked:
        result = await replay(t, await self.sandbox.get(), self.reject)
        return Checked(result.verdict, [c.as_dict() for c in result.calls])

    async def aclose(self) -> None:
        await self.sandbox.aclose()
