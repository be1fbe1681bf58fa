"""The PII detector finds real identifiers (validated by checksum) and leaves look-alikes alone."""

from __future__ import annotations

import logging

import pytest

from concilium.guard import logs
from concilium.guard.pii import contains_pii, iban_ok, luhn_ok, pii_kinds, prompt_text, redact


@pytest.mark.parametrize("text,kind", [
    ("write to jane.doe+work@example.co.uk today", "email"),
    ("écrivez à josé.müller@exemple.fr demain", "email"),
    ("почта: иван@пример.рф", "email"),
    ("邮箱 用户@例子.广告 谢谢", "email"),
    ("mail zoë@bücher.de or ana@xn--bcher-kva.de", "email"),
    ("call me on +44 20 7946 0958", "phone"),
    ("my number is (555) 123-4567", "phone"),
    ("tel 030 1234 5678", "phone"),
    ("visa 4111 1111 1111 1111 exp 12/29", "card"),
    ("mastercard 5555-5555-5555-4444", "card"),
    ("amex 378282246310005", "card"),
    ("pay to GB82 WEST 1234 5698 7654 32 please", "iban"),
    ("IBAN DE89370400440532013000", "iban"),
    ("key sk-proj-Abc123def456GHI789jkl012MNO345", "api_key"),
    ("aws AKIAIOSFODNN7EXAMPLE", "api_key"),
    ("token ghp_" + "a1B2" * 9, "api_key"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123", "api_key"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE...", "api_key"),
])
def test_finds(text, kind):
    assert kind in pii_kinds(text)
    assert contains_pii(text)
    assert f"[REDACTED:{kind}]" in redact(text)


@pytest.mark.parametrize("text", [
    "the meeting is on 2024-01-15 at 10:30",
    "server 192.168.100.200 answered",
    "order 123456789 shipped, version 1.2.3",
    "pi is 3.14159265358979",
    "card 4111 1111 1111 1112 (fails Luhn)",
    "GB82 WEST 1234 5698 7654 33 (bad check digits)",
    "price 1,234,567.89 in 2024",
    "isbn 978-3-16-148410-0",
    "an email-like thing: user at example dot com",
    "short sk-abc",
    "def f(x):\n    return x * 2 + 31415 - 2718\n",
])
def test_ignores_look_alikes(text):
    assert pii_kinds(text) == set()
    assert redact(text) == text


def test_checksums():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("NL91ABNA0417164300") and not iban_ok("NL91ABNA0417164301")
    assert not iban_ok("XX91ABNA0417164300")  # unknown country


def test_only_the_asked_kinds():
    text = "a@b.io and 4111111111111111"
    assert pii_kinds(text, ["card"]) == {"card"}
    assert pii_kinds(text, ["email"]) == {"email"}


def test_prompt_text_covers_strings_and_parts():
    body = {"messages": [{"role": "system", "content": "be nice"},
                         {"role": "user", "content": [{"type": "text", "text": "mail x@y.org"},
                                                      {"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert "x@y.org" in prompt_text(body) and "be nice" in prompt_text(body)


def test_log_records_are_redacted(caplog):
    logs.configure(True)
    log = logging.getLogger("concilium.test")
    with caplog.at_level(logging.INFO):
        log.info("user %s sent card %s", "jane@example.com", "4111 1111 1111 1111")
        try:
            raise ValueError("bad key sk-proj-Abc123def456GHI789jkl012MNO345")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert "jane@example.com" not in text and "4111 1111" not in text and "sk-proj-Abc" not in text
    assert "[REDACTED:email]" in text and "[REDACTED:card]" in text and "[REDACTED:api_key]" in text
    logs.configure(False)
    try:
        with caplog.at_level(logging.INFO):
            log.info("plain %s", "jane@example.com")
        assert "plain jane@example.com" in caplog.text
    finally:
        logs.configure(True)
