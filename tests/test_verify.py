"""The cheap verifiers: the reference rules (table-driven), structural checks and duplicates."""

from __future__ import annotations

import asyncio

import pytest

from tracegen.checks.answers import compare, extract_answers, to_sympy_text
from tracegen.checks.duplicates import DuplicateCheck
from tracegen.checks.reference import reference_verdict
from tracegen.checks.structural import structural_verdict
from tracegen.config import DuplicateCheckConfig, ReferenceCheckConfig, StructuralCheckConfig
from tracegen.records import AssistantMessage, ToolCall, TrajectoryError
from tracegen.testing.synthetic import make_trajectory

# (final answer text, reference, equal, deciding rule)
REFERENCE_CASES: list[tuple[str, str, bool, str]] = [
    # exact (normalised)
    ("Paris", "paris", True, "exact"),
    ("The answer is Paris.", "Paris", True, "exact"),
    ("  x = 5 ", "5", True, "exact"),
    ("$42$", "42", True, "exact"),
    ("\\text{blue}", "blue", True, "exact"),
    ("**yes**", "Yes", True, "exact"),
    ("Final answer: London", "Paris", False, "mismatch"),
    # numbers: tolerance, separators, units, currency, percent, scientific
    ("391", "391", True, "exact"),
    ("The answer is 391.", "391", True, "exact"),
    ('The answer is "2 + 2 = 4"', "4", True, "exact"),
    ("The answer is 2 + 2 = 5.", "4", False, "mismatch"),
    ("5050", "5,050", True, "numeric"),
    ("1,000,000", "1000000", True, "numeric"),
    ("3.5 cm", "3.5", True, "numeric"),
    ("12 apples", "12", True, "numeric"),
    ("$12.50", "12.5", True, "numeric"),
    ("\\$7", "7", True, "exact"),
    ("0.30000000000000004", "0.3", True, "numeric"),
    ("0.3001", "0.3", False, "numeric"),
    ("50%", "0.5", True, "numeric"),
    ("50\\%", "50", True, "numeric"),
    ("1.2e3", "1200", True, "numeric"),
    ("1.2 \\times 10^{3}", "1200", True, "numeric"),
    ("-4", "4", False, "numeric"),
    ("15", "16", False, "numeric"),
    ("There are 15 primes below 50.\nSo the count is 15", "15", True, "exact"),
    ("90^\\circ", "90", True, "exact"),
    # fractions and simple LaTeX
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "numeric"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True, "numeric"),
    ("\\frac12", "1/2", True, "numeric"),
    ("-\\frac{2}{3}", "-2/3", True, "numeric"),
    ("2/4", "1/2", True, "numeric"),
    ("\\boxed{\\frac{1}{3}}", "0.33", False, "numeric"),
    ("So we get \\boxed{\\sqrt{2}}", "1.41421356237", True, "symbolic"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True, "symbolic"),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False, "symbolic"),
    ("\\boxed{\\frac{\\pi}{2}}", "pi/2", True, "symbolic"),
    ("\\boxed{\\sqrt[3]{27}}", "3", True, "symbolic"),
    # symbolic expressions
    ("(x+1)^2", "x^2 + 2x + 1", True, "symbolic"),
    ("The answer is 2*(a+b)", "2a+2b", True, "symbolic"),
    ("x^2 - 1", "(x-1)(x+1)", True, "symbolic"),
    ("x^2 + 1", "(x-1)(x+1)", False, "symbolic"),
    ("\\frac{x}{2}", "0.5x", True, "symbolic"),
    ("e^{2}", "exp(2)", True, "symbolic"),
    ("sin(x)^2 + cos(x)^2", "1", True, "symbolic"),
    # multiple choice
    ("(B)", "B", True, "choice"),
    ("The answer is C.", "(C)", True, "choice"),
    ("I pick option d", "D", True, "choice"),
    ("B. because the others fail", "B", True, "choice"),
    ("(A)", "B", False, "choice"),
    # tuples and sets
    ("(1, 2)", "(1,2)", True, "list"),
    ("(1, 2.0)", "(1, 2)", True, "list"),
    ("(2, 1)", "(1, 2)", False, "list"),
    ("\\{3, 1, 2\\}", "\\{1, 2, 3\\}", True, "list"),
    ("x = 1/2, 3", "0.5, 3", True, "list"),
    # no answer / refusals
    ("", "5", False, "no_answer"),
    ("I cannot solve this problem.", "5", False, "mismatch"),
    # hostile input never reaches eval
    ("__import__('os').system('true')", "0", False, "mismatch"),
    ("10^10^10", "1", False, "mismatch"),
]


@pytest.mark.parametrize(("answer", "reference", "equal", "rule"), REFERENCE_CASES)
def test_reference_rules(answer: str, reference: str, equal: bool, rule: str) -> None:
    result = compare(answer, reference)
    assert (result.equal, result.rule) == (equal, rule), result


