"""Reading a model's answer: numbers, the final answer, option letters, and re-checked arithmetic.

Everything here is plain string work with precompiled regular expressions and a tiny arithmetic
evaluator (an `ast` walk that allows only numbers, + - * / ** % and parentheses; nothing is ever
passed to `eval`). Used by the scorers (`verifier`, `agreement`) and by numeric grading.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass

_NUM = r"\d[\d,]*(?:\.\d+)?|\.\d+"
NUMBER = re.compile(rf"(?<![\w.])-?(?:{_NUM})")
_MARKER = re.compile(r"####\s*(.*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"(?i)\b(?:final answer|the answer|answer)\s*(?:is|:)\s*:?\s*(.{1,80})")
_OPTION = re.compile(r"(?i)(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-E])\)?(?![a-z])|^\s*\(?([A-E])\)?[.):]?\s*$")
_CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)

# An arithmetic operand: a number, optionally with a currency sign, a percent sign or parentheses.
_OPERAND = rf"\(*\s*[$€£]?\s*(?:{_NUM})\s*%?\s*\)*"
_OP = r"(?:\*\*|[-+*/×÷^x])"
_EXPR = rf"{_OPERAND}(?:\s*{_OP}\s*{_OPERAND})*"
# `a op b = c` (possibly a chain `a op b = c op d = e`); at least one side must contain an operator.
_CHAIN = re.compile(rf"(?<![\w.<=])({_EXPR}(?:\s*=\s*{_EXPR})+)")
_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod}
MAX_MAGNITUDE = 1e15


class ArithmeticError_(ValueError):
    """An expression the safe evaluator does not accept."""


def unescape_markdown(text: str) -> str:
    r"""Undo Markdown escapes models put into arithmetic (`3 \* 4`, `\$5`)."""
    return text.replace("\\*", "*").replace("\\$", "$").replace("\\_", "_") if "\\" in text else text


def parse_number(text: str) -> float | None:
    """`"$1,234.50"` -> 1234.5; the first number in `text`, or None."""
    m = NUMBER.search(text.replace("$", " "))
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def numbers(text: str) -> list[float]:
    """Every number in `text`, in order (thousands separators dropped)."""
    out = []
    for m in NUMBER.finditer(text):
        try:
            out.append(float(m.group(0).replace(",", "")))
        except ValueError:
            continue
    return out


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _walk(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
            raise ArithmeticError_("power too large")
        try:
            v = _BINOPS[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError):
            raise ArithmeticError_("division by zero or overflow") from None
        if isinstance(v, complex) or not math.isfinite(v) or abs(v) > MAX_MAGNITUDE:
            raise ArithmeticError_("result out of range")
        return float(v)
    raise ArithmeticError_(f"not plain arithmetic: {type(node).__name__}")


def safe_eval(expr: str) -> float:
    """Value of a plain arithmetic expression (`"3 x $60 + 50%"`); raises ArithmeticError_ otherwise.

    Accepts numbers with thousands separators, currency signs, `%` (percent: divided by 100), `x`,
    `×`, `÷`, `^` and `**`, and parentheses. Parsed with `ast` and evaluated by a whitelist walk.
    """
    s = expr.strip()
    if not s or len(s) > 200:
        raise ArithmeticError_("empty or too long")
    s = re.sub(r"[$€£]", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    s = s.replace("×", "*").replace("÷", "/").replace("^", "**")
    s = re.sub(r"(?<=[\d)\s])x(?=[\s\d(])", "*", s)
    s = re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1/100)", s)
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError):
        raise ArithmeticError_(f"cannot parse {expr!r}") from None
    return _walk(tree)


def _decimals(text: str) -> int:
    m = re.search(r"\.(\d+)\s*%?\s*\)*\s*$", text.strip())
    return len(m.group(1)) if m else 0


def _close(lhs: float, rhs: float, rhs_text: str) -> bool:
    """Does the written result `rhs` state the value `lhs`, allowing for rounding to the digits shown?"""
    tol = max(0.5 * 10 ** -_decimals(rhs_text), 1e-6) + 1e-9
    if "%" in rhs_text and abs(lhs * 100 - rhs) <= tol:  # "0.25 = 25%"
        return True
    return abs(lhs - rhs) <= tol or abs(lhs - rhs) <= 1e-3 * max(abs(lhs), 1.0)


def _has_op(expr: str) -> bool:
    body = re.sub(r"^\s*[-+]", "", expr.strip())
    return bool(re.search(rf"\d\s*%?\s*\)*\s*{_OP}\s*\(*\s*[$€£]?\s*[\d.]", body))


@dataclass(frozen=True)
class ArithmeticCheck:
    checked: int  # equations re-computed
    wrong: int  # of which the written result disagrees with the computed one
    annotations: int  # GSM8K `<<a*b=c>>` annotations among the checked
    wrong_annotations: int


def check_arithmetic(text: str) -> ArithmeticCheck:
    """Re-compute every `<<expr=result>>` annotation and every `a op b = c` in `text`.

    An equation counts as wrong when the written result differs from the computed value beyond the
    rounding its digits allow. Pieces the evaluator cannot read (units, variables) are skipped.
    """
    checked = wrong = ann = ann_wrong = 0
    text = unescape_markdown(text)
    for m in _ANNOTATION.finditer(text):
        try:
            lhs, rhs = safe_eval(m.group(1)), safe_eval(m.group(2))
        except ArithmeticError_:
            continue
        checked += 1
        ann += 1
        if not _close(lhs, rhs, m.group(2)):
            wrong += 1
            ann_wrong += 1
    plain = _ANNOTATION.sub(" ", text)
    for m in _CHAIN.finditer(plain):
        parts = m.group(1).split("=")
        for a, b in zip(parts, parts[1:], strict=False):
            if not (_has_op(a) or _has_op(b)):
                continue
            try:
                lhs, rhs = safe_eval(a), safe_eval(b)
            except ArithmeticError_:
                continue
            checked += 1
            if not (_close(lhs, rhs, b) or (not _has_op(a) and _close(rhs, lhs, a))):
                wrong += 1
    return ArithmeticCheck(checked, wrong, ann, ann_wrong)


@dataclass(frozen=True)
class FinalAnswer:
    kind: str  # "marker" (#### x), "boxed" (\boxed{x}), "phrase" ("the answer is x"), "last" (last number), "none"
    text: str
    value: float | None  # the number, when the final answer is one

    @property
    def is_integer(self) -> bool:
        return self.value is not None and abs(self.value - round(self.value)) < 1e-9


def final_answer(text: str) -> FinalAnswer:
    """The answer a reader would take: after the last `####`, else in the last `\\boxed{}`, else after
    "the answer is", else the last number in the text."""
    marks = list(_MARKER.finditer(text))
    if marks:
        raw = marks[-1].group(1).strip()
        return FinalAnswer("marker", raw, parse_number(raw))
    boxed = _BOXED.findall(text)
    if boxed:
        raw = boxed[-1].strip()
        return FinalAnswer("boxed", raw, parse_number(raw))
    phrases = list(_ANSWER_IS.finditer(text))
    if phrases:
        raw = phrases[-1].group(1).strip()
        v = parse_number(raw)
        if v is not None:
            return FinalAnswer("phrase", raw, v)
    nums = list(NUMBER.finditer(text))
    if nums:
        raw = nums[-1].group(0)
        return FinalAnswer("last", raw, parse_number(raw))
    return FinalAnswer("none", "", None)


def option_letter(text: str) -> str | None:
    """A multiple-choice answer's letter (A-E): "The answer is (C)", "Answer: B", or a bare "D"."""
    found = None
    for line in text.strip().splitlines()[-5:] or [""]:
        for m in _OPTION.finditer(line):
            found = (m.group(1) or m.group(2)).upper()
    return found


