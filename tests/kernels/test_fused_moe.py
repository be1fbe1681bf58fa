from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from concilium.kernels.fused_moe import fused_moe_torch, fused_moe_triton
from concilium.kernels.router_topk import router_topk_torch
from tests.kernels.helpers import assert_close, guarded_copy, guarded_empty


def naive_moe(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, token by token and expert by expert, in float64."""
    T, H = x.shape
    inter = w2.shape[2]
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            gate_up = w13[e].double().cpu() @ x[t].double().cpu()
            act = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(weights[t, j]) * (w2[e].double().cpu() @ act)
    return out


def make_problem(T, H, inter, E, k, dtype, device, used=None):
    x = torch.randn(T, H)
    w13 = torch.randn(E, 2 * inter, H) / H**0.5
    w2 = torch.randn(E, H, inter) / inter**0.5
    logits = torch.randn(T, E)
    if used is not None:
        logits[:, used:] = -1e4  # the last experts receive no tokens
    weights, ids = router_topk_torch(logits, k)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


def guarded_weights(w: torch.Tensor):
    """Weights as a view with a NaN expert on each side and NaN rows and columns around each matrix."""
    E, rows, cols = w.shape
    buf = torch.full((E + 2, rows + 3, cols + 5), float("nan"), dtype=w.dtype, device=w.device)
    view = buf[1 : E + 1, 2 : rows + 2, 1 : cols + 1]
    view.copy_(w)
    return view


CASES = [
    # (T, H, I, E, k, dtype, used experts)
    (1, 64, 48, 8, 2, torch.float32, None),  # Mixtral-like decode
    (4, 64, 40, 16, 4, torch.float16, 12),  # experts 12..15 get nothing
    (33, 64, 96, 8, 2, torch.bfloat16, None),  # prefill-like, several blocks per expert
    (7, 80, 33, 6, 3, torch.float32, 4),  # odd sizes everywhere
    (2, 64, 32, 64, 8, torch.float16, None),  # Qwen3-like top-8 of many experts
]


@pytest.mark.parametrize(("T", "H", "inter", "E", "k", "dtype", "used"), CASES)
def test_matches_definition_and_reference(device, T, H, inter, E, k, dtype, used):
    x, w13, w2, weights, ids = make_problem(T, H, inter, E, k, dtype, device, used)
    expected = naive_moe(x, w13, w2, weights, ids)
    scale = expected.abs().max().item()
    src = guarded_copy(x)
    out = guarded_empty((T, H), dtype, device)
    got = fused_moe_triton(src.view, guarded_weights(w13), guarded_weights(w2), weights, ids, out=out.view)
    assert got.data_ptr() == out.view.data_ptr()
    assert out.intact(), "kernel wrote outside its output"
    ref = fused_moe_torch(x, w13, w2, weights, ids)
    assert_close(got, expected, dtype, scale=max(scale, 1.0))
    assert_close(ref, expected, dtype, scale=max(scale, 1.0))


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16},  # many K steps, partial last N block
        {"BLOCK_M": 16, "BLOCK_N": 64, "DOWN_BLOCK_N": 16, "BLOCK_K": 64},  # one K step over H
    ],
)
def test_block_configurations(device, config):
    x, w13, w2, weights, ids = make_problem(13, 80, 40, 8, 2, torch.float32, device)
    got = fused_moe_triton(x, w13, w2, weights, ids, config=config)
    assert_close(got, naive_moe(x, w13, w2, weights, ids), torch.float32)


def test_invalid_expert_ids_contribute_nothing(device):
    x, w13, w2, weights, ids = make_problem(5, 64, 32, 8, 2, torch.float32, device)
    ids[1, 0], ids[3, 1] = -1, 8
    expected = naive_moe(x, w13, w2, weights, ids)
    assert_close(fused_moe_triton(x, w13, w2, weights, ids), expected, torch.float32)
    assert_close(fused_moe_torch(x, w13, w2, weights, ids), expected, torch.float32)


def test_no_tokens(device):
    x, w13, w2, weights, ids = make_problem(0, 64, 32, 4, 2, torch.float32, device)
    assert fused_moe_triton(x, w13, w2, weights, ids).shape == (0, 64)
    assert fused_moe_torch(x, w13, w2, weights, ids).shape == (0, 64)


def test_bad_arguments(device):
    x, w13, w2, weights, ids = make_problem(2, 64, 32, 4, 2, torch.float32, device)
    with pytest.raises(TypeError, match="w13 must have the dtype of x"):
        fused_moe_triton(x, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="w2 must have shape"):
        fused_moe_triton(x, w13, w2[:, :, :16], weights, ids)
    with pytest.raises(ValueError, match="w13 must stack"):
        fused_moe_torch(x, w13[:, :63], w2, weights, ids)
    with pytest.raises(ValueError, match="activation"):
        fused_moe_triton(x, w13, w2, weights, ids, activation="gelu")
    with pytest.raises(ValueError, match="topk_weights must have shape"):
        fused_moe_torch(x, w13, w2, weights[:, :1], ids)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        fused_moe_triton(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids)
    with pytest.raises(ValueError, match="BLOCK_M"):
        fused_moe_triton(x, w13, w2, weights, ids, config={"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16})
