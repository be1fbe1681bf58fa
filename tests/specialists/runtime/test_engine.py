"""The engine: batched requests give the tokens they give alone, continuous batching (join while
others decode, leave at once when finished or cancelled), limits, seeds, the async streaming API."""

from __future__ import annotations

import asyncio

import pytest
import torch

from concilium.specialists.runtime.engine import ContextLengthError, Engine
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.sampling import SamplingError, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42, 150, 8, 8, 61, 7, 7, 90, 11], [1], [33, 44, 55, 66, 77, 88]]


def _engine(path, max_batch: int = 4, max_seq_len: int = 96) -> Engine:
    model = load_model(path, tokenizer=False, max_batch=max_batch, max_seq_len=max_seq_len).model
    return Engine(model, max_batch=max_batch, max_seq_len=max_seq_len)


def _solo(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate_batch([prompt], params)[0].token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_batched_greedy_equals_one_by_one(tiny_models, arch):
    engine = _engine(tiny_models[arch][1])
    params = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (16, 9, 21, 4)
    ]  # different lengths: requests leave the batch at different steps
    together = engine.generate_batch(PROMPTS, params)
    assert engine.stats.max_batch_seen == 4
    for prompt, p, res in zip(PROMPTS, params, together, strict=True):
        assert res.token_ids == _solo(engine, prompt, p)
        assert res.completion_tokens == p.max_tokens and res.prompt_tokens == len(prompt)


def test_seeded_sampling_is_reproducible_alone_and_batched(tiny_models):
    engine = _engine(tiny_models["qwen3"][1])
    params = [
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)
    ] + [SamplingParams(max_tokens=16, temperature=0.7, top_k=20, seed=4, ignore_eos=True)]
    together = [r.token_ids for r in engine.generate_batch(PROMPTS, params)]
    alone = [_solo(engine, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    assert together == alone
    again = _solo(
        engine, PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1, ignore_eos=True)
    )
    assert again == alone[0]
    other = _solo(
        engine,
        PROMPTS[0],
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True),
    )
    assert other != alone[0]
    assert alone[0] != _solo(engine, PROMPTS[0], GREEDY)  # sampling is not greedy decoding


def _collect(events: list):
    return lambda ev: events.append(ev)


def test_request_joins_running_batch_and_finished_ones_leave(tiny_models):
    engine = _engine(tiny_models["mixtral"][1])
    a_events: list = []
    b_events: list = []
    a = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    b = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.submit(PROMPTS[0], a, _collect(a_events))
    for _ in range(3):
        engine.step()
    assert list(engine.stats.decode_batch_sizes) == [1, 1, 1]
    engine.submit(PROMPTS[1], b, _collect(b_events))
    engine.step()  # B is prefilled and decodes in the same step as A
    assert engine.stats.decode_batch_sizes[-1] == 2
    while engine.step():
        pass
    sizes = list(engine.stats.decode_batch_sizes)
    # B (4 tokens: 1 from prefill + 3 decode steps) left the batch as soon as it finished
    assert sizes == [1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1]
    assert [t for ev in a_events for t in ev.token_ids] == _solo(engine, PROMPTS[0], a)
    assert [t for ev in b_events for t in ev.token_ids] == _solo(engine, PROMPTS[1], b)
    assert a_events[-1].finish_reason == b_events[-1].finish_reason == "length"
    assert engine.cache.free_slots == 4


def test_cancelled_request_leaves_at_once_and_others_continue(tiny_models):
    engine = _engine(tiny_models["llama"][1])
    events: dict[str, list] = {"a": [], "b": []}
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ha = engine.submit(PROMPTS[0], p, _collect(events["a"]))
    engine.submit(PROMPTS[1], p, _collect(events["b"]))
    engine.step()
    engine.step()
    ha.cancel()
    engine.step()
    assert events["a"][-1].finish_reason == "cancelled" and ha.finished.is_set()
    assert events["a"][-1].completion_tokens == 3  # one from prefill, two decode steps
    assert engine.stats.decode_batch_sizes[-1] == 1 and engine.cache.free_slots == 3
    while engine.step():
        pass
    assert [t for ev in events["b"] for t in ev.token_ids] == _solo(engine, PROMPTS[1], p)


def test_requests_wait_for_a_free_slot(tiny_models):
    engine = _engine(tiny_models["qwen2"][1], max_batch=2)
    results = engine.generate_batch(PROMPTS, GREEDY)
    assert engine.stats.max_batch_seen == 2
    assert [r.token_ids for r in results] == [_solo(engine, p, GREEDY) for p in PROMPTS]


