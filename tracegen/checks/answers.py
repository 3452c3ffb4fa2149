"""Answer equivalence: is the answer in a final-answer text equal to a reference? (filter and eval)

The ``reference`` rules, tried in order on each answer extracted from the final answer (the last
``\\boxed{}``, ``<answer>`` tag, or "answer is / Answer:" phrase; else a short answer itself or its
last line; else its last number). A reference holding a ``\\boxed{}`` (a worked solution) is its last
boxed answer.

1. ``choice``: a reference that is a multiple-choice letter (``B``, ``(B)``) against the letter the
   answer picks (``(B)``, ``B.``, ``option B``);
2. ``exact``: equal after normalisation (case, whitespace, ``$``, ``\\text{}``, ``\\left``, a leading
   ``x =``, a trailing period);
3. ``numeric``: both sides plain numbers (thousands separators, currency, units and ``%`` stripped;
   fractions ``3/4`` and ``\\frac{3}{4}``, scientific ``1.2e3`` / ``1.2 \\times 10^{3}``) equal within
   ``rel_tol`` / ``abs_tol``; a percentage also matches its fraction (``50%`` = ``0.5``);
4. ``phrase``: a text reference (words, not maths: ``Rome``, ``New York``) is the whole last word or
   phrase of the answer's last sentence, normalised, quotes and final punctuation ignored; refused
   when the word before it lists or negates (``Milan or Rome``, ``Milan, Rome``, ``not Rome``);
5. ``list`` / ``symbolic``: Hugging Face's ``math-verify`` (the verifier open-r1 and lighteval use)
   parses both sides as LaTeX or plain maths and decides: ``list`` when the reference is a tuple,
   set or interval (bounds and order matter, sets in any order), ``symbolic`` for anything else
   (expressions, equations, matrices, ``\\pm``); floats are compared rounded to 6 decimals.

Rules 1-3 are the fast path (microseconds, no parser); ``math-verify`` costs milliseconds and is
cached per (answer, reference). ``mismatch``: no rule could decide (math-verify parsed neither side
as maths), so not equal; ``no_answer``: nothing to compare.

What this does not do: decide equivalences sympy cannot, or read words as maths (a text reference
never reaches math-verify, which would read ``paris`` as the product ``p*a*r*i*s``). Safety:
math-verify parses LaTeX into sympy objects with ANTLR (no ``eval``) and plain expressions made of
digits and operators only; every parse and comparison runs under its ``timeout_s`` alarm, so
``10^{10^{10}}`` gives ``mismatch`` after the timeout, not a hung filter. The alarm is SIGALRM:
math-verify raises ``ValueError`` when called off the main thread, and filter and eval call it there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

from tracegen.config import ReferenceCheckConfig

_WS = re.compile(r"\s+")


class RefResult(NamedTuple):
    equal: bool
    rule: str
    """exact | choice | numeric | phrase | list | symbolic | mismatch | no_answer"""
    candidate: str
    """The answer as extracted from the final answer text."""


def compare(answer: str, reference: str, config: ReferenceCheckConfig | None = None) -> RefResult:
    """Is the answer in ``answer`` (a final-answer text) equal to ``reference``? Says which rule decided."""
    cfg = config or ReferenceCheckConfig()
    candidates = extract_answers(answer)
    if not candidates:
        return RefResult(False, "no_answer", "")
    boxed = _last_braced(reference, ("\\boxed", "\\fbox"))
    reference = boxed if boxed is not None else reference
    # Fast rules on every candidate before math-verify on any: "... so 15" is decided in microseconds.
    fast = [_fast_rules(c, reference, cfg) for c in candidates]
    for candidate, decided in zip(candidates, fast, strict=True):
        if decided is not None and decided[0]:
            return RefResult(*decided, candidate)
    results: list[RefResult] = []
    for candidate, decided in zip(candidates, fast, strict=True):
        if decided is None:
            slow = math_verify_equal(candidate, reference, cfg.timeout_s) if cfg.symbolic else None
            decided = slow or (False, "mismatch")
            if decided[0]:
                return RefResult(*decided, candidate)
        results.append(RefResult(*decided, candidate))
    return results[0]


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_PHRASE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|=|:)\s*:?\s*(.+?)\s*(?:\n|$)",
    re.I,
)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LAST_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answers(text: str) -> list[str]:
    """Candidate answers in ``text``, most explicit first (boxed, tag, phrase, short text, last number)."""
    text = text.strip()
    if not text:
        return []
    boxed = _last_braced(text, ("\\boxed", "\\fbox"))
    if boxed is not None:
        return [boxed]
    tags = _ANSWER_TAG.findall(text) if "<" in text else []
    if tags:
        return [tags[-1].strip()]
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        phrase = phrases[-1].strip().rstrip(".").strip("*").strip().strip("\"'").strip()
        # "the answer is 2 + 2 = 4": the right-hand side of the last '=' is the answer
        rhs = phrase.rsplit("=", 1)[1].strip() if "=" in phrase else ""
        return [phrase, rhs] if rhs else [phrase]
    numbers = _LAST_NUMBER.findall(text)
    if len(text) <= 64 and "\n" not in text:
        return [text, numbers[-1]] if numbers and numbers[-1] != text else [text]
    last_line = text.splitlines()[-1].strip()
    out = [last_line] if len(last_line) <= 64 else []
    if numbers:
        out.append(numbers[-1])
    return out


def _last_braced(text: str, commands: Sequence[str]) -> str | None:
    """The brace-balanced argument of the last ``\\cmd{...}`` in ``text``."""
    if "\\" not in text:  # most answers hold no command at all: skip the searches
        return None
    start = max(text.rfind(c + "{") for c in commands)
    if start < 0:
        return None
    i = text.index("{", start)
    return _braced_at(text, i)


def _braced_at(text: str, i: int) -> str | None:
    """Content of the balanced group opening at ``text[i] == '{'``."""
    j = _closing_brace(text, i)
    return None if j is None else text[i + 1 : j].strip()


def _closing_brace(text: str, i: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``text[i]``, or None when it never closes."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right|displaystyle)\b|\\q?quad\b")
_ASSIGN = re.compile(r"^[a-z]\w{0,2}\s*=\s*(?=\S)")


@lru_cache(maxsize=65536)
def normalise(text: str) -> str:
    if text.isalnum():  # "391", "Paris": none of the rewrites below can apply (the filter's common case)
        return text.lower()
    s = text.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_CMD.sub(r"\1", s)
    s = _SPACING.sub(" ", s)
    s = s.replace("\\%", "%")
    for token in ("\\(", "\\)", "\\[", "\\]", "\\$", "$"):
        s = s.replace(token, "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.strip().strip("*").strip()
    s = s.rstrip(".").strip()
    s = _WS.sub(" ", s).lower()
    return _ASSIGN.sub("", s)


def _fast_rules(candidate: str, reference: str, cfg: ReferenceCheckConfig) -> tuple[bool, str] | None:
    """choice, exact, numeric, phrase: (equal, rule), or None when only math-verify can decide."""
    letter = _choice_letter_of_reference(reference)
    if letter is not None:
        return _picked_letter(candidate) == letter, "choice"
    a, b = normalise(candidate), normalise(reference)
    if a == b:
        return True, "exact"
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return _numbers_equal(x, y, cfg), "numeric"
    if is_text(b):
        return phrase_equal(candidate, reference), "phrase"
    return None


_REF_CHOICE = re.compile(r"^\(?([A-J])\)?$")
_PICK = [
    re.compile(r"\b(?:option|choice|answer)\s*(?:is\s*)?:?\s*\(?([a-j])\)?(?:[.:)]|\s|$)"),
    re.compile(r"^\(?([a-j])\)?(?:[.:)]|\s|$)"),
]


def _choice_letter_of_reference(reference: str) -> str | None:
    m = _REF_CHOICE.match(reference.strip())
    return m.group(1).lower() if m else None


def _picked_letter(candidate: str) -> str | None:
    s = normalise(candidate)
    for pattern in _PICK:
        m = pattern.search(s)
        if m:
            return m.group(1)
    return None


class Number(NamedTuple):
    value: float
    percent: bool


_CURRENCY = re.compile(r"^(?:\\\$|[$€£¥])\s*|\s*(?:\\\$|[$€£¥])$")
_SCI = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?$")
_FRAC = re.compile(r"^([-+])?\s*\\frac\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$")
_SLASH = re.compile(r"^([-+]?\d+)\s*/\s*(\d+)$")
_UNIT = re.compile(r"^(?:%|\\%|[a-zµ°][a-zµ°/\^\d\s.]*)$")


@lru_cache(maxsize=65536)
def parse_number(text: str) -> Number | None:
    """A number in ``text`` (normalised), with units, currency and thousands separators stripped."""
    s = _CURRENCY.sub("", text.strip()).strip()
    if not s:
        return None
    m = _SCI.match(s)
    if m:
        return Number(float(m.group(1)) * 10.0 ** int(m.group(2)), False)
    m = _FRAC.match(s)
    if m:
        num = int(m.group(2) or m.group(3))
        den = int(m.group(4) or m.group(5))
        if den == 0:
            return None
        value = float(Fraction(num, den))
        return Number(-value if m.group(1) == "-" else value, False)
    m = _SLASH.match(s)
    if m:
        den = int(m.group(2))
        return Number(float(Fraction(int(m.group(1)), den)), False) if den else None
    m = _NUMBER.match(s)
    if not m or not any(c.isdigit() for c in m.group(0)):
        return None
    rest = s[m.end() :].strip()
    if rest and not _UNIT.match(rest):
        return None
    try:
        value = float(m.group(0).replace(",", ""))
    except ValueError:
        return None
    return Number(value, rest in ("%", "\\%"))


def _numbers_equal(x: Number, y: Number, cfg: ReferenceCheckConfig) -> bool:
    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol)

    if close(x.value, y.value):
        return True
    if x.percent != y.percent:  # 50% against 0.5
        pct, plain = (x, y) if x.percent else (y, x)
        return close(pct.value / 100.0, plain.value)
    return False


# Words that are maths, not text: function names, constants, and the joiners of multiple answers.
_MATH_WORDS = frozenset(
    {
        *("sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh"),
        *("log", "ln", "exp", "sqrt", "pi", "infty", "inf", "oo", "min", "max", "gcd", "lcm", "mod", "det"),
        *("and", "or"),
    }
)
_LETTER_RUN = re.compile(r"[^\W\d_]{2,}")
_LATEX_COMMAND = re.compile(r"\\(?:begin|end)\s*\{\w*\*?\}|\\[a-zA-Z]+")


@lru_cache(maxsize=65536)
def is_text(reference: str) -> bool:
    """A reference made of words (``rome``, ``new york``) rather than maths (``2x + 1``, ``\\sin x``); normalised."""
    bare = _LATEX_COMMAND.sub(" ", reference)
    return any(run not in _MATH_WORDS for run in _LETTER_RUN.findall(bare))


_QUOTES = re.compile(r"[\"'`“”‘’«»]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TRAILING = re.compile(r"[\s.!?;:,]+$")
_ARTICLE = re.compile(r"^(?:the|a|an)\s+")
# A word just before the reference that makes it one of several candidates, or denies it.
_LISTING = frozenset({"or", "and", "nor", "either", "vs", "versus", "not", "no", "never", "than"})


def _words(text: str) -> str:
    s = _QUOTES.sub("", normalise(text))
    return _WS.sub(" ", _TRAILING.sub("", s)).strip()


@lru_cache(maxsize=65536)
def phrase_equal(candidate: str, reference: str) -> bool:
    """The ``phrase`` rule: ``reference`` is the whole last word or phrase of the candidate's last sentence.

    ``The capital of Italy is Rome.`` and ``The opposite of "hot" is "cold".`` pass against ``Rome`` and
    ``cold``; ``Milan or Rome``, ``Milan, Rome``, ``Rome/Milan``, ``not Rome`` and ``Romeo`` do not.
    """
    ref = _ARTICLE.sub("", _words(reference))
    sentences = [s for s in _SENTENCE_END.split(candidate.strip()) if s.strip()]
    text = _words(sentences[-1]) if sentences else ""
    if not ref or not text.endswith(ref):
        return False
    head = text[: -len(ref)]
    if not head:
        return True
    if not head.endswith(" ") and head[-1] not in ":(":  # a whole word: "romeo" does not end in "rome"
        return False
    head = head.rstrip()
    if head.endswith((",", "/", "&", ";")):
        return False
    return head.split()[-1].strip(":(") not in _LISTING


# Plain-text function names math-verify reads only in LaTeX form (it reads ``sin`` as s*i*n).
_PLAIN_FUNCTION = re.compile(
    r"(?<![\\a-zA-Z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|sec|csc|cot|log|ln|exp|pi)(?![a-zA-Z])"
)
_DELIMITERS = re.compile(r"\\\(|\\\)|\\\[|\\\]|(?<!\\)\$")


def _as_latex(text: str) -> str:
    """Maths as one ``$...$`` formula for math-verify; text with words as it is (math-verify finds the maths in it)."""
    if is_text(normalise(text)):
        return text
    s = _DELIMITERS.sub(" ", text).strip().rstrip(".").strip()
    s = _PLAIN_FUNCTION.sub(r"\\\1", s.replace("**", "^"))
    return f"${s}$"


@lru_cache(maxsize=16384)
def math_verify_equal(candidate: str, reference: str, timeout_s: int = 5) -> tuple[bool, str] | None:
    """math-verify's verdict and the rule that names it (``list`` or ``symbolic``); None: a side is not maths.

    None too when the comparison errs or runs out of time (``10^{10^{10}}``): undecided, not unequal.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException
    from sympy import Set, Tuple

    gold = [g for g in parse(_as_latex(reference), parsing_timeout=timeout_s) if not isinstance(g, str)]
    if not gold:
        return None
    answer = [p for p in parse(_as_latex(candidate), parsing_timeout=timeout_s) if not isinstance(p, str)]
    if not answer:
        return None
    rule = "list" if isinstance(gold[0], Set | Tuple) else "symbolic"
    try:
        # allow_set_relation_comp: ``x < 3`` answers ``(-\infty, 3)`` as ``(-\infty, 3)`` answers ``x < 3``
        equal = verify(gold, answer, timeout_seconds=timeout_s, allow_set_relation_comp=True, raise_on_error=True)
    except (Exception, TimeoutException):  # noqa: BLE001 - sympy raises many types on odd input; undecided
        return None
    return bool(equal), rule
