"""On a CUDA device: the runtime with the Triton kernels matches transformers, and decode steps
replayed from CUDA graphs give exactly the tokens of eager decode steps."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.model import ForwardBatch
from concilium.specialists.runtime.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[5, 17, 99, 3], [42, 150, 8, 8, 61, 7, 7, 90, 11], [1], [33, 44, 55, 66, 77, 88]]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe", "mixtral"])
def test_kernels_on_cuda_match_transformers(tiny_models, arch):
    hf, path = tiny_models[arch]
    model = load_model(path, tokenizer=False, device="cuda", dtype="float32", max_seq_len=64).model
    assert model.ops.name == "kernels"
    ids = torch.arange(3, 23) * 7 % hf.config.vocab_size
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    c = model.cfg
    cache = KVCache(c.num_layers, 2, c.num_kv_heads, 64, c.head_dim, model.dtype, model.device)
    with torch.inference_mode():
        model(ForwardBatch.for_prefill([(ids[:12].tolist(), 1)], model.device), cache)
        for pos in range(12, 20):
            out = model(ForwardBatch.for_decode([int(ids[pos])], [1], [pos], model.device), cache)
            # fp32 dots run as TF32 on the GPU
            assert (out[0].cpu() - ref[pos]).abs().max().item() < 3e-2


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_cuda_graph_decode_equals_eager(tiny_models, arch):
    path = tiny_models[arch][1]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (16, 9, 21, 4)]
    outputs = []
    for graphs in (True, False):
        loaded = load_model(
            path, tokenizer=False, device="cuda", dtype="bfloat16", max_batch=4, max_seq_len=64
        )
        engine = Engine(loaded.model, max_batch=4, max_seq_len=64, cuda_graphs=graphs)
        outputs.append([r.token_ids for r in engine.generate_batch(PROMPTS, params)])
        if graphs:
            assert engine.graph_runner is not None and not engine.graph_runner.disabled
            assert sorted(engine.graph_runner.graphs) == [1, 2, 4]
    assert outputs[0] == outputs[1]
