"""Fused mixture-of-experts MLP: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

Weights are stacked per layer: `w13` [E, 2I, H] holds each expert's gate rows [0, I) and up rows
[I, 2I) (nn.Linear layout, out_features first) and `w2` [E, H, I] its down projection.

The Triton path is a grouped GEMM over `moe_align`'s blocks, so every block of BLOCK_M rows
belongs to one expert and each expert's weights stream once per block:

1. gate+up: gather the block's token rows of x, multiply by the expert's gate and up rows in one
   pass (two accumulators), apply SiLU-and-multiply in the epilogue, write the activation row of
   each (token, slot) pair;
2. down: multiply the activations by the expert's down projection and scale by the routing weight
   in the epilogue, one fp32 row per pair;
3. sum the k rows of each token in fp32 and cast once to the output dtype.

Decode (a few tokens) and prefill differ only in their block configuration (configs/fused_moe.json).
Pairs whose expert id is outside [0, E) contribute nothing (see moe_align).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from concilium.kernels import configs
from concilium.kernels._triton import interpreting, tl, triton
from concilium.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_block,
    check_dtype,
    check_inner_contiguous,
    check_launch,
    check_out,
    check_shape,
    dot_precision,
)
from concilium.kernels.dispatch import use_triton
from concilium.kernels.moe_align import moe_align_triton

OP = "fused_moe"
ACTIVATIONS = ("silu",)


def _check_args(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> tuple[int, int, int, int, int]:
    """(T, H, E, I, k) after checking shapes and dtypes."""
    check_dtype(OP, "x", x, FLOAT_DTYPES)
    check_shape(OP, "x", x, (None, None))
    T, H = x.shape
    check_shape(OP, "w13", w13, (None, None, H))
    E, two_i = w13.shape[0], w13.shape[1]
    if two_i % 2:
        raise ValueError(
            f"{OP}: w13 must stack gate and up rows (an even dimension 1); got {list(w13.shape)}"
        )
    inter = two_i // 2
    check_shape(OP, "w2", w2, (E, H, inter))
    for name, w in (("w13", w13), ("w2", w2)):
        if isinstance(w, torch.Tensor) and w.dtype != x.dtype:
            raise TypeError(f"{OP}: {name} must have the dtype of x ({x.dtype}); got {w.dtype}")
    check_dtype(OP, "topk_weights", topk_weights, FLOAT_DTYPES)
    check_dtype(OP, "topk_ids", topk_ids, INDEX_DTYPES)
    check_shape(OP, "topk_ids", topk_ids, (T, None))
    k = topk_ids.shape[1]
    check_shape(OP, "topk_weights", topk_weights, (T, k))
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}; got {activation!r}")
    return T, H, E, inter, k


def _expert_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T for one expert's [N, K] weight; on CPU the weight may be 4-bit planes that multiply
    themselves (`Int4Experts` in the runtime's quant module), output in x's dtype."""
    return x @ w.t() if isinstance(w, torch.Tensor) else w(x)


