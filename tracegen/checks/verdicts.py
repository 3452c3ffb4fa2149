"""Building verdicts on the cheap checks' hot path."""

from __future__ import annotations

from functools import lru_cache

from tracegen.records import Verdict

_ALL_FIELDS = frozenset(Verdict.model_fields)


def verdict(check: str, passed: bool, reason: str, score: float | None = None) -> Verdict:
    """A verdict built without re-validation: the hot path of the cheap checks (types are right by construction).

    What ``Verdict.model_construct`` builds (every field set), at less than half its cost: the
    reference check makes one per sample.
    """
    made = Verdict.__new__(Verdict)
    fields = {"check": check, "passed": passed, "score": score, "reason": reason, "judge_model": None, "usage": None}
    object.__setattr__(made, "__dict__", fields)
    object.__setattr__(made, "__pydantic_fields_set__", set(_ALL_FIELDS))
    object.__setattr__(made, "__pydantic_extra__", None)
    object.__setattr__(made, "__pydantic_private__", None)
    return made


@lru_cache(maxsize=128)
def passing(check: str, reason: str) -> Verdict:
    """Passing verdicts repeat ("unique", "converged in 3 turn(s)"): one shared instance each.

    Verdicts are never modified after they are made, so sharing is safe; it saves building two of the
    three verdicts per sample on the cheap checks' hot path.
    """
    return verdict(check, True, reason)
