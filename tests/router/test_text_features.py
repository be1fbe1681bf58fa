"""Request text extraction and lexical features."""

from __future__ import annotations

import numpy as np

from concilium.router.features import FEATURE_NAMES, N_FEATURES, lexical_features, lexical_matrix
from concilium.router.text import prompt_chars, request_text


def feat(text: str, name: str, turns: int = 1) -> float:
    return float(lexical_features(text, turns)[FEATURE_NAMES.index(name)])


def test_string_and_list_contents_and_turn_order():
    body = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}},
                                         {"type": "text", "text": "question"}]},
        ]
    }
    text, turns = request_text(body)
    assert turns == 2
    assert text.startswith("second\nquestion")  # the last user turn leads
    assert "first question" in text and "You are terse." in text
    assert "an answer" not in text  # assistant turns are not the request
    assert prompt_chars(body) == len("You are terse.") + len("first question") + len("an answer") + len("second\nquestion")


def test_long_text_is_cut_keeping_the_last_turn():
    body = {"messages": [{"role": "user", "content": "a" * 5000}, {"role": "user", "content": "final"}]}
    text, _ = request_text(body, max_chars=100)
    assert text.startswith("final") and len(text) <= 100


def test_odd_bodies():
    assert request_text({}) == ("", 0)
    assert request_text({"messages": "nope"}) == ("", 0)
    assert request_text({"messages": [{"role": "user", "content": None}]}) == ("", 1)
    assert request_text({"prompt": "legacy"}) == ("legacy", 1)


def test_features_see_code_math_questions_and_language():
    code = "```python\ndef f(x):\n    return {x: x}\n```"
    assert feat(code, "code_fences") > 0 and feat(code, "code_keywords") > 0 and feat(code, "code_symbols") > 0
    assert feat("hello there", "code_fences") == 0
    assert feat("Solve $\\frac{1}{2} + 3 = x$", "latex") > 0
    assert feat("How many apples are left if 3 + 4 = 7?", "math_words") > 0
    assert feat("What is this?", "ends_with_question") == 1 and feat("Do it.", "ends_with_question") == 0
    assert feat("Which one?\nA. x\nB. y\nC. z", "choices") > 0
    assert feat("这是什么问题", "cjk_ratio") > 0 and feat("plain", "cjk_ratio") == 0
    assert feat("hi", "short_prompt") == 1
    assert feat("x", "turns", turns=3) > feat("x", "turns", turns=1)
    long = lexical_features("word " * 400)
    assert long[FEATURE_NAMES.index("log_chars")] > lexical_features("word")[FEATURE_NAMES.index("log_chars")]


def test_matrix_shape_and_dtype():
    m = lexical_matrix(["a", "b c", ""])
    assert m.shape == (3, N_FEATURES) and m.dtype == np.float32 and np.isfinite(m).all()
    assert lexical_matrix([]).shape == (0, N_FEATURES)
