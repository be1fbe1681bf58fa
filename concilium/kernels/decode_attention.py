"""Decode attention: one new query per sequence over its KV cache, grouped-query heads, split-K.

    out[b, h] = softmax(scale * q[b, h] . K[j]) V[j] over cache positions j < seq_lens[b] of slot
    slots[b], with K, V from kv head h // (Hq / Hk)

Cache layout per layer: [max_batch_slots, n_kv_heads, max_seq_len, head_dim]. Each program takes
one kv head of one sequence with all its query heads (the group shares every K/V load) and one
split of the context; with several splits a second kernel merges the partial results by their
log-sum-exp. The grid depends only on shapes and on `max_seq_len` (default: the cache length),
never on values on the device, so a decode step can be captured in a CUDA graph; splits that
start past a sequence's length exit at once. Scores and softmax in fp32; a sequence of length 0
attends to nothing and gets zeros.
"""

from __future__ import annotations

import torch

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
    next_pow2,
)
from concilium.kernels.dispatch import use_triton

OP = "decode_attention"
LOG2E = 1.4426950408889634


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None,
) -> tuple[int, int, int, int, int]:
    """(B, Hq, Hk, D, L) after checking shapes and dtypes; L is the context length covered."""
    check_dtype(OP, "q", q, FLOAT_DTYPES)
    check_shape(OP, "q", q, (None, None, None))
    B, Hq, D = q.shape
    check_shape(OP, "k_cache", k_cache, (None, None, None, D))
    check_shape(OP, "v_cache", v_cache, tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{OP}: {name} must have the dtype of q ({q.dtype}); got {t.dtype}")
    Hk, cache_len = k_cache.shape[1], k_cache.shape[2]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"{OP}: query heads ({Hq}) must be a multiple of kv heads ({Hk})")
    for name, t in (("slots", slots), ("seq_lens", seq_lens)):
        check_dtype(OP, name, t, INDEX_DTYPES)
        check_shape(OP, name, t, (B,))
    if max_seq_len is None:
        max_seq_len = cache_len
    if not isinstance(max_seq_len, int) or not 0 <= max_seq_len <= cache_len:
        raise ValueError(f"{OP}: max_seq_len must be an integer in [0, {cache_len}]; got {max_seq_len!r}")
    return B, Hq, Hk, D, max_seq_len


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Reference (and CPU path): out [B, Hq, D] in the dtype of q."""
    B, Hq, Hk, D, L = _check_args(q, k_cache, v_cache, slots, seq_lens, max_seq_len)
    if max_seq_len is None and B:
        L = min(L, int(seq_lens.max()))  # read only the used part of the cache
    live = torch.arange(L, device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
    keys = k_cache[slots.long(), :, :L].float()  # [B, Hk, L, D]
    values = v_cache[slots.long(), :, :L].float().masked_fill(~live[:, None, :, None], 0.0)
    qf = q.float().view(B, Hk, Hq // Hk, D)
    scores = torch.einsum("bhgd,bhld->bhgl", qf, keys) * scale
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no live position: zeros
    out = torch.einsum("bhgl,bhld->bhgd", probs, values)
    return out.reshape(B, Hq, D).to(q.dtype)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    len_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    qk_scale,
    D,
    context,
    sq_b,
    sq_h,
    skc_s,
    skc_h,
    skc_l,
    svc_s,
    svc_h,
    svc_l,
    so_b,
    so_h,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_LEN: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (b, kv head, split). One split writes `out` directly; several write fp32 partial
    outputs [B, Hq, splits, D] and base-2 log-sum-exps [B, Hq, splits] for the merge kernel."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    start = split * SPLIT_LEN
    end = tl.minimum(tl.minimum(start + SPLIT_LEN, seq_len), context)
    g = tl.arange(0, BLOCK_G)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = kc_ptr + slot * skc_s + kvh * skc_h
    v_base = vc_ptr + slot * svc_s + kvh * svc_h
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n
        n_ok = pos < end
        kt = tl.load(
            k_base + pos[None, :] * skc_l + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0
        )
        v = tl.load(v_base + pos[:, None] * svc_l + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt, v = kt.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # base-2 logits
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    live = l_i > 0.0
    result = acc / tl.where(live, l_i, 1.0)[:, None]
    mask = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        row = (b * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split
        tl.store(part_ptr + row[:, None] * BLOCK_D + d[None, :], result, mask=mask)
        lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    Hq,
    D,
    so_b,
    so_h,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b, h): weight each split's output by exp2(lse - max) and normalise."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (b * Hq + h) * NUM_SPLITS + sp
    lse = tl.load(lse_ptr + row, mask=sp < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    parts = tl.load(
        part_ptr + row[:, None] * BLOCK_D + d[None, :], mask=(w > 0.0)[:, None] & (d < D)[None, :], other=0.0
    )
    total = tl.sum(w, axis=0)
    result = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + d, result.to(out_ptr.dtype.element_ty), mask=d < D)


def plan_splits(cfg: configs.Config, batch: int, kv_heads: int, context: int) -> tuple[int, int]:
    """(number of splits, positions per split): enough programs to fill the device, whole blocks."""
    block_n = cfg["BLOCK_N"]
    blocks = max(1, triton.cdiv(context, block_n))
    wanted = triton.cdiv(cfg.get("MIN_PROGRAMS", 1), max(1, batch * kv_heads))
    splits = max(1, min(wanted, cfg.get("MAX_SPLITS", 64), blocks))
    split_len = triton.cdiv(blocks, splits) * block_n
    return triton.cdiv(max(context, 1), split_len), split_len


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    *,
    out: torch.Tensor | None = None,
    config: configs.Config | None = None,
) -> torch.Tensor:
    """Triton launcher; `out` [B, Hq, D] to write into, `config` overrides the table."""
    B, Hq, Hk, D, L = _check_args(q, k_cache, v_cache, slots, seq_lens, max_seq_len)
    device = check_launch(OP, q=q, k_cache=k_cache, v_cache=v_cache, slots=slots, seq_lens=seq_lens)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_inner_contiguous(OP, name, t)
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=device)
    else:
        check_out(OP, "out", out, (B, Hq, D), q.dtype, device)
    if B == 0:
        return out
    cfg = config or configs.lookup(OP, device, q.dtype, L, {"D": D, "group": Hq // Hk})
    check_block(OP, "BLOCK_N", cfg["BLOCK_N"], minimum=16)
    splits, split_len = plan_splits(cfg, B, Hk, L)
    group = Hq // Hk
    block_d = max(16, next_pow2(D))
    if splits > 1:
        part = torch.empty((B, Hq, splits, block_d), dtype=torch.float32, device=device)
        lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=device)
    else:
        part = lse = out  # unused
    _decode_split_kernel[(B, Hk, splits)](
        q, k_cache, v_cache, slots, seq_lens, out, part, lse, float(scale) * LOG2E, D, L,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, NUM_SPLITS=splits, SPLIT_LEN=split_len, BLOCK_G=max(16, next_pow2(group)),
        BLOCK_D=block_d, BLOCK_N=cfg["BLOCK_N"],
        UPCAST=q.dtype == torch.bfloat16 and interpreting(), PRECISION=dot_precision(q.dtype),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )  # fmt: skip
    if splits > 1:
        _decode_merge_kernel[(B, Hq)](
            part, lse, out, Hq, D, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, BLOCK_S=next_pow2(splits), BLOCK_D=block_d, num_warps=cfg.get("merge_num_warps", 4),
        )  # fmt: skip
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Dispatcher: attention of each sequence's new query over its cached keys and values.

    `max_seq_len` (optional, a host-side bound on every seq_len) shrinks the grid when the cache
    is much longer than the sequences in it; positions at or past it are not attended.
    """
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, slots, seq_lens, scale, max_seq_len)
    return decode_attention_torch(q, k_cache, v_cache, slots, seq_lens, scale, max_seq_len)
