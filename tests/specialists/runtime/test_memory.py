"""Parameter and memory accounting before loading, and the refusal when a model will not fit."""

from __future__ import annotations

import pytest
import torch

from concilium.specialists.runtime.config import load_hf_config
from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.memory import (
    InsufficientMemoryError,
    check_fits,
    count_params,
    kv_cache_bytes,
    plan_memory,
)
from tests.specialists.runtime import tiny


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_total_params_equal_the_checkpoint(tiny_models, arch):
    hf, path = tiny_models[arch]
    cfg = load_hf_config(path)
    expected = sum(p.numel() for p in hf.parameters())  # tied embeddings are one parameter
    assert count_params(cfg).total == expected


def test_active_params_of_moe(tiny_models):
    cfg = load_hf_config(tiny_models["qwen3_moe"][1])  # 3 layers, layer 1 dense; top-3 of 8 experts
    p = count_params(cfg)
    H, Im, Id = cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size
    experts_total = 2 * (8 * 3 * H * Im + 8 * H)
    experts_active = 2 * (3 * 3 * H * Im + 8 * H)
    assert p.mlp_total == experts_total + 3 * H * Id
    assert p.mlp_active == experts_active + 3 * H * Id
    V = cfg.vocab_size
    # not read for a token: 5 of 8 experts in 2 layers, and the input embedding but for one row
    assert p.total - p.active == 2 * (8 - 3) * 3 * H * Im + V * H - H
    dense = count_params(load_hf_config(tiny_models["qwen3"][1]))
    assert dense.total - dense.active == V * H - H


def test_kv_cache_bytes_match_the_allocation():
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(3, 5, 2, 48, 16, dtype, "cpu")
        assert cache.nbytes == KVCache.bytes_needed(3, 5, 2, 48, 16, dtype)


def test_refuses_when_it_does_not_fit(tiny_models):
    cfg = load_hf_config(tiny_models["llama"][1])
    plan = plan_memory(cfg, torch.float32, max_batch=8, max_seq_len=256)
    assert plan.kv_cache_bytes == kv_cache_bytes(cfg, 8, 256, torch.float32)
    assert plan.total_bytes > plan.weight_bytes + plan.kv_cache_bytes
    check_fits(plan, "cpu", available=plan.total_bytes)
    with pytest.raises(InsufficientMemoryError, match=r"does not fit on cpu.*--max-seq-len or --max-batch"):
        check_fits(plan, "cpu", available=plan.total_bytes - 1)
    with pytest.raises(InsufficientMemoryError, match="KV cache"):
        load_model(
            tiny_models["llama"][1], tokenizer=False, max_seq_len=256, available_bytes=plan.weight_bytes
        )
    half = plan_memory(cfg, torch.bfloat16, max_batch=8, max_seq_len=256)
    assert half.weight_bytes * 2 == plan.weight_bytes and half.kv_cache_bytes * 2 == plan.kv_cache_bytes
