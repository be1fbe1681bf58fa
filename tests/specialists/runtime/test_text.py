"""Incremental detokenisation with stop sequences, and sampling."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.detokenizer import IncrementalDecoder
from concilium.specialists.runtime.sampling import SamplingError, SamplingParams, sample, token_logprobs


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


def test_generation_cut_inside_a_character_releases_no_replacement_character():
    """max_tokens (or EOS) can end generation between the bytes of one character: the incomplete
    character is dropped, never released as U+FFFD."""
    dec = IncrementalDecoder(_bytes_decode, [])
    cosmos = "🌌".encode()
    pieces = [dec.push(b) for b in b"ok " + cosmos + cosmos[:2]]
    pieces.append(dec.flush())
    assert "".join(pieces) == "ok 🌌" and dec.text == "ok 🌌"
    assert all("\ufffd" not in p for p in pieces)


def test_invalid_bytes_inside_the_text_stream_as_they_decode():
    """A lone byte the model produced mid-text stays what the whole text decodes to, so the pieces
    still add up to the non-streamed text."""
    raw = b"a\xf0b" + "é".encode()
    dec = IncrementalDecoder(_bytes_decode, [])
    pieces = [dec.push(b) for b in raw] + [dec.flush()]
    assert "".join(pieces) == raw.decode("utf-8", errors="replace") == "a\ufffdbé"


def test_logit_bias_moves_sampling_and_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    assert sample(logits, [SamplingParams(temperature=0, logit_bias={4: 5.0})], [None]) == [4]
    banned = SamplingParams(temperature=1.0, seed=0, logit_bias={1: -100.0, 2: -100.0})
    g = banned.make_generator(torch.device("cpu"))
    assert not {sample(logits, [banned], [g])[0] for _ in range(200)} & {1, 2}
    assert sample(logits, [SamplingParams(temperature=0)], [None]) == [1]  # the logits were not changed
    for bad in ({1: 101.0}, {-1: 1.0}):
        with pytest.raises(SamplingError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()
    with pytest.raises(SamplingError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21).validate()


def test_token_logprobs_are_log_softmax_of_the_logits():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0], [5.0, 0.0, 0.5, 0.0, 0.0]])
    out = token_logprobs(logits, [0, 1], [2, 0], [3, 0])
    ref = torch.log_softmax(logits, dim=-1)
    assert out[0].token == 2 and out[0].logprob == pytest.approx(float(ref[0, 2]))
    assert [t for t, _ in out[0].top] == [1, 2, 4]
    assert [v for _, v in out[0].top] == pytest.approx(ref[0, [1, 2, 4]].tolist())
    assert out[1].logprob == pytest.approx(float(ref[1, 0])) and out[1].top == []


def test_cut_inside_a_character_keeps_the_whole_characters_of_its_token():
    """A token can hold a whole character and the first byte of the next one (" \\xf0"): the space
    is kept, only the unfinished character goes."""
    vocab = [b"ok", b" \xf0", b"\x9f\x8c"]
    dec = IncrementalDecoder(lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", "replace"), [])
    pieces = [dec.push(i) for i in (0, 1, 2)] + [dec.flush()]
    assert pieces == ["ok", "", "", " "] and dec.text == "ok "
