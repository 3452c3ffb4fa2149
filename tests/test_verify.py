"""The cheap verifiers: the reference rules (table-driven), structural checks and duplicates."""

from __future__ import annotations

import asyncio

import pytest

from tracegen.checks.answers import compare, extract_answers
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
    ("Final answer: London", "Paris", False, "phrase"),
    # numbers: tolerance, separators, units, currency, percent, scientific
    ("391", "391", True, "exact"),
    ("The answer is 391.", "391", True, "exact"),
    ('The answer is "2 + 2 = 4"', "4", True, "exact"),
    ("The answer is 2 + 2 = 5.", "4", False, "symbolic"),
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
    # hostile input never reaches eval; a tower is computed by sympy, not Python's int power
    ("__import__('os').system('true')", "0", False, "mismatch"),
    ("10^10^10", "1", False, "symbolic"),
    # text around a boxed answer (the last box counts), and a worked solution as the reference
    ("We need x in [0, 1), so the answer is \\boxed{[0, 1)}.", "(0,1]", False, "list"),
    ("We need x in [0, 1), so the answer is \\boxed{[0, 1)}.", "[0,1)", True, "list"),
    ("First \\boxed{2}; no wait, re-checking gives \\boxed{3}", "3", True, "exact"),
    ("The roots are $x = 1$ and $x = 2$, so \\boxed{1, 2}", "\\{2, 1\\}", True, "list"),
    ("Thus the probability is $\\boxed{\\dfrac{1}{4}}$ (25%).", "0.25", True, "numeric"),
    ("Solving, $x = \\boxed{\\pm 3}$.", "3, -3", True, "list"),
    ("\\boxed{\\frac{1}{2}}", "Halving twice and doubling once gives \\boxed{0.5}.", True, "numeric"),
    ("So the result is $x^2+1$", "(x+1)^2", False, "symbolic"),
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


# Bare answers, each compared in both directions (answer against reference and back): intervals, sets,
# tuples and multiple answers, fractions against decimals, units, percentages, scientific notation,
# expressions. Where the old hand-written engine (before math-verify) differed, the line says so and why
# the value here is the right one.
EQUIVALENCE_PAIRS: list[tuple[str, str, bool]] = [
    # intervals: bounds matter
    ("[0, 1)", "[0,1)", True),
    ("[0, 1)", "(0, 1]", False),  # old: equal (brackets ignored under `list`)
    ("(0, 1)", "[0, 1]", False),  # old: equal; an open interval is not a closed one
    ("(-\\infty, 3)", "(-\\infty, 3]", False),  # old: equal
    ("(-\\infty, 3)", "x < 3", True),  # old: mismatch; the same set written as an inequality
    ("[0,1) \\cup (2,3]", "(2,3] \\cup [0,1)", True),  # old: mismatch; a union in any order
    ("[0,1) \\cup (2,3]", "[0,1] \\cup (2,3]", False),
    ("[1, 2]", "1 \\le x \\le 2", True),  # old: mismatch
    # sets: any order
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}", False),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("\\{-2, 2\\}", "\\pm 2", True),  # old: mismatch; \\pm names both roots
    ("\\{\\frac{1}{2}, 3\\}", "\\{0.5, 3\\}", True),
    ("\\emptyset", "\\{1\\}", False),
    # tuples (order matters) and multiple answers (a bare comma list: any order)
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1, 2)", False),
    ("(1, 2, 3)", "(1, 2)", False),
    ("(3, -1)", "(3,-1)", True),
    ("1, 2", "2, 1", True),  # old: unequal; roots listed without brackets are a set, not a point
    ("x = 1, x = 2", "1, 2", True),
    ("x = 1/2, 3", "0.5, 3", True),
    ("1, 2", "1, 3", False),
    # fractions against decimals
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{3}{4}", "0.75", True),
    ("\\frac{1}{3}", "0.33", False),
    ("\\dfrac{22}{7}", "\\pi", False),
    ("0.125", "1/8", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{2}{3}", "\\frac{-2}{3}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{\\sqrt{3}}{2}", "0.8660254", True),
    ("\\frac{5}{8}", "0.6", False),
    # units
    ("3.5 \\text{ cm}", "3.5", True),
    ("12 apples", "12", True),
    ("5 \\text{ m/s}", "5", True),
    ("90^\\circ", "90", True),
    ("\\$12.50", "12.5", True),
    ("10 \\text{ km}", "100", False),
    ("5\\,\\mathrm{kg}", "5", True),
    # percentages
    ("50\\%", "0.5", True),
    ("50%", "50", True),
    ("12.5\\%", "\\frac{1}{8}", True),
    ("25\\%", "0.3", False),
    ("20%", "\\frac{1}{4}", False),
    # scientific notation
    ("1.2 \\times 10^{3}", "1200", True),
    ("1.2e3", "1200", True),
    ("6.02 \\times 10^{23}", "6.02e23", True),
    ("1.5 \\times 10^{-3}", "0.0015", True),
    ("3 \\cdot 10^{8}", "3e8", True),
    ("1.2 \\times 10^{3}", "120", False),
    ("2.5 \\times 10^{-2}", "0.25", False),
    # expressions, equations, inequalities, matrices
    ("(x+1)^2", "x^2 + 2x + 1", True),
    ("x^2 - 1", "(x-1)(x+1)", True),
    ("x^2 + 1", "(x-1)(x+1)", False),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\frac{\\pi}{2}", "pi/2", True),
    ("e^{2}", "exp(2)", True),
    ("sin(x)^2 + cos(x)^2", "1", True),
    ("\\sqrt[3]{27}", "3", True),
    ("2\\pi r", "2r\\pi", True),
    ("\\ln(e^3)", "3", True),
    ("\\log_2 8", "3", True),  # old: mismatch (no \\log_b)
    ("y = 2x + 1", "2x + 1", True),
    # old: mismatch (no matrices)
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}", False),
    ("3 + 4i", "4i + 3", True),
    ("x > 3", "3 < x", True),  # old: mismatch
    ("x \\ge 3", "x > 3", False),
]


