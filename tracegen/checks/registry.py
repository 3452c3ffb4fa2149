"""The checks ``tracegen filter`` can run, by name, in the order it runs them (cheapest first)."""

from __future__ import annotations

from collections.abc import Callable

from tracegen.checks.duplicates import DuplicateCheck
from tracegen.checks.judge import JudgeCheck
from tracegen.checks.protocol import Check
from tracegen.checks.reference import ReferenceCheck
from tracegen.checks.replay import ReplayCheck
from tracegen.checks.sandbox import SharedSandbox
from tracegen.checks.structural import StructuralCheck
from tracegen.checks.task_tests import TestsCheck
from tracegen.config import FilterConfig

CHECK_ORDER = ("structural", "duplicate", "reference", "tests", "replay", "judge")


def enabled(config: FilterConfig) -> list[str]:
    """structural always, duplicate unless disabled, then the configured verifiers; in :data:`CHECK_ORDER`."""
    wanted = {"structural", *config.verifiers}
    if config.duplicate.enabled:
        wanted.add("duplicate")
    return [name for name in CHECK_ORDER if name in wanted]


def build_checks(config: FilterConfig) -> list[Check]:
    """The enabled checks, built from their settings; tests and replay share one sandbox."""
    sandbox = SharedSandbox(config.docker)
    registry: dict[str, Callable[[], Check]] = {
        "structural": lambda: StructuralCheck(config.structural),
        "duplicate": lambda: DuplicateCheck(config.duplicate),
        "reference": lambda: ReferenceCheck(config.reference),
        "tests": lambda: TestsCheck(sandbox, config.tests_missing),
        "replay": lambda: ReplayCheck(sandbox, config.replay.reject),
        "judge": lambda: JudgeCheck(config.judge),
    }
    return [registry[name]() for name in enabled(config)]