def fused_moe_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Reference (and CPU path): one dense MLP per expert that received tokens.

    Matmuls run in the input dtype; the activation, the routing weight and the sum over the k
    experts are in fp32, rounded once at the end (the kernel's precision).
    """
    T, H, E, inter, k = _check_args(x, w13, w2, topk_weights, topk_ids, activation)
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    start = 0
    for e, count in zip(experts.tolist(), counts.tolist(), strict=True):
        pairs = order[start : start + count]
        start += count
        if not 0 <= e < E:
            continue
        rows = pairs // k
        gate_up = _expert_mm(x[rows], w13[e])
        act = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(x.dtype)
        y = _expert_mm(act, w2[e]).float() * flat_w[pairs, None]
        out.index_add_(0, rows, y)
    return out.to(x.dtype)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    act_ptr,
    sorted_ptr,
    expert_ids_ptr,
    total_ptr,
    n_pairs,
    H,
    INTER,
    stride_xt,
    stride_we,
    stride_wn,
    stride_at,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < n_pairs
    token = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    # Scalar bases plus int32 tile offsets: a tensor of 64-bit pointers per tile would cost two
    # registers an element for the whole loop.
    x_rows = x_ptr + token * stride_xt
    gate_base = w_ptr + expert * stride_we
    up_base = gate_base + INTER * stride_wn
    w_offs = cols[None, :] * stride_wn + ks[:, None]
    w_mask = col_ok[None, :]
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = ks < H - k0
        a = tl.load(x_rows[:, None] + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(gate_base + k0 + w_offs, mask=k_ok[:, None] & w_mask, other=0.0)
        u = tl.load(up_base + k0 + w_offs, mask=k_ok[:, None] & w_mask, other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_gate = tl.dot(a, g, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    safe_pair = tl.where(row_ok, pair, 0).to(tl.int64)
    tl.store(
        act_ptr + safe_pair[:, None] * stride_at + cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    topk_w_ptr,
    out_ptr,
    sorted_ptr,
    expert_ids_ptr,
    total_ptr,
    n_pairs,
    H,
    INTER,
    stride_at,
    stride_we,
    stride_wn,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < n_pairs
    safe_pair = tl.where(row_ok, pair, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + safe_pair * stride_at
    w_base = w_ptr + expert * stride_we
    w_offs = cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k_ok = ks < INTER - k0
        a = tl.load(a_rows[:, None] + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k0 + w_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc = acc * tl.load(topk_w_ptr + safe_pair, mask=row_ok, other=0.0)[:, None]
    tl.store(
        out_ptr + safe_pair[:, None] * stride_ot + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :]
    )


@triton.jit
def _sum_kernel(
    pair_out_ptr, ids_ptr, out_ptr, H, E, stride_pt, stride_ot, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr
):
    """out[t] = sum of the k pair rows of token t whose expert is real, rounded once."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        used = (e >= 0) & (e < E)
        acc += tl.load(pair_out_ptr + (t * TOP_K + j) * stride_pt + cols, mask=col_ok & used, other=0.0)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    *,
    out: torch.Tensor | None = None,
    config: configs.Config | None = None,
) -> torch.Tensor:
    """Triton launcher; `out` [T, H] to write into, `config` overrides the table."""
    T, H, E, inter, k = _check_args(x, w13, w2, topk_weights, topk_ids, activation)
    device = check_launch(OP, x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        check_inner_contiguous(OP, name, t)
    if max(w13.stride(0), w13.shape[1] * w13.stride(1), w2.stride(0)) >= 2**31:
        raise ValueError(f"{OP}: one expert's weights must span fewer than 2**31 elements (int32 tile offsets)")
    if out is None:
        out = torch.empty((T, H), dtype=x.dtype, device=device)
    else:
        check_out(OP, "out", out, (T, H), x.dtype, device)
    if T == 0:
        return out
    cfg = config or configs.lookup(OP, device, x.dtype, T, {"E": E, "H": H, "I": inter})
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    for name, value in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)):
        check_block(OP, name, value, minimum=16)
    down_bn = cfg.get("DOWN_BLOCK_N", bn)
    check_block(OP, "DOWN_BLOCK_N", down_bn, minimum=16)
    launch = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}
    dot = {
        "UPCAST": x.dtype == torch.bfloat16 and interpreting(),  # the interpreter's bf16 dot is wrong
        "PRECISION": dot_precision(x.dtype),
    }

    ids = topk_ids.contiguous()
    sorted_ids, expert_ids, total = moe_align_triton(ids, E, bm)
    n_pairs = T * k
    act = torch.empty((n_pairs, inter), dtype=x.dtype, device=device)
    grid_m = expert_ids.numel()
    _gate_up_kernel[(grid_m, triton.cdiv(inter, bn))](
        x, w13, act, sorted_ids, expert_ids, total, n_pairs, H, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **dot, **launch,
    )  # fmt: skip
    pair_out = torch.empty((n_pairs, H), dtype=torch.float32, device=device)
    weights = topk_weights.to(torch.float32).contiguous()
    _down_kernel[(grid_m, triton.cdiv(H, down_bn))](
        act, w2, weights, pair_out, sorted_ids, expert_ids, total, n_pairs, H, inter,
        act.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0),
        BLOCK_M=bm, BLOCK_N=down_bn, BLOCK_K=bk, **dot, **launch,
    )  # fmt: skip
    sum_block = min(1024, triton.next_power_of_2(H))
    _sum_kernel[(T, triton.cdiv(H, sum_block))](
        pair_out, ids, out, H, E, pair_out.stride(0), out.stride(0), TOP_K=k, BLOCK_H=sum_block
    )
    return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Dispatcher: the mixture-of-experts MLP output [T, H] in the dtype of x."""
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, activation)
    return fused_moe_torch(x, w13, w2, topk_weights, topk_ids, activation)
