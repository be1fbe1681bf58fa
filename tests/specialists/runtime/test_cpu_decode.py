"""The fused CPU decode step (`cpu_decode`): one C call per decode step of one sequence, against the
same int4 weights and KV cache as the torch path. Its logits, its cache writes and the answers built
on them must be the torch path's (within the torch path's own bf16 rounding)."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.cpu_decode import FusedDecode, library
from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.model import ForwardBatch
from concilium.specialists.runtime.sampling import SamplingParams

PROMPT = [(i * 13 + 3) % 160 for i in range(9)]


def test_the_step_compiles_here():
    """A C compiler is part of this project's set-up (`.ci/run`, the README): no silent fallback in CI."""
    assert library() is not None and library(portable=True) is not None


def _decode_logits(model, fused: FusedDecode | None, steps: int = 6):
    """Prefill PROMPT in slot 1 with the torch path, then decode `steps` tokens one at a time."""
    model.fused = fused
    cache = model.new_cache(3, 64)
    with torch.inference_mode():
        model(ForwardBatch.for_prefill([(PROMPT, 1)], model.device), cache)
        out, pos = [], len(PROMPT)
        for t in range(steps):
            token = (t * 29 + 7) % 160
            out.append(model(ForwardBatch.for_decode([token], [1], [pos], model.device), cache))
            pos += 1
    return torch.cat(out), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q, k and v
@pytest.mark.parametrize("portable", [False, True])
def test_fused_step_matches_the_torch_path(tiny_models, arch, portable):
    _, path = tiny_models[arch]
    model = load_model(path, weights="int4", max_batch=3, max_seq_len=64, tokenizer=False).model
    fused = FusedDecode.create(model, portable=portable)
    assert fused is not None
    want, want_cache = _decode_logits(model, None)
    got, got_cache = _decode_logits(model, fused)
    # The torch path rounds each projection's output to bf16; the fused step keeps fp32.
    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() < 0.02 * b.abs().max())

    assert close(got, want), (got - want).abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    n = len(PROMPT) + 6
    assert close(got_cache.k[:, 1, :, :n], want_cache.k[:, 1, :, :n])
    assert close(got_cache.v[:, 1, :, :n], want_cache.v[:, 1, :, :n])
    assert got_cache.k[:, [0, 2]].abs().sum() == 0  # other slots untouched


def test_models_the_step_does_not_cover_keep_the_torch_path(tiny_models):
    for arch in ("qwen3", "mixtral"):  # q/k norms; experts
        _, path = tiny_models[arch]
        model = load_model(path, weights="int4", max_batch=2, max_seq_len=64, tokenizer=False).model
        assert model.fused is None and model.describe()["decode_b1"] == "torch"
    _, path = tiny_models["llama"]
    dense = load_model(path, weights="dense", max_batch=2, max_seq_len=64, tokenizer=False).model
    assert dense.fused is None


def test_smollm2_answers_are_the_torch_paths(smollm2_path):
    """Greedy answers, one sequence and two at once (batch 2 runs the torch path, batch 1 the fused
    step, and the engine moves between them as sequences finish)."""
    loaded = load_model(smollm2_path, weights="auto", max_batch=2, max_seq_len=256)
    model, tok = loaded.model, loaded.tokenizer
    assert model.describe()["decode_b1"] == "fused C step"
    engine = Engine(model, tok, max_batch=2, max_seq_len=256)
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 3?"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(max_tokens=40, temperature=0)
    fused = model.fused

    def answers() -> list[str]:
        one = [engine.generate_batch([p], greedy)[0].text for p in prompts]
        two = [r.text for r in engine.generate_batch(prompts[:2], greedy)]
        return one + two

    got = answers()
    model.fused = None
    want = answers()
    model.fused = fused
    assert got == want
    assert "Paris" in got[0]
