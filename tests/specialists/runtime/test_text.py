"""Incremental detokenisation with stop sequences, and sampling."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.detokenizer import IncrementalDecoder
from concilium.specialists.runtime.sampling import SamplingError, SamplingParams, sample


def _bytes_decode(ids: list[int]) -> str:
    """A byte-level vocabulary: token id = one UTF-8 byte (so characters can be split)."""
    return bytes(ids).decode("utf-8", errors="replace")


def _run(text: str, stop: list[str]) -> tuple[list[str], IncrementalDecoder]:
    dec = IncrementalDecoder(_bytes_decode, stop)
    pieces = [dec.push(b) for b in text.encode()]
    if not dec.stopped:
        pieces.append(dec.flush())
    return pieces, dec


def test_multibyte_characters_are_never_split():
    pieces, dec = _run("héllo wörld ✓", [])
    assert "".join(pieces) == "héllo wörld ✓"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of é is held until the second arrives


def test_stop_sequence_cuts_and_is_not_emitted():
    pieces, dec = _run("hello world, goodbye", ["world"])
    assert "".join(pieces) == "hello " and dec.stopped
    assert dec.push(ord("x")) == ""  # nothing after the stop


def test_possible_stop_prefix_is_held_back_then_released():
    dec = IncrementalDecoder(_bytes_decode, ["STOP"])
    out = [dec.push(b) for b in b"ab ST"]
    assert "".join(out) == "ab "  # "ST" could still become "STOP"
    assert dec.push(ord("x")) == "STx"  # it did not
    assert dec.push(ord("S")) == ""
    assert dec.flush() == "S" and not dec.stopped


def test_stop_spanning_tokens_and_earliest_of_several():
    dec = IncrementalDecoder(
        lambda ids: "".join(["aa", "b<", "/e", "nd>", "zz"][i] for i in ids), ["</end>", "b<"]
    )
    out = "".join(dec.push(i) for i in range(5))
    assert out == "aa" and dec.stopped


def test_sampling_params_validation():
    for bad, msg in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=[""]), "stop"),
    ]:
        with pytest.raises(SamplingError, match=msg):
            SamplingParams(**bad).validate()


def test_greedy_topk_topp_and_seeds():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]
    top2 = SamplingParams(temperature=2.0, top_k=2, seed=0)
    g = top2.make_generator(torch.device("cpu"))
    draws = {sample(logits[:1], [top2], [g])[0] for _ in range(200)}
    assert draws == {1, 2}  # both top-2 tokens drawn, never another
    nucleus = SamplingParams(temperature=1.0, top_p=0.45, seed=0)
    g = nucleus.make_generator(torch.device("cpu"))
    assert {sample(logits[:1], [nucleus], [g])[0] for _ in range(100)} == {1}  # p(token 1) = 0.47 >= 0.45
    a = SamplingParams(temperature=1.0, seed=7)
    b = SamplingParams(temperature=1.0, seed=7)
    flat = torch.zeros(1, 1000)
    ga, gb = a.make_generator(torch.device("cpu")), b.make_generator(torch.device("cpu"))
    seq_a = [sample(flat, [a], [ga])[0] for _ in range(20)]
    seq_b = [sample(flat, [b], [gb])[0] for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 10
    assert (
        SamplingParams(top_k=1).greedy
        and SamplingParams(temperature=0.0).make_generator(torch.device("cpu")) is None
    )
