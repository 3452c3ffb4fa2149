"""Answer equivalence: is the answer in a final-answer text equal to a reference? (filter and eval)

The ``reference`` rules, tried in order on the answer extracted from the final answer (the last
``\\boxed{}``, ``<answer>`` tag, or "answer is / Answer:" phrase; else a short answer itself; else its
last number):

1. ``exact``: equal after normalisation (case, whitespace, ``$``, ``\\text{}``, ``\\left``, a leading
   ``x =``, a trailing period);
2. ``choice``: a reference that is a multiple-choice letter (``B``, ``(B)``) against the letter the
   answer picks (``(B)``, ``B.``, ``option B``);
3. ``numeric``: both sides numbers (thousands separators, currency, units and ``%`` stripped;
   fractions ``3/4`` and ``\\frac{3}{4}``, scientific ``1.2e3`` / ``1.2 \\times 10^{3}``) equal within
   ``rel_tol`` / ``abs_tol``; a percentage also matches its fraction (``50%`` = ``0.5``);
4. ``list``: comma-separated tuples compared element by element (sets ``\\{...\\}`` in any order);
5. ``symbolic``: sympy equivalence (``simplify(a - b) == 0``, or numeric closeness when neither side
   has free symbols), for expressions with ``\\frac``, ``\\sqrt``, ``^``, ``\\pi`` ...

What ``symbolic`` does not do: parse arbitrary LaTeX (matrices, integrals, ``\\pm``) or decide
equivalences sympy's ``simplify`` cannot; those fall through to ``mismatch`` (not equal). Safety:
sympy's parser evaluates Python, so only strings made of digits, operators, single-letter symbols
and a fixed list of function names reach it, and powers with exponents above 100 are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

from tracegen.config import ReferenceCheckConfig

_WS = re.compile(r"\s+")


class RefResult(NamedTuple):
    equal: bool
    rule: str
    """exact | choice | numeric | list | symbolic | mismatch | no_answer"""
    candidate: str
    """The answer as extracted from the final answer text."""


def compare(answer: str, reference: str, config: ReferenceCheckConfig | None = None) -> RefResult:
    """Is the answer in ``answer`` (a final-answer text) equal to ``reference``? Says which rule decided."""
    cfg = config or ReferenceCheckConfig()
    candidates = extract_answers(answer)
    if not candidates:
        return RefResult(False, "no_answer", "")
    first: RefResult | None = None
    for candidate in candidates:
        equal, rule = _compare_one(candidate, reference, cfg)
        result = RefResult(equal, rule, candidate)
        if equal:
            return result
        first = first or result
    assert first is not None
    return first


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
    tags = _ANSWER_TAG.findall(text)
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


def _compare_one(candidate: str, reference: str, cfg: ReferenceCheckConfig) -> tuple[bool, str]:
    letter = _choice_letter_of_reference(reference)
    if letter is not None:
        picked = _picked_letter(candidate)
        return picked == letter, "choice"
    a, b = normalise(candidate), normalise(reference)
    if a == b:
        return True, "exact"
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return _numbers_equal(x, y, cfg), "numeric"
    la, lb = _split_list(a), _split_list(b)
    if la is not None and lb is not None and len(la[0]) == len(lb[0]) and la[1] == lb[1]:
        if la[1]:  # sets: any order
            remaining = list(lb[0])
            for item in la[0]:
                match = next((r for r in remaining if _compare_one(item, r, cfg)[0]), None)
                if match is None:
                    return False, "list"
                remaining.remove(match)
            return True, "list"
        return all(_compare_one(p, q, cfg)[0] for p, q in zip(la[0], lb[0], strict=True)), "list"
    if cfg.symbolic:
        decided = symbolic_equal(a, b, cfg.rel_tol, cfg.abs_tol)
        if decided is not None:
            return decided, "symbolic"
    return False, "mismatch"


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


def _split_list(s: str) -> tuple[list[str], bool] | None:
    """Top-level comma-separated items of a tuple/list/set (``(1, 2)``, ``1, 2``, ``\\{1, 2\\}``)."""
    is_set = False
    if s.startswith("\\{") and s.endswith("\\}"):
        s, is_set = s[2:-2], True
    elif s[:1] in "([" and s[-1:] in ")]" and _balanced_outer(s):
        s = s[1:-1]
    elif s.startswith("{") and s.endswith("}") and _balanced_outer(s):
        s, is_set = s[1:-1], True
    items: list[str] = []
    depth = 0
    current = ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    if len(items) < 2 or any(not item for item in items):
        return None
    return items, is_set


def _balanced_outer(s: str) -> bool:
    """True when the first bracket of ``s`` closes at its last character."""
    depth = 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return False
    return depth == 0


_FUNCTIONS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "oo", "abs"}
_IDENT = re.compile(r"[a-z]+")
_SAFE = re.compile(r"^[0-9a-z+\-*/().\s]*$")
_LATEX_NAMES = {
    "\\pi": " pi ",
    "\\infty": " oo ",
    "\\cdot": "*",
    "\\times": "*",
    "\\ln": " log",
    "\\log": " log",
    "\\sin": " sin",
    "\\cos": " cos",
    "\\tan": " tan",
    "\\exp": " exp",
}


def to_sympy_text(s: str) -> str | None:
    """Simple LaTeX / plain math to sympy syntax, or None when it is outside what is parsed safely."""
    if len(s) > 200:
        return None
    out = s
    for _ in range(8):  # \frac{a}{b} and \sqrt{x}, innermost rewrites repeated for nesting
        i = max(out.rfind("\\frac{"), out.rfind("\\sqrt{"), out.rfind("\\sqrt["))
        if i < 0:
            break
        if out.startswith("\\frac{", i):
            num = _braced_at(out, i + 5)
            if num is None:
                return None
            j = i + 5 + len(num) + 2
            j = _skip_ws(out, j)
            if j >= len(out) or out[j] != "{":
                return None
            den = _braced_at(out, j)
            if den is None:
                return None
            end = _group_end(out, j)
            out = out[:i] + f"(({num})/({den}))" + out[end:]
        elif out.startswith("\\sqrt[", i):
            close = out.find("]", i)
            if close < 0 or close + 1 >= len(out) or out[close + 1] != "{":
                return None
            degree = out[i + 6 : close]
            arg = _braced_at(out, close + 1)
            if arg is None:
                return None
            end = _group_end(out, close + 1)
            out = out[:i] + f"(({arg})**(1/({degree})))" + out[end:]
        else:
            arg = _braced_at(out, i + 5)
            if arg is None:
                return None
            end = _group_end(out, i + 5)
            out = out[:i] + f"sqrt({arg})" + out[end:]
    for name, repl in _LATEX_NAMES.items():
        out = out.replace(name, repl)
    out = out.replace("{", "(").replace("}", ")").replace("^", "**").replace("√", "sqrt")
    if "\\" in out or not _SAFE.match(out):
        return None
    if re.search(r"[a-z]\s*\.", out):  # attribute access is never maths
        return None
    for ident in _IDENT.findall(out):
        if len(ident) > 1 and ident not in _FUNCTIONS:
            return None
    return out


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _group_end(s: str, i: int) -> int:
    """Just past the group opening at ``s[i]``; the end of ``s`` when it never closes."""
    j = _closing_brace(s, i)
    return len(s) if j is None else j + 1


@lru_cache(maxsize=16384)
def _sympify(text: str) -> Any:
    """A sympy expression for ``text`` (already normalised), or None."""
    source = to_sympy_text(text)
    if source is None or not source.strip():
        return None
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    names: dict[str, Any] = {"e": sympy.E, "pi": sympy.pi, "oo": sympy.oo, "ln": sympy.log}
    for ch in "abcdfghijklmnopqrstuvwxyz":
        names.setdefault(ch, sympy.Symbol(ch))
    try:
        expr = parse_expr(
            source,
            local_dict=names,
            transformations=(*standard_transformations, implicit_multiplication, convert_xor),
            evaluate=False,
        )
    except Exception:  # noqa: BLE001 - sympy raises many types for text it cannot read; not an expression
        return None
    if not isinstance(expr, sympy.Expr):
        return None
    try:
        # Innermost first, so each exponent evaluated here is itself made of small powers.
        for node in sympy.postorder_traversal(expr):
            if isinstance(node, sympy.Pow) and not node.exp.free_symbols and abs(complex(sympy.N(node.exp, 15))) > 100:
                return None  # towers like 10^10^10 would never finish
    except (TypeError, ValueError):
        return None
    return expr


@lru_cache(maxsize=16384)
def symbolic_equal(a: str, b: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool | None:
    """Equivalent by sympy (True/False), or None when either side does not parse."""
    x, y = _sympify(a), _sympify(b)
    if x is None or y is None:
        return None
    import sympy

    try:
        if not x.free_symbols and not y.free_symbols:
            u, v = complex(sympy.N(x, 30)), complex(sympy.N(y, 30))
            return math.isclose(u.real, v.real, rel_tol=rel_tol, abs_tol=abs_tol) and math.isclose(
                u.imag, v.imag, rel_tol=rel_tol, abs_tol=abs_tol
            )
        return bool(sympy.simplify(x - y) == 0)
    except Exception:  # noqa: BLE001 - e.g. comparing unbounded values; undecided rather than a crash
        return None
