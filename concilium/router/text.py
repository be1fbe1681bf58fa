"""Turn an OpenAI chat request body into the text the dispatcher reads."""

from __future__ import annotations

from typing import Any

# The dispatcher reads at most this many characters: the last user turn first, then earlier turns.
MAX_CHARS = 4000


def content_text(content: Any) -> str:
    """A message's `content`: a string, or a list of parts of which the text parts are kept."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def request_text(body: dict[str, Any], max_chars: int = MAX_CHARS) -> tuple[str, int]:
    """(text to classify, number of user turns).

    The last user message weighs most for routing, so it comes first and is never cut before
    earlier turns are; the system prompt and earlier user turns follow while room is left.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else ""
        return text[:max_chars], 1 if text else 0
    user = [content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    system = [
        content_text(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") in ("system", "developer")
    ]
    if not user:
        text = "\n".join(system)
        return text[:max_chars], 0
    pieces = [user[-1]] + user[-2::-1] + system
    out, room = [], max_chars
    for piece in pieces:
        if room <= 0:
            break
        out.append(piece[:room])
        room -= len(out[-1]) + 1
    return "\n".join(out), len(user)


def prompt_chars(body: dict[str, Any]) -> int:
    """All characters the upstream will read (every message), for the input cost estimate."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt")
        return len(prompt) if isinstance(prompt, str) else 0
    return sum(len(content_text(m.get("content"))) for m in messages if isinstance(m, dict))
