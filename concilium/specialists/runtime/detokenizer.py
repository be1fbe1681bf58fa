"""Incremental detokenisation with stop sequences.

Text is released token by token, but never (a) half of a multi-byte character, nor (b) a tail that
could still turn out to be the start of a stop sequence. When a stop sequence appears, the text is
cut just before it. When generation ends inside a character (max_tokens reached between its bytes),
the incomplete character is dropped rather than released as U+FFFD, so every piece is whole
characters and the pieces always add up to the final text.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None) -> None:
        self._decode = decode
        self.stop = [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already accounted for
        self._read = 0
        self.text = ""  # all text decoded so far (cut at a stop sequence once one is found)
        self._emitted = 0  # characters of `text` already released
        self._checked = 0  # characters of `text` already searched for stop sequences
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a generated token; return the newly released text ("" if held back)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _scan(self) -> int:
        """Cut `text` at the first stop sequence, if any; return how far text may be released."""
        end = len(self.text)
        if not self.stop:
            return end
        start = max(0, self._checked - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return len(self.text)
        self._checked = end
        return end - self._held_back()

    def _release(self) -> str:
        end = self._scan()
        out = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation: release everything still held back."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            self.text += after[len(before) :].rstrip("\ufffd")  # bytes of a character never finished
            self._prefix = self._read = len(self.ids)
            self._scan()
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out
