"""The runtime's hot ops in plain torch: the CPU path, and the fallback anywhere the Triton kernels are
not available. Signatures follow the kernels' dispatchers (`concilium.kernels`), plus optional
host-side hints (`max_len`, `slot_range`) that let the CPU path avoid copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Routing and the expert MLP have no CPU-specific shortcut: the kernels' references are the CPU path.
from concilium.kernels.fused_moe import fused_moe_torch as fused_moe  # noqa: F401
from concilium.kernels.router_topk import router_topk_torch as router_topk  # noqa: F401


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one op: the same math, fp32 throughout
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rmsnorm(new_residual, weight, eps), new_residual


def rope_tables_at(
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple:
    """Per-token factors for `rope_kv_write(..., gathered=)`: [T, 1, 2, D/2] cos and signed sin."""
    c, s = cos[positions].to(dtype), sin[positions].to(dtype)
    return torch.stack((c, c), 1)[:, None], torch.stack((-s, s), 1)[:, None]


def _rotate(x: torch.Tensor, c2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s], halves viewed as a size-2 axis."""
    t, h, d = x.shape
    x2 = x.reshape(t, h, 2, d // 2)
    return (x2 * c2 + x2.flip(2) * s2).view(t, h, d)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    *,
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T,Hq,D] and k [T,Hk,D]; write rotated k and v at k_cache[slots[t], :, positions[t]].
    `gathered`: `rope_tables_at(cos, sin, positions)`, computed once per forward instead of per layer."""
    c2, s2 = gathered if gathered is not None else rope_tables_at(cos, sin, positions, q.dtype)
    q_rot = _rotate(q, c2, s2)
    k_rot = _rotate(k, c2, s2)
    k_cache[slots, :, positions] = k_rot
    v_cache[slots, :, positions] = v
    return q_rot, k_rot


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_len: int | None = None,
    slot_range: tuple[int, int] | None = None,
    uniform: bool = False,
) -> torch.Tensor:
    """q [B,Hq,D], one new token per sequence, attending over its cache [0, seq_lens[b]).

    `max_len` is the largest seq_len, `slot_range` = (first, count) when the slots are consecutive,
    `uniform` when every sequence has the same length (no mask needed).
    """
    if max_len is None:
        max_len = int(seq_lens.max())
    if slot_range is not None:
        first, count = slot_range
        k = k_cache[first : first + count, :, :max_len]
        v = v_cache[first : first + count, :, :max_len]
    else:
        k = k_cache[:, :, :max_len].index_select(0, slots)
        v = v_cache[:, :, :max_len].index_select(0, slots)
    b, hq, d = q.shape
    hk = k.shape[1]
    # Grouped-query attention as two small batched matmuls: [B, Hk, G, D] x [B, Hk, D, L].
    scores = torch.matmul(q.view(b, hk, hq // hk, d), k.transpose(-1, -2)).mul_(scale)
    if not uniform:
        pos = torch.arange(max_len, device=q.device)
        hidden = pos[None, :] >= seq_lens[:, None].to(pos.dtype)  # [B, L]
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).view(b, hq, d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of one fresh sequence: q [T,Hq,D], k/v [T,Hk,D] -> [T,Hq,D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)
