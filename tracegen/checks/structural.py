"""The ``structural`` check: the trajectory converged to a well-formed final answer within the bounds."""

from __future__ import annotations

import re

from tracegen.checks.protocol import Checked, Cost
from tracegen.checks.verdicts import passing, verdict
from tracegen.config import StructuralCheckConfig
from tracegen.records import AssistantMessage, Trajectory, Verdict


def structural_verdict(t: Trajectory, config: StructuralCheckConfig, pattern: re.Pattern[str] | None = None) -> Verdict:
    """Converged, no recorded error, a final answer, well-formed tool calls, within the bounds."""
    problems: list[str] = []
    if t.stop_reason != "answer":
        problems.append(f"stop_reason={t.stop_reason}")
    last: AssistantMessage | None = None
    turns = 0
    offered = {s.name for s in t.tools}
    for m in t.messages:
        if isinstance(m, AssistantMessage):
            turns += 1
            last = m
            if not config.allow_malformed_calls:
                for call in m.tool_calls:
                    if call.parse_error is not None:
                        problems.append(f"malformed tool call {call.id}: {call.parse_error}")
                    elif call.name not in offered:
                        problems.append(f"tool call {call.id} names unknown tool {call.name!r}")
    if last is None:
        problems.append("no assistant message")
    elif last.finish_reason != "stop":
        problems.append(f"last finish_reason={last.finish_reason}")
    if t.errors:
        problems.append(f"{len(t.errors)} recorded error(s): {t.errors[0].kind}: {t.errors[0].message[:120]}")
    answer = t.final_answer
    if not answer or not answer.strip():
        problems.append("no final answer")
    elif pattern is not None and not pattern.search(answer):
        problems.append(f"final answer does not match answer_pattern {pattern.pattern!r}")
    if config.max_turns is not None and turns > config.max_turns:
        problems.append(f"{turns} turns > max_turns {config.max_turns}")
    if config.max_completion_tokens is not None and t.usage.completion_tokens > config.max_completion_tokens:
        problems.append(f"{t.usage.completion_tokens} completion tokens > {config.max_completion_tokens}")
    if problems:
        return verdict("structural", False, "; ".join(problems))
    return passing("structural", f"converged in {turns} turn(s)")


class StructuralCheck:
    name = "structural"
    cost: Cost = "cheap"
    key = ""

    def __init__(self, config: StructuralCheckConfig) -> None:
        self.config = config
        self.pattern = re.compile(config.answer_pattern) if config.answer_pattern else None

    def applies(self, t: Trajectory) -> bool:
        return True

    async def __call__(self, t: Trajectory) -> Checked:
        return Checked(structural_verdict(t, self.config, self.pattern))

    async def aclose(self) -> None:
        pass