def test_stop_token_ids_and_limits(tiny_models):
    engine = _engine(tiny_models["llama"][1], max_seq_len=24)
    full = _solo(engine, PROMPTS[1], GREEDY)
    stop_at = full[5]
    first = full.index(stop_at)
    res = engine.generate_batch(
        [PROMPTS[1]], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_at], ignore_eos=False)
    )[0]
    assert res.finish_reason == "stop" and res.token_ids == full[: first + 1]
    # the context (24) ends generation before max_tokens: 9 prompt tokens + 15 generated
    res = engine.generate_batch([PROMPTS[1]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[
        0
    ]
    assert res.finish_reason == "length" and res.completion_tokens == 24 - len(PROMPTS[1]) + 1
    with pytest.raises(ContextLengthError):
        engine.submit(list(range(25)), GREEDY, lambda ev: None)
    with pytest.raises(ContextLengthError):
        engine.submit([], GREEDY, lambda ev: None)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([10_000], GREEDY, lambda ev: None)
    with pytest.raises(SamplingError, match="temperature"):
        engine.submit([1, 2], SamplingParams(temperature=3.0), lambda ev: None)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit([1, 2], SamplingParams(stop=["x"]), lambda ev: None)


def test_async_stream_and_cancel_on_close(tiny_models):
    engine = _engine(tiny_models["qwen3"][1], max_seq_len=240)  # room for the closed stream to run on

    async def main() -> list:
        events = [ev async for ev in engine.stream(PROMPTS[0], GREEDY)]
        stream = engine.stream(PROMPTS[1], SamplingParams(max_tokens=230, temperature=0, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # the consumer went away
        return events

    try:
        events = asyncio.run(main())
        assert (
            len(events) == 16 and events[-1].finish_reason == "length" and events[-1].completion_tokens == 16
        )
        # The engine drops cancelled requests before it admits new ones, so once a later request
        # has finished the closed stream's request is gone.
        later = engine.generate_batch([PROMPTS[0]], GREEDY)[0]
        assert [t for ev in events for t in ev.token_ids] == later.token_ids
        assert engine.stats.requests_cancelled == 1
        assert engine.metrics()["running"] == 0 and engine.cache.free_slots == 4
    finally:
        engine.stop()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_logprobs_are_the_models_log_softmax_and_only_when_asked(tiny_models, arch):
    """Each generated token's log-prob is log_softmax of the model's logits at its position (checked
    against transformers' own forward pass), top_logprobs are the k most likely tokens, sorted, and
    greedy decoding picks the first of them; batched with a request that did not ask, that one gets
    none and its tokens do not change."""
    hf, path = tiny_models[arch]
    engine = _engine(path)
    asked = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=4)
    sampled = SamplingParams(
        max_tokens=8, temperature=1.0, seed=3, ignore_eos=True, logprobs=True, top_logprobs=0
    )
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    greedy, drawn, other = engine.generate_batch([PROMPTS[1], PROMPTS[0], PROMPTS[3]], [asked, sampled, plain])
    assert other.logprobs is None and other.token_ids == _solo(engine, PROMPTS[3], plain)
    for prompt, res, k in ((PROMPTS[1], greedy, 4), (PROMPTS[0], drawn, 0)):
        ids = torch.tensor([prompt + res.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        assert [e.token for e in res.logprobs] == res.token_ids
        got = torch.tensor([e.logprob for e in res.logprobs])
        want = ref.gather(1, torch.tensor(res.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for e, row in zip(res.logprobs, ref, strict=True):
            assert len(e.top) == k
            if k:
                values = [v for _, v in e.top]
                assert values == sorted(values, reverse=True)
                torch.testing.assert_close(torch.tensor(values), row.topk(k).values, atol=1e-4, rtol=1e-4)
                assert e.top[0][0] == e.token  # greedy takes the most likely token
    assert any(e.top == [] and e.logprob < -0.5 for e in drawn.logprobs)  # sampling took unlikely ones


def test_logit_bias_in_the_engine(tiny_models):
    engine = _engine(tiny_models["llama"][1])
    free = _solo(engine, PROMPTS[0], GREEDY)
    forced = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={123: 100.0})
    assert _solo(engine, PROMPTS[0], forced) == [123] * 6
    banned = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logit_bias={free[0]: -100.0})
    assert _solo(engine, PROMPTS[0], banned)[0] != free[0]
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit([1, 2], SamplingParams(logit_bias={10_000: 1.0}), lambda ev: None)


def test_presence_and_frequency_penalties(tiny_models):
    """Each step's logits lose frequency_penalty x (times the token was generated) + presence_penalty
    x (whether it was): greedy decoding then follows transformers' logits with those penalties."""
    hf, path = tiny_models["llama"]
    engine = _engine(path)
    plain = _solo(engine, PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert len(set(plain)) < len(plain)  # without penalties this model repeats itself
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, presence_penalty=0.7, frequency_penalty=0.4)
    got = _solo(engine, PROMPTS[2], p)
    assert got != plain
    counts = torch.zeros(hf.config.vocab_size)
    for i, tok in enumerate(got):
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPTS[2] + got[:i]])).logits[0, -1].float()
        logits -= 0.4 * counts + 0.7 * (counts > 0).float()
        assert int(logits.argmax()) == tok
        counts[tok] += 1
    with pytest.raises(SamplingError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5).validate()
