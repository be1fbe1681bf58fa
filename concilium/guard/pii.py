"""A fast PII and secret detector (regular expressions plus checksums) and log redaction.

Kinds: `email`, `phone`, `card` (13-19 digits passing the Luhn check), `iban` (country length and
ISO 7064 mod-97), `api_key` (the shapes of common provider keys, tokens and private keys). Numbers are
validated, not just matched, so order numbers, dates and IP addresses are not reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ALL_KINDS = ("email", "phone", "card", "iban", "api_key")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


# Internationalised addresses too (RFC 6531): any letter or digit in the local part and the domain
# labels; the top-level domain is letters (any script) or an IDNA `xn--` label.
_EMAIL = re.compile(r"(?<![\w.+-])[^\W_][\w.%+-]{0,63}@[^\W_](?:[\w-]{0,62}\.)+"
                    r"(?:[^\W\d_]{2,24}|xn--[a-z0-9-]{2,59})(?![\w-])")
# A run of digits with the separators people write inside card and phone numbers.
_DIGITS = re.compile(r"(?<![\w+.-])\+?\(?\d(?:[\d \t().-]{5,30})\d(?![\w.]?\d)")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_LOOSE_SEPARATORS = re.compile(r"[ \t.-]{2,}")  # "31415 - 2718" is arithmetic, not a phone number
_DOTTED_QUAD = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30})(?![A-Za-z0-9])")
_API_KEY = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google
    r"|(?:sk|rk)_live_[0-9A-Za-z]{20,}"  # Stripe
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|ck-[A-Za-z0-9_-]{40,}"  # Concilium keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"
    r")"
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/-]{20,}=*"
)

# IBAN length per country (ISO 13616 registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    moved = s[4:] + s[:4]
    n = 0
    for ch in moved:  # letters count as 10..35; fold digit by digit to keep the number small
        v = ch if ch.isdigit() else str(ord(ch) - 55)
        for d in v:
            n = (n * 10 + ord(d) - 48) % 97
    return n == 1


def _number_kind(span: str) -> str | None:
    """'card', 'phone' or None for a run of digits and separators."""
    digits = "".join(ch for ch in span if ch.isdigit())
    n = len(digits)
    if _DATE.match(span.strip()) or _DOTTED_QUAD.match(span.strip()):
        return None
    if 13 <= n <= 19 and not span.startswith(("+", "(")) and digits[0] in "23456" and luhn_ok(digits):
        return "card"
    if span.startswith("+"):
        return "phone" if 8 <= n <= 15 else None
    separated = any(ch in " ().-" for ch in span.strip())
    if separated and 9 <= n <= 12 and not _LOOSE_SEPARATORS.search(span.replace("(", "").replace(")", "")):
        groups = [g for g in re.split(r"[ \t().-]+", span) if g]
        if len(groups) >= 2 and all(len(g) >= 2 for g in groups) and len(groups[-1]) >= 3:
            return "phone"
    return None


_DIGIT_CHARS = "0123456789"


def _has_long_word(text: str) -> bool:
    return "-----BEGIN" in text or any(len(w) >= 20 for w in text.split())


def findings(text: str, kinds: Iterable[str] = ALL_KINDS, first_only: bool = False) -> list[Finding]:
    kinds = set(kinds)
    out: list[Finding] = []
    # Cheap pre-checks keep the common case (a prompt with no candidates) at a few microseconds:
    # every number kind needs several digits, every key shape is one long word.
    numbers = kinds & {"card", "phone", "iban"} and sum(map(text.count, _DIGIT_CHARS)) >= 8
    if "email" in kinds and "@" in text:
        for m in _EMAIL.finditer(text):
            out.append(Finding("email", m.start(), m.end()))
            if first_only:
                return out
    if "api_key" in kinds and _has_long_word(text):
        for m in _API_KEY.finditer(text):
            out.append(Finding("api_key", m.start(), m.end()))
            if first_only:
                return out
    if "iban" in kinds and numbers:
        for m in _IBAN.finditer(text):
            if iban_ok(m.group(1)):
                out.append(Finding("iban", m.start(1), m.end(1)))
                if first_only:
                    return out
    if numbers and kinds & {"card", "phone"}:
        for m in _DIGITS.finditer(text):
            span = m.group(0).rstrip(" \t.-(")
            kind = _number_kind(span)
            if kind in kinds:
                out.append(Finding(kind, m.start(), m.start() + len(span)))
                if first_only:
                    return out
    return out


def pii_kinds(text: str, kinds: Iterable[str] = ALL_KINDS) -> set[str]:
    return {f.kind for f in findings(text, kinds)}


def contains_pii(text: str, kinds: Iterable[str] = ALL_KINDS) -> bool:
    return bool(findings(text, kinds, first_only=True))


def redact(text: str, kinds: Iterable[str] = ALL_KINDS) -> str:
    """Replace every finding with `[REDACTED:<kind>]` (overlaps: the earliest, longest wins)."""
    found = sorted(findings(text, kinds), key=lambda f: (f.start, -f.end))
    if not found:
        return text
    parts, pos = [], 0
    for f in found:
        if f.start < pos:
            continue
        parts.append(text[pos:f.start])
        parts.append(f"[REDACTED:{f.kind}]")
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)


def prompt_text(body: dict) -> str:
    """All text a chat request sends to a model: message contents and text parts."""
    out: list[str] = []
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(out)
