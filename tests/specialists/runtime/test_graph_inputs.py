"""The CUDA-graph decode path's inputs, checked on CPU: a step staged into the static, padded
buffers (padding rows write only to the reserved slot, no host-side length bound) gives the same
logits as the eager step. Capture and replay themselves need a GPU (test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.cuda_graphs import DecodeGraphRunner, buckets_for
from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.model import ForwardBatch


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert buckets_for(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_padded_static_batch_equals_eager(tiny_models, backend):
    model = load_model(
        tiny_models["qwen3_moe"][1], tokenizer=False, max_seq_len=64, ops_backend=backend
    ).model
    c = model.cfg

    def cache() -> KVCache:
        return KVCache(c.num_layers, 5, c.num_kv_heads, 64, c.head_dim, model.dtype, model.device)

    eager_cache, graph_cache = cache(), cache()
    prompts = {0: [5, 6, 7], 2: [9, 10, 11, 12, 13], 1: [40]}
    with torch.inference_mode():
        for kv in (eager_cache, graph_cache):
            model(ForwardBatch.for_prefill([(p, s) for s, p in prompts.items()], model.device), kv)
        slots = list(prompts)
        tokens = [21, 22, 23]
        positions = [len(prompts[s]) for s in slots]
        eager = model(ForwardBatch.for_decode(tokens, slots, positions, model.device), eager_cache)
        runner = DecodeGraphRunner(model, graph_cache, max_batch=4, pad_slot=4)
        bs = runner.stage(tokens, slots, positions)
        assert bs == 4
        staged = model(runner.batch(bs), graph_cache)[:3]
    assert (staged - eager).abs().max().item() < 1e-5
    # the padding row wrote into slot 4 only; the real slots hold the eager run's cache (up to the
    # rounding of a 4-row instead of a 3-row matmul)
    for s in slots:
        assert torch.allclose(graph_cache.k[:, s], eager_cache.k[:, s], atol=1e-5)
        assert torch.allclose(graph_cache.v[:, s], eager_cache.v[:, s], atol=1e-5)
    assert graph_cache.k[:, 3].abs().sum() == 0 and graph_cache.k[:, 4, :, 0].abs().sum() > 0
