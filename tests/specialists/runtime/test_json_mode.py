"""JSON mode: the byte-level recogniser agrees with json.loads, and the token masks keep every
generated prefix a prefix of a JSON object."""

from __future__ import annotations

import json
import random

import pytest
import torch

from concilium.specialists.runtime.json_mode import DONE, INITIAL, JsonVocab, run

VALID = [
    {},
    {"a": 1},
    {"capital": "Paris", "population": 2.1e6, "tags": ["x", "y", []], "ok": True, "none": None},
    {"nested": {"deep": [{"k": -0.5}, False, "é \"quoted\" \\ \n"]}, "e": 1e-7, "big": 12345678901234567890},
    {"unicode": "🌌 日本語"},
]
INVALID = [b"[1]", b'"s"', b"1", b'{"a":1,}', b"{a:1}", b'{"a":01}', b'{"a":tru}', b'{"a":"\x01"}',
           b'{"a" 1}', b'{"a":1]', b'{"a":[1}', b"{}}", b'{"a":-}', b'{"a":1.}', b'{"a":1e}', b'{"a":"\\x"}',
           b'{"a":"\\u12g4"}', b"{} x"]


@pytest.mark.parametrize("obj", VALID)
def test_every_prefix_of_a_json_object_is_accepted(obj):
    for text in (json.dumps(obj), json.dumps(obj, indent=2, ensure_ascii=False), " " + json.dumps(obj) + "\n"):
        raw = text.encode()
        for i in range(len(raw)):
            assert run(INITIAL, raw[:i]) is not None, raw[:i]
        assert run(INITIAL, raw)[0] == DONE


@pytest.mark.parametrize("raw", INVALID)
def test_what_is_not_a_json_object_is_refused(raw):
    state = run(INITIAL, raw)
    assert state is None or state[0] != DONE


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, -3, 17, 2.5, -0.001, 1e21, True, False, None])
    if kind in (1, 2, 3):
        return rng.choice(["", "a", "é", 'q"uote', "back\\slash", "tab\t", "\u00e9"])
    if kind in (4, 5):
        return {rng.choice("abc"): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]


def test_agrees_with_json_loads_on_random_texts():
    """Objects, and objects with one byte deleted, replaced or inserted: the recogniser ends in DONE
    exactly when json.loads reads an object, and refuses no prefix of one."""
    rng = random.Random(0)
    alphabet = b'{}[]":,0123456789-.eE+ \\ntrufalsx\x01'
    counts = {True: 0, False: 0}
    for _ in range(5000):
        obj = {k: _random_value(rng) for k in rng.sample("xyz", rng.randrange(4))}
        raw = bytearray(json.dumps(obj, indent=rng.choice([None, 1])).encode())
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(raw) + 1)
            op = rng.randrange(3)
            if op == 0 and at < len(raw):
                del raw[at]
            elif op == 1 and at < len(raw):
                raw[at] = rng.choice(alphabet)
            else:
                raw.insert(at, rng.choice(alphabet))
        raw = bytes(raw)
        try:
            ok = isinstance(json.loads(raw), dict)
        except ValueError:
            ok = False
        state = run(INITIAL, raw)
        assert (state is not None and state[0] == DONE) == ok, raw
        if ok:
            assert all(run(INITIAL, raw[:i]) is not None for i in range(len(raw)))
        counts[ok] += 1
    assert min(counts.values()) > 1000  # both kinds, often


def test_masks_allow_exactly_the_tokens_that_keep_a_json_prefix():
    vocab = [bytes([b]) for b in range(128)] + [b'{"', b'":', b'", "', b"true", b" Paris", b"\xf0\x9f", b"\x8c\x8c",
                                                b"}", b"<eos>"]
    eos = len(vocab) - 1
    jv = JsonVocab(vocab, special={eos}, eos_ids=[eos], device=torch.device("cpu"))
    rng = random.Random(1)
    state = INITIAL
    for _ in range(200):
        mask = jv.mask(state)
        want = {i for i, raw in enumerate(vocab) if i != eos and run(state, raw) is not None}
        if state[0] == DONE:
            assert mask.nonzero().flatten().tolist() == [eos]
            break
        assert set(mask.nonzero().flatten().tolist()) == want
        state = jv.advance(state, rng.choice(sorted(want)))
        assert state is not None
    assert jv.mask(INITIAL).nonzero().flatten().tolist() == sorted({ord(c) for c in " \t\n\r{"} | {128})


class _ByteTokenizer:
    """For the tiny random models (vocabulary 160): ids 0-127 are ASCII bytes, then a few pieces,
    the last id is EOS."""

    PIECES = [b'{"', b'":', b'", "', b"true", b" Paris", b"\xc3\xa9", b"}", b"]", b"\n  ", b"null"]

    def __init__(self, vocab_size: int) -> None:
        self.vocab = [bytes([b]) for b in range(128)] + self.PIECES
        self.vocab += [b"x%d" % i for i in range(vocab_size - len(self.vocab) - 1)] + [b""]
        self.eos_token_ids = [vocab_size - 1]
        self.special_ids = {vocab_size - 1}
        self.vocab_size = vocab_size

    def token_bytes(self, i: int) -> bytes:
        return self.vocab[i]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_engine_json_mode_keeps_every_prefix_valid_and_ends_when_the_object_closes(tiny_models):
    from concilium.specialists.runtime.engine import Engine
    from concilium.specialists.runtime.loader import load_model
    from concilium.specialists.runtime.sampling import SamplingParams

    path = tiny_models["llama"][1]
    model = load_model(path, tokenizer=False, max_batch=3, max_seq_len=200).model
    tok = _ByteTokenizer(model.cfg.vocab_size)
    engine = Engine(model, tok, max_batch=3, max_seq_len=200)
    prompt = [5, 17, 99, 3]
    free = engine.generate_batch([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert run(INITIAL, b"".join(tok.vocab[t] for t in free.token_ids)) is None  # unconstrained: not JSON
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, json_object=True) for s in (1, 2)]
    # pushed towards closing quotes and braces, the object ends well within max_tokens
    params.append(SamplingParams(max_tokens=120, temperature=0, json_object=True,
                                 logit_bias={ord('"'): 6.0, ord("}"): 8.0, ord(":"): 4.0, ord("1"): 4.0}))
    results = engine.generate_batch([prompt] * 3, params)
    for res in results:
        raw = b"".join(tok.vocab[t] for t in res.token_ids if t not in tok.special_ids)
        assert all(run(INITIAL, raw[:i]) is not None for i in range(len(raw) + 1))
        if res.finish_reason == "stop":
            assert isinstance(json.loads(raw), dict) and res.token_ids[-1] == tok.eos_token_ids[0]
    assert results[2].finish_reason == "stop"
    assert engine.generate_batch([prompt], SamplingParams(max_tokens=40, temperature=0))[0].token_ids == free.token_ids
