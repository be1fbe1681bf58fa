"""JSON mode (`response_format: {"type": "json_object"}`): decoding constrained so that the answer is
a JSON object.

`step()` is a byte-level recogniser of JSON text whose top-level value is an object (RFC 8259, as
Python's `json.loads` reads it, without NaN/Infinity): it takes a state and the next byte and returns
the next state, or None when no JSON object starts with the bytes so far. States are small tuples,
so they can key a cache.

`JsonVocab` turns a state into the mask of tokens that keep the text a prefix of a JSON object:
inside a string, every token without a quote, a backslash or a control byte continues it (one
precomputed mask) and only the rest are tried; elsewhere only tokens whose first byte can come next
are tried. Masks are cached per state (the same few states recur: inside a key, after a colon ...).
Once the object is closed, only the end-of-sequence tokens are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# (mode, aux, stack): stack holds the open containers ("{" or "[") innermost last.
State = tuple[int, object, tuple[int, ...]]

START, VALUE, ARR_FIRST, OBJ_FIRST, OBJ_KEY, COLON, AFTER, STR, NUM, LIT, DONE = range(11)
# number sub-states; ZERO, INT, FRAC and EXP may end the number
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUM_END = {N_ZERO, N_INT, N_FRAC, N_EXP}
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_OPEN, _CLOSE = ord("{"), ord("}")
_LBRACK, _RBRACK = ord("["), ord("]")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

INITIAL: State = (START, 0, ())


def _after_value(stack: tuple[int, ...]) -> State:
    return (AFTER, 0, stack) if stack else (DONE, 0, ())


def _start_value(b: int, stack: tuple[int, ...]) -> State | None:
    if b == _OPEN:
        return (OBJ_FIRST, 0, stack + (_OPEN,))
    if b == _LBRACK:
        return (ARR_FIRST, 0, stack + (_LBRACK,))
    if b == _QUOTE:
        return (STR, (False, 0), stack)
    if b == ord("-"):
        return (NUM, N_MINUS, stack)
    if b == ord("0"):
        return (NUM, N_ZERO, stack)
    if b in _DIGITS:
        return (NUM, N_INT, stack)
    if b in _LITERALS:
        return (LIT, _LITERALS[b], stack)
    return None


def _close(b: int, stack: tuple[int, ...]) -> State | None:
    want = _OPEN if b == _CLOSE else _LBRACK
    return _after_value(stack[:-1]) if stack and stack[-1] == want else None


def _number(sub: int, b: int) -> int | None:
    if b in _DIGITS:
        if sub == N_MINUS:
            return N_ZERO if b == ord("0") else N_INT
        if sub == N_ZERO:
            return None
        return {N_INT: N_INT, N_DOT: N_FRAC, N_FRAC: N_FRAC, N_E: N_EXP, N_ESIGN: N_EXP, N_EXP: N_EXP}[sub]
    if b == ord(".") and sub in (N_ZERO, N_INT):
        return N_DOT
    if b in b"eE" and sub in (N_ZERO, N_INT, N_FRAC):
        return N_E
    if b in b"+-" and sub == N_E:
        return N_ESIGN
    return None


def step(state: State, b: int) -> State | None:
    """The state after byte `b`, or None when the text can no longer become a JSON object."""
    mode, aux, stack = state
    if mode == STR:
        is_key, esc = aux  # esc: 0 plain, 1 after a backslash, k >= 2: k - 1 hex digits of \\u to come
        if esc == 0:
            if b == _QUOTE:
                return (COLON, 0, stack) if is_key else _after_value(stack)
            if b == _BACKSLASH:
                return (STR, (is_key, 1), stack)
            return None if b < 0x20 else state
        if esc == 1:
            if b in _ESCAPES:
                return (STR, (is_key, 0), stack)
            return (STR, (is_key, 5), stack) if b == ord("u") else None
        return (STR, (is_key, esc - 1 if esc > 2 else 0), stack) if b in _HEX else None
    if mode == NUM:
        sub = _number(aux, b)
        if sub is not None:
            return (NUM, sub, stack)
        return step(_after_value(stack), b) if aux in _NUM_END else None
    if mode == LIT:
        if b != aux[0]:
            return None
        return _after_value(stack) if len(aux) == 1 else (LIT, aux[1:], stack)
    if b in _WS:
        return state
    if mode == START:
        return (OBJ_FIRST, 0, (_OPEN,)) if b == _OPEN else None
    if mode == VALUE:
        return _start_value(b, stack)
    if mode == ARR_FIRST:
        return _close(b, stack) if b == _RBRACK else _start_value(b, stack)
    if mode in (OBJ_FIRST, OBJ_KEY):
        if b == _QUOTE:
            return (STR, (True, 0), stack)
        return _close(b, stack) if b == _CLOSE and mode == OBJ_FIRST else None
    if mode == COLON:
        return (VALUE, 0, stack) if b == ord(":") else None
    if mode == AFTER:
        if b == ord(","):
            return (OBJ_KEY if stack[-1] == _OPEN else VALUE, 0, stack)
        return _close(b, stack) if b in (_CLOSE, _RBRACK) else None
    return None  # DONE: only whitespace may follow


def run(state: State | None, data: Iterable[int]) -> State | None:
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def _plain_in_string(raw: bytes) -> bool:
    return bool(raw) and all(b >= 0x20 and b != _QUOTE and b != _BACKSLASH for b in raw)


class JsonVocab:
    """Token masks for JSON mode over one vocabulary."""

    CACHE = 512

    def __init__(
        self, token_bytes: list[bytes], special: set[int], eos_ids: Iterable[int], device: torch.device
    ) -> None:
        self.token_bytes = token_bytes
        usable = [i for i, raw in enumerate(token_bytes) if raw and i not in special]
        plain = [i for i in usable if _plain_in_string(token_bytes[i])]
        self._plain = torch.zeros(len(token_bytes), dtype=torch.bool)
        self._plain[plain] = True
        plain_set = set(plain)
        self._in_string = [i for i in usable if i not in plain_set]  # quotes, backslashes, control bytes
        self._by_first: dict[int, list[int]] = {}
        for i in usable:
            self._by_first.setdefault(token_bytes[i][0], []).append(i)
        self._eos = torch.zeros(len(token_bytes), dtype=torch.bool)
        self._eos[[i for i in eos_ids if 0 <= i < len(token_bytes)]] = True
        self.device = device
        self._masks: dict[State, torch.Tensor] = {}

    initial = INITIAL

    def advance(self, state: State, token: int) -> State | None:
        return run(state, self.token_bytes[token])

    def mask(self, state: State) -> torch.Tensor:
        """Bool [V] on the vocabulary's device: the tokens allowed next."""
        cached = self._masks.get(state)
        if cached is None:
            if len(self._masks) >= self.CACHE:
                self._masks.clear()
            cached = self._masks[state] = self._compute(state).to(self.device)
        return cached

    def _compute(self, state: State) -> torch.Tensor:
        if state[0] == DONE:
            return self._eos.clone()
        if state[0] == STR and state[1][1] == 0:  # inside a string: plain tokens continue it
            out, tried = self._plain.clone(), self._in_string
        else:
            out = torch.zeros_like(self._plain)
            tried = [i for b in range(256) if step(state, b) is not None for i in self._by_first.get(b, ())]
        ok = [i for i in tried if run(state, self.token_bytes[i]) is not None]
        out[ok] = True
        if not out.any():  # no token can continue (a vocabulary without some byte): end the answer
            return self._eos.clone()
        return out