def code_blocks(text: str) -> list[str]:
    """The contents of fenced code blocks (```lang ... ```)."""
    return [m.group(1) for m in _CODE_BLOCK.finditer(text)]


def canonical_number(v: float) -> str:
    """A number's canonical text: 18.0 -> "18", 0.50 -> "0.5"."""
    if abs(v - round(v)) < 1e-9:
        return str(int(round(v)))
    return f"{v:.6g}"


def normalise_final(text: str, kind: str = "auto") -> str | None:
    """The normalised final answer of a response, for comparing answers of several models.

    kind: "number" (the final number, canonical), "option" (a letter A-E), "code_output" (the last
    non-empty line of the last code block, else of the text, whitespace-collapsed), or "auto"
    (an option letter if there is one, else a number, else the last line lower-cased).
    """
    if kind in ("option", "auto"):
        letter = option_letter(text)
        if letter is not None or kind == "option":
            return letter
    if kind in ("number", "auto"):
        fa = final_answer(text)
        if fa.value is not None:
            return canonical_number(fa.value)
        if kind == "number":
            return None
    if kind == "code_output":
        blocks = code_blocks(text)
        body = blocks[-1] if blocks else text
    else:
        body = text
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    last = " ".join(lines[-1].split())
    return last if kind == "code_output" else last.lower().rstrip(".")