def test_reference_table_is_big_enough() -> None:
    assert len(REFERENCE_CASES) >= 40
    assert sum(1 for c in REFERENCE_CASES if not c[2]) >= 10  # unequal cases too: the rules must be able to fail


def test_extraction_prefers_the_last_boxed() -> None:
    assert extract_answers("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == ["\\frac{1}{2}"]
    assert extract_answers("<answer> 7 </answer>") == ["7"]


def test_unsafe_text_never_becomes_sympy_source() -> None:
    for text in ("__import__('os')", "x.__class__", "lambda: 1", "open(1)", "a[0]", "globals()"):
        assert to_sympy_text(text) is None, text
    assert to_sympy_text("\\frac{1}{\\sqrt{2}}") == "((1)/(sqrt(2)))"


def test_reference_verdict_names_the_rule_and_skips_missing() -> None:
    t = make_trajectory(4)  # final answer "The answer is 12.", reference "12"
    verdict = reference_verdict(t, ReferenceCheckConfig())
    assert verdict is not None and verdict.passed and verdict.reason.startswith("exact:")
    wrong = t.model_copy(update={"task": t.task.model_copy(update={"reference": "13"})})
    bad = reference_verdict(wrong, ReferenceCheckConfig())
    assert bad is not None and not bad.passed and bad.reason.startswith("numeric:")
    none = t.model_copy(update={"task": t.task.model_copy(update={"reference": None})})
    assert reference_verdict(none, ReferenceCheckConfig()) is None
    rejected = reference_verdict(none, ReferenceCheckConfig(missing="reject"))
    assert rejected is not None and not rejected.passed


def test_structural_accepts_a_clean_trajectory_and_names_each_problem() -> None:
    cfg = StructuralCheckConfig()
    good = make_trajectory(1, turns=3)
    assert structural_verdict(good, cfg).passed
    unconverged = make_trajectory(1, answer=False)
    v = structural_verdict(unconverged, cfg)
    assert not v.passed and "stop_reason=max_turns" in v.reason and "no final answer" in v.reason
    errored = good.model_copy(update={"errors": [TrajectoryError(kind="runtime", message="engine gone")]})
    assert "engine gone" in structural_verdict(errored, cfg).reason
    last = good.messages[-1]
    assert isinstance(last, AssistantMessage)
    cut = good.model_copy(
        update={"messages": [*good.messages[:-1], last.model_copy(update={"finish_reason": "length"})]}
    )
    assert "last finish_reason=length" in structural_verdict(cut, cfg).reason
    bad_call = AssistantMessage(
        content="",
        tool_calls=[ToolCall(id="c9", name="python", arguments="{oops", parse_error="not JSON")],
        finish_reason="tool_calls",
    )
    malformed = good.model_copy(update={"messages": [*good.messages[:2], bad_call, *good.messages[2:]]})
    assert "malformed tool call c9" in structural_verdict(malformed, cfg).reason
    assert structural_verdict(malformed, StructuralCheckConfig(allow_malformed_calls=True)).passed
    assert "turns > max_turns 2" in structural_verdict(good, StructuralCheckConfig(max_turns=2)).reason
    import re

    boxed = re.compile(r"\\boxed\{")
    assert "answer_pattern" in structural_verdict(good, cfg, boxed).reason


def test_duplicates_exact_and_near() -> None:
    a = make_trajectory(1)
    same = a.model_copy(update={"id": "copy", "final_answer": "  THE ANSWER is 3.  "})
    other = make_trajectory(2).model_copy(update={"task": a.task})
    check = DuplicateCheck(DuplicateCheckConfig())
    assert asyncio.run(check(a)).verdict.passed
    dup, original = asyncio.run(check(same))
    assert not dup.passed and dup.reason == f"exact duplicate of {a.id}" and original == a.id
    assert asyncio.run(check(other)).verdict.passed
    # near duplicates: one word changed in a long reasoning
    near = DuplicateCheck(DuplicateCheckConfig(near_threshold=0.7, ngram=3))
    long_a = make_trajectory(5, words=200)
    last = long_a.messages[-1]
    assert isinstance(last, AssistantMessage) and last.reasoning
    tweaked = last.model_copy(update={"reasoning": last.reasoning + " extra"})
    long_b = long_a.model_copy(update={"id": "b", "messages": [*long_a.messages[:-1], tweaked]})
    assert asyncio.run(near(long_a)).verdict.passed
    v, original = asyncio.run(near(long_b))
    assert not v.passed and v.reason.startswith(f"near duplicate of {long_a.id}") and original == long_a.id
    assert asyncio.run(near(make_trajectory(6, words=200).model_copy(update={"task": long_a.task}))).verdict.passed
