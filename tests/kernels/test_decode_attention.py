from __future__ import annotations

import pytest
import torch

from concilium.kernels.decode_attention import decode_attention_torch, decode_attention_triton, plan_splits
from tests.kernels.helpers import assert_close, guarded_copy, guarded_empty

SLOTS = 5


def naive(q, k_cache, v_cache, slots, seq_lens, scale) -> torch.Tensor:
    """softmax(scale q.K) V per sequence and head, in float64; no keys gives zeros."""
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n, s = int(seq_lens[b]), int(slots[b])
        for h in range(Hq):
            if n == 0:
                continue
            keys = k_cache[s, h // group, :n].double().cpu()
            values = v_cache[s, h // group, :n].double().cpu()
            p = torch.softmax(keys @ q[b, h].double().cpu() * scale, dim=0)
            out[b, h] = p @ values
    return out


def make_cache(B, Hk, L, D, seq_lens, dtype, device):
    """Caches whose every unused position (and every unused slot) is NaN."""
    k_cache = torch.full((SLOTS, Hk, L, D), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.randperm(SLOTS)[:B]
    for b in range(B):
        n = int(seq_lens[b])
        k_cache[slots[b], :, :n] = torch.randn(Hk, n, D).to(dtype)
        v_cache[slots[b], :, :n] = torch.randn(Hk, n, D).to(dtype)
    return k_cache.to(device), v_cache.to(device), slots.to(device)


CASES = [
    # (B, Hq, Hk, D, cache length, seq_lens, dtype, config)
    (1, 4, 4, 32, 20, [20], torch.float32, None),  # plain multi-head, one split
    (3, 8, 2, 48, 80, [80, 1, 37], torch.float16, {"BLOCK_N": 16, "MIN_PROGRAMS": 64, "MAX_SPLITS": 4}),
    (2, 6, 2, 64, 70, [70, 33], torch.bfloat16, {"BLOCK_N": 16, "MIN_PROGRAMS": 64, "MAX_SPLITS": 8}),
    (4, 16, 2, 32, 96, [96, 0, 5, 64], torch.float32, {"BLOCK_N": 32, "MIN_PROGRAMS": 16, "MAX_SPLITS": 3}),
]


@pytest.mark.parametrize(("B", "Hq", "Hk", "D", "L", "lens", "dtype", "config"), CASES)
def test_matches_definition(device, B, Hq, Hk, D, L, lens, dtype, config):
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    k_cache, v_cache, slots = make_cache(B, Hk, L, D, seq_lens, dtype, device)
    seq_lens = seq_lens.to(device)
    q = torch.randn(B, Hq, D).to(dtype).to(device)
    scale = D**-0.5
    expected = naive(q, k_cache, v_cache, slots, seq_lens, scale)
    src, out = guarded_copy(q), guarded_empty((B, Hq, D), dtype, device)
    got = decode_attention_triton(
        src.view, k_cache, v_cache, slots, seq_lens, scale, out=out.view, config=config
    )
    assert out.intact(), "kernel wrote outside its output"
    assert_close(got, expected, dtype)
    assert_close(decode_attention_torch(q, k_cache, v_cache, slots, seq_lens, scale), expected, dtype)


def test_split_plan_covers_the_context():
    cfg = {"BLOCK_N": 64, "MIN_PROGRAMS": 256, "MAX_SPLITS": 16}
    for batch, heads, context in [(1, 8, 4096), (64, 8, 4096), (1, 4, 100), (3, 2, 1), (1, 1, 0)]:
        splits, split_len = plan_splits(cfg, batch, heads, context)
        assert 1 <= splits <= 16 and split_len % 64 == 0
        assert splits * split_len >= context and (splits - 1) * split_len < max(context, 1)
    assert plan_splits(cfg, 1, 8, 4096)[0] == 16  # long context, small batch: split
    assert plan_splits(cfg, 64, 8, 4096)[0] == 1  # enough programs already


def test_max_seq_len_bounds_the_context(device):
    seq_lens = torch.tensor([12, 30], dtype=torch.int32)
    k_cache, v_cache, slots = make_cache(2, 2, 64, 32, seq_lens, torch.float32, device)
    q = torch.randn(2, 4, 32, device=device)
    seq_lens = seq_lens.to(device)
    cfg = {"BLOCK_N": 16, "MIN_PROGRAMS": 32, "MAX_SPLITS": 4}
    full = naive(q, k_cache, v_cache, slots, seq_lens, 0.2)
    assert_close(
        decode_attention_triton(q, k_cache, v_cache, slots, seq_lens, 0.2, 30, config=cfg),
        full,
        torch.float32,
    )
    # A bound below a sequence's length cuts that sequence's context, in both implementations.
    cut = naive(q, k_cache, v_cache, slots, seq_lens.clamp(max=20), 0.2)
    assert_close(
        decode_attention_triton(q, k_cache, v_cache, slots, seq_lens, 0.2, 20, config=cfg), cut, torch.float32
    )
    assert_close(decode_attention_torch(q, k_cache, v_cache, slots, seq_lens, 0.2, 20), cut, torch.float32)


def test_bad_arguments(device):
    q = torch.randn(2, 6, 32, device=device)
    cache = torch.zeros(3, 4, 16, 32, device=device)
    slots = torch.tensor([0, 1], device=device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention_triton(q, cache, cache, slots, lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        decode_attention_torch(q[:, :4], cache, cache, slots, lens[:1], 1.0)
    with pytest.raises(TypeError, match="v_cache must have the dtype"):
        decode_attention_triton(q[:, :4], cache, cache.half(), slots, lens, 1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        decode_attention_triton(q[:, :4], cache, cache, slots, lens, 1.0, max_seq_len=17)
