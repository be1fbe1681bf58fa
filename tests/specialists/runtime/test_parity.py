"""The runtime against transformers' own implementation, on tiny random checkpoints of every
supported architecture: fp32 logits within 1e-4 (prefill and decode), identical greedy
continuations over 32 tokens, identical expert choices. Each runs with the runtime's torch ops and
through the `concilium.kernels` dispatchers (their CPU path)."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.model import ForwardBatch, Model
from concilium.specialists.runtime.sampling import SamplingParams
from tests.specialists.runtime import tiny

ARCHS = list(tiny.ARCHS)
BACKENDS = ["torch", "kernels"]
TOL = 1e-4


def _load(path, backend: str) -> Model:
    return load_model(path, tokenizer=False, max_batch=4, max_seq_len=128, ops_backend=backend).model


def _cache(model: Model, slots: int = 4, length: int = 128) -> KVCache:
    c = model.cfg
    return KVCache(c.num_layers, slots, c.num_kv_heads, length, c.head_dim, model.dtype, model.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_models, arch, backend):
    hf, path = tiny_models[arch]
    model = _load(path, backend)
    assert model.ops.name == backend
    ids = torch.randint(0, hf.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]

    # prefill of the whole sequence, logits at every position
    batch = ForwardBatch.for_prefill([(ids.tolist(), 2)], model.device)
    batch.logits_index = None
    with torch.inference_mode():
        out = model(batch, _cache(model))
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOL

    # prefill the first 12 tokens, then decode the rest one at a time against the cache
    cache = _cache(model)
    with torch.inference_mode():
        last = model(ForwardBatch.for_prefill([(ids[:12].tolist(), 1)], model.device), cache)
        assert (last[0] - ref[11]).abs().max().item() < TOL
        for pos in range(12, 20):
            step = model(ForwardBatch.for_decode([int(ids[pos])], [1], [pos], model.device), cache)
            assert (step[0] - ref[pos]).abs().max().item() < TOL, f"decode position {pos}"


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # run all n tokens, as the runtime does with ignore_eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuation_matches_transformers(tiny_models, arch, backend):
    hf, path = tiny_models[arch]
    engine = Engine(_load(path, backend), max_batch=4, max_seq_len=128)
    prompt = [5, 17, 99, 3, 42, 150, 8]
    ours = engine.generate_batch([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert ours.token_ids == _hf_greedy(hf, prompt, 32)
    assert ours.completion_tokens == 32 and ours.finish_reason == "length"


def _hf_expert_ids(hf, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer -> expert ids [T, k] (sorted per token) from transformers' router logits."""
    cfg = hf.config
    with torch.no_grad():
        out = hf(ids[None], output_router_logits=True)
    sparse = [i for i in range(cfg.num_hidden_layers) if i not in getattr(cfg, "mlp_only_layers", [])]
    logits = [r for r in out.router_logits if r is not None]
    assert len(logits) == len(sparse)
    k = cfg.num_experts_per_tok
    return {
        layer: torch.topk(torch.softmax(r.float(), -1), k, dim=-1).indices.sort(-1).values
        for layer, r in zip(sparse, logits, strict=True)
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_choices_match_transformers(tiny_models, arch, backend):
    hf, path = tiny_models[arch]
    model = _load(path, backend)
    ids = torch.randint(0, hf.config.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    ref = _hf_expert_ids(hf, ids)
    # prefill 16 tokens then decode 8: the choices of every token, in both paths
    model.routing_trace = []
    cache = _cache(model)
    with torch.inference_mode():
        model(ForwardBatch.for_prefill([(ids[:16].tolist(), 0)], model.device), cache)
        for pos in range(16, 24):
            model(ForwardBatch.for_decode([int(ids[pos])], [0], [pos], model.device), cache)
    ours: dict[int, list[torch.Tensor]] = {}
    for layer, chosen in model.routing_trace:
        ours.setdefault(layer, []).append(chosen.long().sort(-1).values)
    assert sorted(ours) == sorted(ref) == model.cfg.moe_layers
    for layer, parts in ours.items():
        assert torch.equal(torch.cat(parts), ref[layer]), f"layer {layer}"
    # the load-balance counters saw every routed token
    load = model.expert_load()
    assert all(sum(counts) == 24 * model.cfg.num_experts_per_tok for counts in load.values())
    for layer, counts in load.items():
        assert counts == torch.bincount(ref[layer].flatten(), minlength=model.cfg.num_experts).tolist()
