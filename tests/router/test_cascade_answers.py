"""Reading answers: final answers, numbers, re-checked arithmetic, safe evaluation, grading."""

from __future__ import annotations

import pytest

from concilium.router.cascade.answers import (
    ArithmeticError_,
    check_arithmetic,
    final_answer,
    normalise_final,
    numbers,
    option_letter,
    parse_number,
    safe_eval,
)
from concilium.router.cascade.grading import grade, numeric_grade, routellm_grade


def test_numbers_and_parse():
    assert numbers("Josh paid $80,000 and 2.5 more, then -3") == [80000.0, 2.5, -3.0]
    assert parse_number("$1,234.50 in total") == 1234.5
    assert parse_number("no digits") is None


@pytest.mark.parametrize("text,kind,value", [
    ("16 - 3 = 13\n#### 13", "marker", 13.0),
    ("so the result is \\boxed{42}.", "boxed", 42.0),
    ("Therefore the answer is 7 apples.", "phrase", 7.0),
    ("She makes $18.00 every day.", "last", 18.0),
    ("I do not know.", "none", None),
])
def test_final_answer_forms(text, kind, value):
    fa = final_answer(text)
    assert fa.kind == kind
    assert fa.value == value


def test_last_marker_wins_and_integer_flag():
    fa = final_answer("#### 3\nwait, actually\n#### 2.5")
    assert fa.value == 2.5 and not fa.is_integer
    assert final_answer("#### 4").is_integer


def test_safe_eval_arithmetic():
    assert safe_eval("3 x $60 + 10") == 190
    assert safe_eval("80,000 + 50,000") == 130000
    assert safe_eval("50% * 10") == 5
    assert safe_eval("(2 + 3) ^ 2") == 25
    assert safe_eval("12 ÷ 4 × 2") == 6


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "open('x')", "a + 1", "10 ** 1000",
                                  "1 / 0", "[1, 2]", "lambda: 1", ""])
def test_safe_eval_refuses_anything_else(expr):
    with pytest.raises(ArithmeticError_):
        safe_eval(expr)


def test_check_arithmetic_finds_wrong_steps():
    right = "She has 16 - 3 = 13 eggs.\nShe sells 9 * $2 = $<<9*2=18>>18.\n#### 18"
    wrong = "She has 16 - 3 = 12 eggs.\nShe sells 9 * $2 = $<<9*2=19>>19.\n#### 19"
    r, w = check_arithmetic(right), check_arithmetic(wrong)
    assert r.checked >= 2 and r.wrong == 0
    assert w.wrong == 2 and w.wrong_annotations == 1


def test_check_arithmetic_allows_rounding_and_markdown_escapes():
    assert check_arithmetic("10 / 3 = 3.33 and 2 / 3 = 0.67").wrong == 0
    assert check_arithmetic("10 / 3 = 3.5").wrong == 1
    assert check_arithmetic("120 \\* 30/100 = <<120*30/100=36>>36").wrong == 0
    assert check_arithmetic("25 - 8 = 17 = 17").wrong == 0  # a restated result is not an error


def test_option_letters_and_normalised_finals():
    assert option_letter("Let me think.\nThe answer is (C).") == "C"
    assert option_letter("Answer: b") == "B"
    assert normalise_final("#### 18.00") == "18"
    assert normalise_final("so 0.50 dollars", "number") == "0.5"
    assert normalise_final("```\nprint(2)\n```\n```\n4\n```", "code_output") == "4"
    assert normalise_final("nothing numeric", "number") is None


def test_routellm_grading_reads_the_last_digits():
    assert routellm_grade("She makes $18 every day.", "18") == 1.0
    assert routellm_grade("She makes $18.00 every day.", "18") == 0.0  # "00" is the last run of digits
    assert numeric_grade("She makes $18.00 every day.", "18") == 1.0
    assert numeric_grade("#### 1,300", "1300") == 1.0
    assert grade("#### 17", "18", "numeric") == 0.0
    with pytest.raises(ValueError):
        grade("1", "1", "vibes")
