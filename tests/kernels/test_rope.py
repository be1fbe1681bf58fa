from __future__ import annotations

import pytest
import torch

from concilium.kernels.rope import rope_kv_write_torch, rope_kv_write_triton
from tests.kernels.helpers import assert_close, guarded_copy, guarded_empty

SLOTS, MAX_LEN, MAX_POS = 4, 40, 50


def tables(D: int, full: bool, dtype=torch.float32):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.arange(MAX_POS, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if full:  # the Hugging Face layout: the frequencies twice
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return cos.to(dtype), sin.to(dtype)


def rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE written as complex multiplication (x1 + i x2) * e^(i pos freq), in float64."""
    D = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    phase = torch.polar(
        torch.ones(len(positions), D // 2, dtype=torch.float64), positions.cpu().double()[:, None] * inv_freq
    )
    xd = x.double().cpu()
    z = torch.complex(xd[..., : D // 2], xd[..., D // 2 :]) * phase[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


CASES = [
    # (T, Hq, Hk, D, full table, dtype)
    (1, 8, 2, 32, False, torch.float32),  # decode, grouped-query heads
    (9, 6, 3, 48, True, torch.float16),  # prefill, odd head counts, head_dim not a power of two
    (5, 4, 4, 64, True, torch.bfloat16),
    (3, 5, 1, 16, False, torch.float32),  # one kv head
]


@pytest.mark.parametrize(("T", "Hq", "Hk", "D", "full", "dtype"), CASES)
def test_matches_definition_and_writes_only_its_cache_rows(device, T, Hq, Hk, D, full, dtype):
    q, k, v = (torch.randn(T, h, D).to(dtype).to(device) for h in (Hq, Hk, Hk))
    cos, sin = (t.to(device) for t in tables(D, full))
    positions = torch.randperm(MAX_LEN)[:T].to(device)
    slots = torch.randint(0, SLOTS, (T,)).to(device)
    caches = {}
    for impl in ("triton", "torch"):
        k_cache = torch.full((SLOTS, Hk, MAX_LEN, D), float("nan"), dtype=dtype, device=device)
        v_cache = k_cache.clone()
        if impl == "triton":
            srcs = [guarded_copy(t) for t in (q, k, v)]
            outs = guarded_empty((T, Hq, D), dtype, device), guarded_empty((T, Hk, D), dtype, device)
            q_rot, k_rot = rope_kv_write_triton(
                *(s.view for s in srcs), cos, sin, positions, k_cache, v_cache, slots,
                out=(outs[0].view, outs[1].view), config={"BLOCK_HEADS": 2},
            )  # fmt: skip
            assert all(o.intact() for o in outs), "kernel wrote outside its outputs"
        else:
            q_rot, k_rot = rope_kv_write_torch(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
        assert_close(q_rot, rotated(q, positions), dtype)
        assert_close(k_rot, rotated(k, positions), dtype)
        written = torch.zeros(SLOTS, MAX_LEN, dtype=torch.bool)
        written[slots.cpu(), positions.cpu()] = True
        for cache in (k_cache, v_cache):  # untouched rows still NaN, written rows all numbers
            assert cache.isnan().all(-1).all(1).cpu().eq(~written).all()
            assert not cache.isnan().any(-1).any(1).cpu()[written].any()
        assert torch.equal(v_cache[slots, :, positions], v)
        assert torch.equal(k_cache[slots, :, positions], k_rot)
        caches[impl] = k_cache
    assert_close(caches["triton"].nan_to_num(), caches["torch"].nan_to_num(), dtype)


def test_bad_arguments(device):
    q, k, v = (
        torch.randn(2, 4, 16, device=device),
        torch.randn(2, 2, 16, device=device),
        torch.randn(2, 2, 16, device=device),
    )
    cos, sin = (t.to(device) for t in tables(16, False))
    cache = torch.zeros(2, 2, 8, 16, device=device)
    pos = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="cos must have"):
        rope_kv_write_triton(q, k, v, cos[:, :5], sin[:, :5], pos, cache, cache.clone(), pos)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        rope_kv_write_triton(q, k, v, cos, sin, pos, cache[:, :1], cache[:, :1].clone(), pos)
    with pytest.raises(TypeError, match="positions must be"):
        rope_kv_write_torch(q, k, v, cos, sin, pos.float(), cache, cache.clone(), pos)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_kv_write_torch(q[..., :15], k[..., :15], v[..., :15], cos, sin, pos, cache, cache, pos)
