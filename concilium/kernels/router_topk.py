"""Router top-k: score the experts (softmax or sigmoid), pick the k best, optionally renormalise.

All math in fp32. Ties go to the lowest expert index, in both implementations, so the kernel and
the reference choose the same experts whenever they compute the same scores. Weights are the
scores of the chosen experts (divided by their sum when `renormalize`), best first.
"""

from __future__ import annotations

import torch

from concilium.kernels import configs
from concilium.kernels._triton import tl, triton
from concilium.kernels.checks import (
    FLOAT_DTYPES,
    check_block,
    check_dtype,
    check_inner_contiguous,
    check_launch,
    check_out,
    check_shape,
    next_pow2,
)
from concilium.kernels.dispatch import use_triton

OP = "router_topk"
SCORINGS = ("softmax", "sigmoid")


def _check_args(logits: torch.Tensor, k: int, scoring: str) -> None:
    check_dtype(OP, "logits", logits, FLOAT_DTYPES)
    check_shape(OP, "logits", logits, (None, None))
    if scoring not in SCORINGS:
        raise ValueError(f"{OP}: scoring must be one of {SCORINGS}; got {scoring!r}")
    if not isinstance(k, int) or not 1 <= k <= logits.shape[1]:
        raise ValueError(
            f"{OP}: k must be an integer in [1, {logits.shape[1]}] (the number of experts); got {k!r}"
        )


def router_topk_torch(
    logits: torch.Tensor, k: int, scoring: str = "softmax", renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (weights [T, k] fp32, ids [T, k] int32)."""
    _check_args(logits, k, scoring)
    x = logits.float()
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    # A stable descending sort keeps equal scores in index order: ties go to the lowest index.
    weights, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :k].contiguous(), ids[:, :k].to(torch.int32).contiguous()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@triton.jit
def _router_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_lt,
    stride_wt,
    stride_it,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    x = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = e / tl.sum(e, axis=1)[:, None]
    # Selection keys: real scores are >= 0; NaN ranks below them and padding below that, so the
    # chosen ids always name real experts, whatever the logits hold.
    keys = tl.where(scores == scores, scores, -0.5)
    keys = tl.where(col_ok[None, :], keys, -1.0)
    slots = tl.arange(0, BLOCK_K)
    out_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    out_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(keys, axis=1)
        idx = tl.min(tl.where(keys == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        out_w = tl.where(slots[None, :] == j, w[:, None], out_w)
        out_i = tl.where(slots[None, :] == j, idx[:, None], out_i)
        keys = tl.where(hit, -2.0, keys)
    if RENORMALIZE:
        out_w = out_w / tl.sum(out_w, axis=1)[:, None]
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    tl.store(weights_ptr + rows[:, None] * stride_wt + slots[None, :], out_w, mask=out_mask)
    tl.store(ids_ptr + rows[:, None] * stride_it + slots[None, :], out_i, mask=out_mask)


def router_topk_triton(
    logits: torch.Tensor,
    k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: configs.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher; `out` = (weights, ids) to write into, `config` overrides the table."""
    _check_args(logits, k, scoring)
    device = check_launch(OP, logits=logits)
    check_inner_contiguous(OP, "logits", logits)
    T, E = logits.shape
    if out is None:
        weights = torch.empty((T, k), dtype=torch.float32, device=device)
        ids = torch.empty((T, k), dtype=torch.int32, device=device)
    else:
        weights, ids = out
        check_out(OP, "out weights", weights, (T, k), torch.float32, device)
        check_out(OP, "out ids", ids, (T, k), torch.int32, device)
    if T == 0:
        return weights, ids
    cfg = config or configs.lookup(OP, device, logits.dtype, E)
    block_t = cfg["BLOCK_T"]
    check_block(OP, "BLOCK_T", block_t)
    _router_topk_kernel[(triton.cdiv(T, block_t),)](
        logits,
        weights,
        ids,
        T,
        E,
        logits.stride(0),
        weights.stride(0),
        ids.stride(0),
        K=k,
        SIGMOID=scoring == "sigmoid",
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_E=next_pow2(E),
        BLOCK_K=next_pow2(k),
        num_warps=cfg.get("num_warps", 4),
    )
    return weights, ids


def router_topk(
    logits: torch.Tensor, k: int, scoring: str = "softmax", renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: (weights [T, k] fp32, ids [T, k] int32) of the k best experts per token."""
    if use_triton(logits):
        return router_topk_triton(logits, k, scoring, renormalize)
    return router_topk_torch(logits, k, scoring, renormalize)
