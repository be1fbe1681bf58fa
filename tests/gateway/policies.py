"""Policy texts for gateway tests against the fake upstream."""

from __future__ import annotations


def two_models(url: str, *, timeout_s: float = 2.0, attempts: int = 2, failures: int = 3,
               cooldown_s: float = 30.0, extra_models: str = "") -> str:
    return f"""
version: 1
models:
  primary:
    provider: openai
    base_url: "{url}"
    model: primary
    price: {{input: 1.0, output: 2.0}}
  backup:
    provider: openai
    base_url: "{url}"
    model: backup
    price: {{input: 0.5, output: 1.0}}
  keyed:
    provider: openai
    base_url: "{url}"
    model: keyed
    api_key_env: CONCILIUM_TEST_MISSING_KEY
{extra_models}
routes:
  - name: keyed-route
    match: {{model: [concilium/keyed]}}
    targets: [keyed, backup]
  - name: main
    targets: [primary]
    fallbacks: [backup]
    timeout_s: {timeout_s}
router:
  virtual_models: [concilium/auto, concilium/keyed]
retry: {{attempts: {attempts}, backoff_s: 0.01, backoff_max_s: 0.05, retry_after_max_s: 2}}
circuit_breaker: {{failures: {failures}, cooldown_s: {cooldown_s}}}
"""
