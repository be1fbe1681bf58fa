"""Log-probs in OpenAI's chat-completions shape: `choices[i].logprobs = {"content": [...]}`, one entry
per token with its text, log-prob, UTF-8 bytes and the most likely alternatives.

A token that holds only part of a character has no text of its own; like OpenAI, its `token` then
spells its bytes (`"bytes:\\xf0\\x9f"`) and `bytes` carries them exactly.
"""

from __future__ import annotations

from typing import Any

from concilium.specialists.runtime.sampling import TokenLogprob
from concilium.specialists.runtime.tokenizer import Tokenizer

FLOOR = -9999.0  # what OpenAI reports for tokens with (numerically) no probability


def token_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _one(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.token_bytes(token_id)
    return {"token": token_text(raw), "logprob": max(logprob, FLOOR), "bytes": list(raw)}


def content(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """The `logprobs.content` list for these tokens."""
    return [
        {**_one(tokenizer, e.token, e.logprob), "top_logprobs": [_one(tokenizer, t, v) for t, v in e.top]}
        for e in entries
    ]


def choice_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """A choice's `logprobs` value: None when the request did not ask for them."""
    if entries is None:
        return None
    return {"content": content(tokenizer, entries), "refusal": None}
