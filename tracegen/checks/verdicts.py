"""Building verdicts on the cheap checks' hot path."""

from __future__ import annotations

from functools import lru_cache

from tracegen.records import Verdict


def verdict(check: str, passed: bool, reason: str, score: float | None = None) -> Verdict:
    """A verdict built without re-validation: the hot path of the cheap checks (types are right by construction)."""
    return Verdict.model_construct(check=check, passed=passed, score=score, reason=reason, judge_model=None, usage=None)


@lru_cache(maxsize=128)
def passing(check: str, reason: str) -> Verdict:
    """Passing verdicts repeat ("unique", "converged in 3 turn(s)"): one shared instance each.

    Verdicts are never modified after they are made, so sharing is safe; it saves building two of the
    three verdicts per sample on the cheap checks' hot path.
    """
    return verdict(check, True, reason)
