"""Compiled kernels on a CUDA device at the real models' shapes (run when a GPU is lent).

The other test files of this folder also run on CUDA there (their `device` fixture is "cuda");
these add the full-size shapes, bf16 on the real hardware, TF32 staying off for fp32, and the
capture of a whole decode step in a CUDA graph (no host synchronisation in any kernel path).
"""

from __future__ import annotations

import pytest
import torch

from concilium.kernels._triton import interpreting
from concilium.kernels.decode_attention import decode_attention_torch, decode_attention_triton
from concilium.kernels.fused_moe import fused_moe_torch, fused_moe_triton
from concilium.kernels.moe_align import moe_align_torch, moe_align_triton
from concilium.kernels.rmsnorm import add_rmsnorm_torch, add_rmsnorm_triton, rmsnorm_torch, rmsnorm_triton
from concilium.kernels.rope import rope_kv_write_torch, rope_kv_write_triton
from concilium.kernels.router_topk import router_topk_torch, router_topk_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs a CUDA device"),
]

QWEN3_30B_A3B = {"H": 2048, "I": 768, "E": 128, "k": 8}
MIXTRAL_8X7B = {"H": 4096, "I": 14336, "E": 8, "k": 2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def moe_problem(T: int, H: int, I: int, E: int, k: int, dtype=torch.bfloat16):  # noqa: E741
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype)
    weights, ids = router_topk_torch(torch.randn(T, E, device="cuda"), k)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("model", [QWEN3_30B_A3B, MIXTRAL_8X7B], ids=["qwen3-30b-a3b", "mixtral-8x7b"])
@pytest.mark.parametrize("T", [1, 16, 256])
def test_fused_moe_bf16_at_model_shapes(model, T):
    x, w13, w2, weights, ids = moe_problem(T, **model)
    got = fused_moe_triton(x, w13, w2, weights, ids)
    ref = fused_moe_torch(x, w13, w2, weights, ids)
    assert not got.isnan().any()
    assert relative_error(got, ref) < 1e-2


def test_fused_moe_fp32_is_not_tf32():
    """fp32 weights give fp32 accuracy (TF32 would be ~1e-3 off), as the runtime's parity tests need."""
    x, w13, w2, weights, ids = moe_problem(16, 256, 96, 8, 2, torch.float32)
    got = fused_moe_triton(x, w13, w2, weights, ids)
    exact = torch.zeros(16, 256, dtype=torch.float64, device="cuda")
    for t in range(16):
        for j in range(2):
            e = int(ids[t, j])
            gate_up = w13[e].double() @ x[t].double()
            act = torch.nn.functional.silu(gate_up[:96]) * gate_up[96:]
            exact[t] += weights[t, j].double() * (w2[e].double() @ act)
    assert relative_error(got, exact) < 1e-5


@pytest.mark.parametrize("T", [1, 4096])
def test_moe_align_exact_at_model_shapes(T):
    ids = router_topk_torch(torch.randn(T, 128, device="cuda"), 8)[1]
    for block in (16, 64):
        for got, ref in zip(moe_align_triton(ids, 128, block), moe_align_torch(ids, 128, block), strict=True):
            assert torch.equal(got, ref)


def test_router_topk_at_model_shapes():
    logits = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)  # bf16 logits tie often
    w, ids = router_topk_triton(logits, 8)
    ref_w, ref_ids = router_topk_torch(logits, 8)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("H", [128, 2048, 4096])
def test_norms_bf16(H):
    x, r = (
        torch.randn(256, H, device="cuda", dtype=torch.bfloat16),
        torch.randn(256, H, device="cuda", dtype=torch.bfloat16),
    )
    w = torch.randn(H, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(rmsnorm_triton(x, w, 1e-6), rmsnorm_torch(x, w, 1e-6), atol=2e-2, rtol=2e-2)
    y, s = add_rmsnorm_triton(x, r, w, 1e-6)
    ref_y, ref_s = add_rmsnorm_torch(x, r, w, 1e-6)
    assert torch.equal(s, ref_s)
    torch.testing.assert_close(y, ref_y, atol=2e-2, rtol=2e-2)


def test_rope_kv_write_bf16():
    T, Hq, Hk, D = 64, 32, 4, 128
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hk, Hk))
    angles = torch.arange(4096, device="cuda")[:, None] / (1e6 ** (torch.arange(0, D, 2, device="cuda") / D))
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    positions = torch.arange(100, 100 + T, device="cuda")
    slots = torch.full((T,), 3, device="cuda")
    caches = [torch.zeros(8, Hk, 4096, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    got = rope_kv_write_triton(q, k, v, cos, sin, positions, caches[0], caches[1], slots)
    ref = rope_kv_write_torch(q, k, v, cos, sin, positions, caches[2], caches[3], slots)
    for a, b in zip((*got, caches[0], caches[1]), (*ref, caches[2], caches[3]), strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("B", [1, 16])
def test_decode_attention_long_context_bf16(B):
    Hq, Hk, D, L = 32, 4, 128, 8192
    k_cache = torch.randn(B, Hk, L, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(B, Hk, L, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(B, device="cuda")
    seq_lens = torch.randint(1, L + 1, (B,), device="cuda", dtype=torch.int32)
    seq_lens[0] = L
    got = decode_attention_triton(q, k_cache, v_cache, slots, seq_lens, D**-0.5)
    ref = decode_attention_torch(q, k_cache, v_cache, slots, seq_lens, D**-0.5)
    assert relative_error(got, ref) < 1e-2


def test_a_decode_step_captures_in_a_cuda_graph():
    """router top-k, fused MoE, norms, RoPE + cache write and attention replay from a CUDA graph."""
    B, H, I, E, k, Hq, Hk, D, L = 4, 512, 256, 16, 2, 8, 2, 64, 256  # noqa: E741
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(B, H, device=dev, dtype=dt)
    residual = torch.randn(B, H, device=dev, dtype=dt)
    norm_w = torch.randn(H, device=dev, dtype=dt)
    gate = torch.randn(E, H, device=dev, dtype=dt) / H**0.5
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H**0.5).to(dt)
    w2 = (torch.randn(E, H, I, device=dev) / I**0.5).to(dt)
    q = torch.randn(B, Hq, D, device=dev, dtype=dt)
    kv = torch.randn(B, Hk, D, device=dev, dtype=dt)
    angles = torch.arange(L, device=dev)[:, None] / (1e4 ** (torch.arange(0, D, 2, device=dev) / D))
    cos, sin = angles.cos(), angles.sin()
    positions = torch.tensor([5, 17, 0, 100], device=dev)
    slots = torch.arange(B, device=dev)
    k_cache = torch.randn(B, Hk, L, D, device=dev, dtype=dt)
    v_cache = torch.randn(B, Hk, L, D, device=dev, dtype=dt)

    def step():
        h, res = add_rmsnorm_triton(x, residual, norm_w, 1e-6)
        weights, ids = router_topk_triton(h @ gate.t(), k)
        moe = fused_moe_triton(h, w13, w2, weights, ids)
        q_rot, _ = rope_kv_write_triton(q, kv, kv, cos, sin, positions, k_cache, v_cache, slots)
        attn = decode_attention_triton(
            q_rot, k_cache, v_cache, slots, (positions + 1).to(torch.int32), D**-0.5
        )
        return moe + res, attn

    eager = [t.clone() for t in step()]  # also compiles every kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    x.copy_(torch.randn_like(x))
    positions.copy_(torch.tensor([6, 18, 1, 101], device=dev))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in static]
    again = step()
    for a, b in zip(replayed, again, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(replayed[0], eager[0])  # the replay saw the new inputs
