"""Rotary position embedding (rotate-half, NeoX/Llama style) fused with the KV-cache write.

    q_rot = q * cos + rotate_half(q) * sin,  rotate_half(x) = cat(-x[D/2:], x[:D/2])
    k_rot likewise; then k_cache[slots[t], :, positions[t]] = k_rot[t], v_cache[...] = v[t]

`cos`/`sin` are precomputed tables [max_positions, D/2] or [max_positions, D] (the Hugging Face
layout, two copies of the frequencies: a full-width table is applied as written, first half to
the first half). Math in fp32, outputs rounded once to the input dtype. The cache layout per layer
is [max_batch_slots, n_kv_heads, max_seq_len, head_dim]. Positions must be below both the table
length and max_seq_len and slots below max_batch_slots: the kernel does not re-check values that
live on the device.
"""

from __future__ import annotations

import torch

from concilium.kernels import configs
from concilium.kernels._triton import tl, triton
from concilium.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_block,
    check_dtype,
    check_inner_contiguous,
    check_launch,
    check_out,
    check_shape,
    next_pow2,
)
from concilium.kernels.dispatch import use_triton

OP = "rope_kv_write"


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[int, int, int, int]:
    """(T, Hq, Hk, D) after checking shapes and dtypes."""
    check_dtype(OP, "q", q, FLOAT_DTYPES)
    check_shape(OP, "q", q, (None, None, None))
    T, Hq, D = q.shape
    if D % 2:
        raise ValueError(f"{OP}: head_dim must be even; got {D}")
    check_shape(OP, "k", k, (T, None, D))
    Hk = k.shape[1]
    check_shape(OP, "v", v, (T, Hk, D))
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{OP}: {name} must have the dtype of q ({q.dtype}); got {t.dtype}")
    check_shape(OP, "k_cache", k_cache, (None, Hk, None, D))
    check_shape(OP, "v_cache", v_cache, tuple(k_cache.shape))
    for name, t in (("cos", cos), ("sin", sin)):
        check_dtype(OP, name, t, FLOAT_DTYPES)
        check_shape(OP, name, t, (None, None))
        if t.shape[1] not in (D // 2, D):
            raise ValueError(
                f"{OP}: {name} must have head_dim/2 ({D // 2}) or head_dim ({D}) columns; got {t.shape[1]}"
            )
    if sin.shape != cos.shape:
        raise ValueError(f"{OP}: sin must match cos {list(cos.shape)}; got {list(sin.shape)}")
    for name, t in (("positions", positions), ("slots", slots)):
        check_dtype(OP, name, t, INDEX_DTYPES)
        check_shape(OP, name, t, (T,))
    return T, Hq, Hk, D


def rope_kv_write_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: returns (q_rot, k_rot) and writes k_rot and v into the caches."""
    T, Hq, Hk, D = _check_args(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    half = D // 2
    c, s = cos[positions].float(), sin[positions].float()
    if c.shape[-1] == half:
        c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)
    c, s = c[:, None, :], s[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * c + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * s).to(x.dtype)

    q_rot, k_rot = rotate(q), rotate(k)
    slots_l, positions_l = slots.long(), positions.long()
    k_cache[slots_l, :, positions_l] = k_rot
    v_cache[slots_l, :, positions_l] = v
    return q_rot, k_rot


@triton.jit
def _rope_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    q_out_ptr,
    k_out_ptr,
    kc_ptr,
    vc_ptr,
    Hq,
    Hk,
    HALF,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    sqo_t,
    sqo_h,
    sko_t,
    sko_h,
    s_cos,
    skc_s,
    skc_h,
    skc_l,
    svc_s,
    svc_h,
    svc_l,
    FULL_TABLE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Program (t, b): heads block b of q, or (b past q's blocks) of k and v, for token t."""
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(Hq, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos1 = tl.load(cos_ptr + pos * s_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * s_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    if FULL_TABLE:
        cos2 = tl.load(cos_ptr + pos * s_cos + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * s_cos + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        cos2, sin2 = cos1, sin1
    if block < q_blocks:
        heads = block * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        mask = (heads < Hq)[:, None] & d_ok[None, :]
        src = q_ptr + t * sq_t + heads[:, None] * sq_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = q_out_ptr + t * sqo_t + heads[:, None] * sqo_h + d[None, :]
        tl.store(dst, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(
            dst + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(q_out_ptr.dtype.element_ty), mask=mask
        )
    else:
        heads = (block - q_blocks) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        mask = (heads < Hk)[:, None] & d_ok[None, :]
        src = k_ptr + t * sk_t + heads[:, None] * sk_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        r1 = (x1 * cos1[None, :] - x2 * sin1[None, :]).to(k_out_ptr.dtype.element_ty)
        r2 = (x2 * cos2[None, :] + x1 * sin2[None, :]).to(k_out_ptr.dtype.element_ty)
        dst = k_out_ptr + t * sko_t + heads[:, None] * sko_h + d[None, :]
        tl.store(dst, r1, mask=mask)
        tl.store(dst + HALF, r2, mask=mask)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        kc = kc_ptr + slot * skc_s + pos * skc_l + heads[:, None] * skc_h + d[None, :]
        tl.store(kc, r1, mask=mask)
        tl.store(kc + HALF, r2, mask=mask)
        vsrc = v_ptr + t * sv_t + heads[:, None] * sv_h + d[None, :]
        vc = vc_ptr + slot * svc_s + pos * svc_l + heads[:, None] * svc_h + d[None, :]
        tl.store(vc, tl.load(vsrc, mask=mask, other=0.0), mask=mask)
        tl.store(vc + HALF, tl.load(vsrc + HALF, mask=mask, other=0.0), mask=mask)


def rope_kv_write_triton(
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
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: configs.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher; `out` = (q_rot, k_rot) to write into, `config` overrides the table."""
    T, Hq, Hk, D = _check_args(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    device = check_launch(
        OP,
        q=q,
        k=k,
        v=v,
        cos=cos,
        sin=sin,
        positions=positions,
        k_cache=k_cache,
        v_cache=v_cache,
        slots=slots,
    )
    for name, t in (
        ("q", q),
        ("k", k),
        ("v", v),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("cos", cos),
        ("sin", sin),
    ):
        check_inner_contiguous(OP, name, t)
    if sin.stride() != cos.stride():
        raise ValueError(f"{OP}: sin must have the strides of cos {cos.stride()}; got {sin.stride()}")
    if out is None:
        q_rot = torch.empty((T, Hq, D), dtype=q.dtype, device=device)
        k_rot = torch.empty((T, Hk, D), dtype=k.dtype, device=device)
    else:
        q_rot, k_rot = out
        check_out(OP, "out q_rot", q_rot, (T, Hq, D), q.dtype, device)
        check_out(OP, "out k_rot", k_rot, (T, Hk, D), k.dtype, device)
    if T == 0:
        return q_rot, k_rot
    cfg = config or configs.lookup(OP, device, q.dtype, max(Hq, Hk), {"D": D})
    block_heads = cfg["BLOCK_HEADS"]
    check_block(OP, "BLOCK_HEADS", block_heads)
    grid = (T, triton.cdiv(Hq, block_heads) + triton.cdiv(Hk, block_heads))
    _rope_kv_kernel[grid](
        q, k, v, cos, sin, positions, slots, q_rot, k_rot, k_cache, v_cache, Hq, Hk, D // 2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_rot.stride(0), q_rot.stride(1), k_rot.stride(0), k_rot.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        FULL_TABLE=cos.shape[1] == D, BLOCK_HEADS=block_heads, BLOCK_HALF=next_pow2(D // 2),
        num_warps=cfg.get("num_warps", 4),
    )  # fmt: skip
    return q_rot, k_rot


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: (q_rot, k_rot); k_rot and v are written into the caches at (slot, position)."""
    if use_triton(q):
        return rope_kv_write_triton(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    return rope_kv_write_torch(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
