"""Cheap lexical features of a prompt: length, code, math notation, question form, language, turns.

All are computed with a handful of precompiled regular expressions (tens of microseconds for a
few thousand characters) and scaled to roughly unit range so that a linear model can use them
beside a sentence embedding.
"""

from __future__ import annotations

import math
import re

import numpy as np

_WORD = re.compile(r"[a-z_#]+")
_NUMBER = re.compile(r"\d+")
_MATH_OP = re.compile(r"[\d)]\s*[-+*/^=<>]\s*[\d(]")
_CHOICES = re.compile(r"(?m)^\s*\(?[A-Ea-e][).:]\s")
_WH_START = re.compile(r"\s*(?:what|why|how|when|where|who|which|is|are|can|does|do|should)\b")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")

# Single words, counted in one pass over the lower-cased words; phrases are counted with str.count.
_WORD_GROUPS = {
    "code_keywords": "def class import return function const let var public static void #include select "
    "lambda print printf fn impl struct",
    "math_words": "calculate compute solve equation integer sum product probability percent remainder total "
    "average ratio prove",
    "write_words": "write compose draft story poem essay blog lyrics imagine pretend roleplay",
    "extract_words": "extract summarize summarise identify classify parse json table",
    "chat_words": "hi hello hey thanks please you",
    "reasoning_words": "if then therefore because must implies true false logic",
}
_PHRASES = {
    "math_words": ("how many", "how much"),
    "write_words": ("role-play",),
    "extract_words": ("list all", "format the"),
    "chat_words": ("thank you", "how are you"),
}
_GROUP_NAMES = tuple(_WORD_GROUPS)
_WORD_INDEX = {w: i for i, g in enumerate(_GROUP_NAMES) for w in _WORD_GROUPS[g].split()}
_CODE_SYMBOLS = ("{", "}", ";", "==", "!=", "=>", "->", "++", "::")
_LATEX = ("$", "\\frac", "\\sqrt", "\\sum", "\\int", "\\cdot", "\\times", "\\pi", "\\le", "\\ge", "\\infty",
          "\\boxed", "\\left")

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "turns",
    "code_fences",
    "code_keywords",
    "code_symbols",
    "latex",
    "math_ops",
    "math_words",
    "digit_ratio",
    "log_numbers",
    "question_marks",
    "wh_start",
    "ends_with_question",
    "choices",
    "write_words",
    "extract_words",
    "chat_words",
    "reasoning_words",
    "url",
    "non_ascii_ratio",
    "cjk_ratio",
    "short_prompt",
)

N_FEATURES = len(FEATURE_NAMES)


def _squash(count: int, scale: float = 1.0) -> float:
    return math.log1p(count) / scale


def lexical_features(text: str, turns: int = 1) -> np.ndarray:
    """A float32 vector of N_FEATURES lexical features."""
    n = len(text)
    inv = 1.0 / max(n, 1)
    low = text.lower()
    words = _WORD.findall(low)
    groups = [0] * len(_GROUP_NAMES)
    for w in words:
        i = _WORD_INDEX.get(w)
        if i is not None:
            groups[i] += 1
    for g, phrases in _PHRASES.items():
        groups[_GROUP_NAMES.index(g)] += sum(low.count(p) for p in phrases)
    code_kw, math_w, write_w, extract_w, chat_w, reason_w = groups
    numbers = _NUMBER.findall(text)
    digits = sum(map(len, numbers))
    ascii_only = text.isascii()
    non_ascii = 0 if ascii_only else n - len(text.encode("ascii", "ignore"))
    cjk = 0 if ascii_only else len(_CJK.findall(text))
    stripped = text.rstrip()
    f = (
        math.log1p(n) / 8.0,
        math.log1p(len(words)) / 7.0,
        _squash(text.count("\n"), 4.0),
        min(turns, 10) / 5.0,
        _squash(text.count("```"), 2.0),
        _squash(code_kw, 3.0),
        _squash(sum(text.count(s) for s in _CODE_SYMBOLS), 4.0),
        _squash(sum(text.count(s) for s in _LATEX), 3.0),
        _squash(len(_MATH_OP.findall(text)), 3.0),
        _squash(math_w, 2.0),
        min(digits * inv * 5.0, 1.0),
        _squash(len(numbers), 3.0),
        _squash(text.count("?"), 2.0),
        1.0 if _WH_START.match(low) else 0.0,
        1.0 if stripped.endswith("?") else 0.0,
        _squash(len(_CHOICES.findall(text)), 2.0),
        _squash(write_w, 2.0),
        _squash(extract_w, 2.0),
        _squash(chat_w, 2.0),
        _squash(reason_w, 3.0),
        1.0 if ("http://" in low or "https://" in low or "www." in low) else 0.0,
        min(non_ascii * inv * 3.0, 1.0),
        min(cjk * inv * 2.0, 1.0),
        1.0 if len(words) <= 8 else 0.0,
    )
    return np.asarray(f, dtype=np.float32)


def lexical_matrix(texts: list[str], turns: list[int] | None = None) -> np.ndarray:
    if not texts:
        return np.zeros((0, N_FEATURES), dtype=np.float32)
    turns = turns or [1] * len(texts)
    return np.stack([lexical_features(t, k) for t, k in zip(texts, turns, strict=True)])
