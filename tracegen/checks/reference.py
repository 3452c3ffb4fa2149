"""The ``reference`` check: the final answer against the task's reference (rules in :mod:`tracegen.checks.answers`)."""

from __future__ import annotations

from tracegen.checks.answers import compare
from tracegen.checks.protocol import Checked, Cost
from tracegen.checks.verdicts import verdict
from tracegen.config import ReferenceCheckConfig
from tracegen.records import Trajectory, Verdict


def reference_verdict(t: Trajectory, config: ReferenceCheckConfig) -> Verdict | None:
    """The ``reference`` verdict, or None when the task has no reference and missing=skip."""
    reference = t.task.reference
    if reference is None or not reference.strip():
        if config.missing == "skip":
            return None
        return Verdict(check="reference", passed=False, reason="task has no reference (reference.missing=reject)")
    result = compare(t.final_answer or "", reference, config)
    shown = result.candidate if len(result.candidate) <= 80 else result.candidate[:77] + "..."
    ref_shown = reference.strip() if len(reference.strip()) <= 80 else reference.strip()[:77] + "..."
    relation = "==" if result.equal else "!="
    return verdict(
        "reference", result.equal, f"{result.rule}: {shown!r} {relation} reference {ref_shown!r}", float(result.equal)
    )


class ReferenceCheck:
    name = "reference"
    cost: Cost = "cheap"
    key = ""

    def __init__(self, config: ReferenceCheckConfig) -> None:
        self.config = config

    def applies(self, t: Trajectory) -> bool:
        return self.config.missing == "reject" or bool(t.task.reference and t.task.reference.strip())

    async def __call__(self, t: Trajectory) -> Checked:
        result = reference_verdict(t, self.config)
        assert result is not None  # applies() said there is something to check
        return Checked(result)

    async def aclose(self) -> None:
        pass