@pytest.mark.parametrize(("a", "b", "equal"), EQUIVALENCE_PAIRS)
def test_equivalence_both_directions(a: str, b: str, equal: bool) -> None:
    forward, backward = compare(a, b), compare(b, a)
    assert forward.equal is equal, forward
    assert backward.equal is equal, backward
    assert forward.rule != "mismatch" and backward.rule != "mismatch"  # a rule decided, not a parse failure


def test_equivalence_table_is_big_enough() -> None:
    assert len(EQUIVALENCE_PAIRS) >= 60
    assert sum(1 for c in EQUIVALENCE_PAIRS if not c[2]) >= 20


def test_a_tower_is_undecided_after_the_timeout_not_a_hang() -> None:
    import time

    started = time.monotonic()
    result = compare("\\boxed{10^{10^{10}}}", "1", ReferenceCheckConfig(timeout_s=1))
    assert (result.equal, result.rule) == (False, "mismatch")
    assert time.monotonic() - started < 30


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


# Short string references (issue 17): the reference as the whole last word or phrase of the answer's last
# sentence, quotes and final punctuation ignored; strict against answers listing or negating candidates.
PHRASE_CASES: list[tuple[str, str, bool]] = [
    ("The capital of Italy is Rome.", "Rome", True),
    ('The opposite of "hot" is "cold".', "cold", True),
    ("Rome", "Rome", True),
    ("**Rome**", "rome", True),
    ("It is 'Rome'!", "Rome", True),
    ("Paris is in France. The capital of Italy is Rome.", "Rome", True),
    ("The largest city is Milan, but the capital is Rome.", "Rome", True),
    ("The city you are looking for is New York City.", "New York City", True),
    ("Answer: the Moon", "The Moon", True),
    ("The chemical symbol for gold is Au.", "Au", True),
    ("So the statement is true.", "True", True),
    ("\\boxed{\\text{Rome}}", "Rome", True),
    ("Rome or Milan", "Rome", False),
    ("It is either Milan or Rome.", "Rome", False),
    ("Milan, Rome", "Rome", False),
    ("Milan/Rome", "Rome", False),
    ("Milan and Rome", "Rome", False),
    ("The capital of Italy is not Rome.", "Rome", False),
    ("Rome is the capital of Italy.", "Rome", False),  # the reference must close the answer
    ("The hero is Romeo.", "Rome", False),
    ('The opposite of "cold" is "hot".', "cold", False),
    ("Is it Rome? No, it is Milan.", "Rome", False),
    ("The capital of Italy is Rome (or maybe Milan).", "Rome", False),
    ("So the statement is false.", "True", False),
]


@pytest.mark.parametrize(("answer", "reference", "equal"), PHRASE_CASES)
def test_short_string_references(answer: str, reference: str, equal: bool) -> None:
    result = compare(answer, reference)
    assert result.equal is equal, result
    assert result.rule in ("exact", "phrase"), result


def test_hot_path_verdicts_are_the_validated_ones() -> None:
    """The cheap checks build verdicts without validation: each must equal, dump and copy as the validated one."""
    from tracegen.checks.verdicts import verdict
    from tracegen.records import Verdict

    for args in (("reference", True, "exact: '4' == reference '4'", 1.0), ("duplicate", False, "exact duplicate of x")):
        fast = verdict(*args)  # type: ignore[arg-type]
        check, passed, reason, *score = args
        slow = Verdict.model_validate(
            {"check": check, "passed": passed, "reason": reason, "score": score[0] if score else None}
        )
        assert fast == slow
        assert fast.model_dump_json() == slow.model_dump_json()
        assert fast.model_copy(update={"reason": "r"}).reason == "r"
        assert Verdict.model_validate_json(fast.model_dump_json()) == fast
