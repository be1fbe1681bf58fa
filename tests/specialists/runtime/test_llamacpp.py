"""The llama.cpp backend (`backend: llama.cpp`): the engine's scheduler, sampling and log-probs on top
of llama.cpp's forward pass. Its logits agree with the torch runtime on the same GGUF weights, several
sequences decoded together give what each gives alone (llama.cpp sequence = cache slot, dropped when
the slot is released), and `serve-model --backend llama.cpp` answers the `openai` SDK with log-probs."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest
import torch

from concilium.specialists.runtime import llamacpp
from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.loader import LoadError, load_model
from concilium.specialists.runtime.model import ForwardBatch
from concilium.specialists.runtime.sampling import SamplingParams
from tests.specialists.runtime import gguf_writer, tiny
from tests.support import ROOT, free_port, http_json, wait_until

# llama-cpp-python is a dev dependency (built from source by `make install-dev`), so these tests run
# wherever `make test` does; without it the backend refuses to load, which
# test_without_llama_cpp_the_error_says_how_to_install checks.

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-gguf")
    hf = tiny.build("llama", d / "hf")
    gguf_writer.write(hf, d / "tiny.gguf", vocab=True)  # F32 tensors: both runtimes compute with the same weights
    return d / "tiny.gguf"


@pytest.fixture(scope="module")
def smollm2_llamacpp(smollm2_path):
    loaded = load_model(smollm2_path, backend="llama.cpp", max_batch=4, max_seq_len=256, threads=1)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=4, max_seq_len=256)
    return engine


def test_logits_match_the_torch_runtime_on_the_same_weights(tiny_gguf):
    ref = load_model(tiny_gguf, weights="dense", backend="torch", tokenizer=False, max_batch=2, max_seq_len=64).model
    lc = load_model(tiny_gguf, backend="llama.cpp", tokenizer=False, max_batch=2, max_seq_len=64, threads=1).model
    assert isinstance(lc, llamacpp.LlamaCppModel) and lc.describe()["ops"] == "llama.cpp"
    rc, cc = ref.new_cache(2, 64), lc.new_cache(2, 64)
    prompts = [[3, 17, 42, 99, 5, 8], [7, 7, 120, 64]]
    batch = ForwardBatch.for_prefill([(p, i) for i, p in enumerate(prompts)], ref.device)
    with torch.inference_mode():
        want, got = ref(batch, rc), lc(batch, cc)
        assert got.shape == want.shape == (2, ref.cfg.vocab_size)
        assert (got - want).abs().max() < 2e-3 * want.abs().max()
        # three decode steps of both sequences together, at their own positions
        tokens, pos = [11, 13], [len(p) for p in prompts]
        for _ in range(3):
            step = ForwardBatch.for_decode(tokens, [0, 1], pos, ref.device)
            want, got = ref(step, rc), lc(step, cc)
            assert (got - want).abs().max() < 2e-3 * want.abs().max()
            tokens, pos = want.argmax(-1).tolist(), [x + 1 for x in pos]
        # every row's logits of a prefill, when asked for
        batch = ForwardBatch.for_prefill([(prompts[0], 0)], ref.device)
        batch.logits_index = None
        want, got = ref(batch, rc), lc(batch, cc)
        assert got.shape == (len(prompts[0]), ref.cfg.vocab_size)
        assert (got - want).abs().max() < 2e-3 * want.abs().max()


def test_sequences_batched_together_answer_as_they_do_alone(smollm2_llamacpp, smollm2_path):
    engine = smollm2_llamacpp
    tok = engine.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingParams(max_tokens=16, temperature=0)
    together = [r.token_ids for r in engine.generate_batch(prompts, greedy)]
    alone = [engine.generate_batch([p], greedy)[0].token_ids for p in reversed(prompts)][::-1]
    assert together == alone
    assert engine.stats.max_batch_seen == 3 and engine.cache.free_slots == 4  # every slot released
    # a slot that held a long answer serves a new sequence from position 0 (its cells were dropped)
    again = engine.generate_batch([prompts[2], prompts[0]], greedy)
    assert [r.token_ids for r in again] == [together[2], together[0]]
    assert "4" in tok.decode(together[2])


def test_logprobs_come_from_llama_cpps_logits(smollm2_llamacpp):
    engine = smollm2_llamacpp
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[1]}])
    r = engine.generate_batch([prompt], SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3))[0]
    assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids) - (r.finish_reason == "stop")
    # the first token's log-probs are a log-softmax of the prefill's last row
    batch = ForwardBatch.for_prefill([(prompt, 3)], engine.model.device)
    expected = torch.log_softmax(engine.model(batch).double(), -1)[0]
    first = r.logprobs[0]
    assert first.token == r.token_ids[0] == int(expected.argmax())
    assert abs(first.logprob - float(expected[first.token])) < 1e-4
    assert [t for t, _ in first.top] == expected.topk(3).indices.tolist()
    assert all(lp.logprob <= 0 and lp.top[0][0] == lp.token for lp in r.logprobs)  # greedy: the top one


def test_the_backend_serves_gguf_files_on_cpu_only(tiny_models):
    _, hf_dir = tiny_models["llama"]
    with pytest.raises(LoadError, match="GGUF files on CPU"):
        load_model(hf_dir, backend="llama.cpp", tokenizer=False, max_seq_len=32)
    with pytest.raises(ValueError, match="unknown backend"):
        load_model(hf_dir, backend="vllm", tokenizer=False, max_seq_len=32)


def test_without_llama_cpp_the_error_says_how_to_install(tiny_gguf, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    with pytest.raises(LoadError, match="install llama-cpp-python"):
        load_model(tiny_gguf, backend="llama.cpp", tokenizer=False, max_seq_len=32)


def test_serve_model_with_the_llama_cpp_backend(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "concilium.cli", "serve-model", "--model", "smollm2-135m-instruct",
           "--backend", "llama.cpp", "--port", str(port), "--max-batch", "2", "--max-seq-len", "256",
           "--threads", "1", "--served-model-name", "smol"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_json("GET", base + "/health")[0] == 200, 180, "serve-model", proc, log)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="smol", messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=10,
                  temperature=0, logprobs=True, top_logprobs=2)
        r = client.chat.completions.create(**kw)
        content = r.choices[0].logprobs.content
        assert r.choices[0].message.content == "".join(t.token for t in content)
        assert all(t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)
        streamed = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                    if c.choices]
        assert "".join(streamed) == r.choices[0].message.content
        assert r.usage.completion_tokens == len(content) + (r.choices[0].finish_reason == "stop")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
