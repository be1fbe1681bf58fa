"""Token-to-expert alignment: group the (token, slot) pairs by expert and pad each group to a block.

Input `ids` [T, k] names the expert of each of the n = T*k pairs; pair i is row i // k, slot i % k.
Output, identical in both implementations:

- `sorted_token_ids` int32 of length len(expert_ids) * block_size: for experts 0, 1, ... in turn,
  the flat indices i of that expert's pairs in increasing order, padded with n up to a multiple of
  block_size; after the last expert's group, n to the end. Experts with no pairs take no room.
- `expert_ids` int32, one per block: the expert whose group the block lies in; -1 for blocks past
  the end. Its length, cdiv(n + min(E, n) * (block_size - 1), block_size), bounds the padded total,
  so a grouped GEMM can size its grid without reading the device.
- `num_tokens_post_padded` int32 0-dim tensor: the padded total (a multiple of block_size).

Ids outside [0, E) are dropped: their pairs appear nowhere, so they are never read out of bounds
(expert-parallel callers mark experts that live elsewhere this way).

The Triton path has a single-program fast path for tiny batches (decode) and three launches
(count per chunk, scan, scatter) for larger ones; both give exactly the reference's output.
"""

from __future__ import annotations

import torch

from concilium.kernels import configs
from concilium.kernels._triton import tl, triton
from concilium.kernels.checks import (
    INDEX_DTYPES,
    check_block,
    check_dtype,
    check_launch,
    check_shape,
    next_pow2,
)
from concilium.kernels.dispatch import use_triton

OP = "moe_align"


def num_blocks(n: int, num_experts: int, block_size: int) -> int:
    """Length of `expert_ids`: enough blocks for n pairs padded in at most min(E, n) groups."""
    return -(-(n + min(num_experts, n) * (block_size - 1)) // block_size)


def _check_args(ids: torch.Tensor, num_experts: int, block_size: int) -> None:
    check_dtype(OP, "ids", ids, INDEX_DTYPES)
    check_shape(OP, "ids", ids, (None, None))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{OP}: num_experts must be a positive integer; got {num_experts!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{OP}: block_size must be a positive integer; got {block_size!r}")


def moe_align_torch(
    ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: (sorted_token_ids, expert_ids, num_tokens_post_padded)."""
    _check_args(ids, num_experts, block_size)
    n, device = ids.numel(), ids.device
    blocks = num_blocks(n, num_experts, block_size)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    # Pairs in (expert, index) order; a pair's place is its group start plus its rank in the group.
    key = torch.where(valid, flat, num_experts) * max(n, 1) + torch.arange(n, device=device)
    order = torch.argsort(key)[: int(valid.sum())]
    expert_of = flat[order]
    rank = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    sorted_ids = torch.full((blocks * block_size,), n, dtype=torch.int32, device=device)
    sorted_ids[starts[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(blocks, device=device) * block_size
    expert_ids = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    total = ends[-1].to(torch.int32)
    expert_ids[block_start >= total] = -1
    return sorted_ids, expert_ids, total.reshape(())


@triton.jit
def _align_small_kernel(
    ids_ptr,
    sorted_ptr,
    expert_ids_ptr,
    total_ptr,
    n,
    E,
    num_blocks,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """All pairs in one program: counts, group starts, ranks and block experts at once."""
    i = tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    eid = tl.load(ids_ptr + i, mask=i < n, other=-1)
    valid = (eid >= 0) & (eid < E) & (i < n)
    onehot = (eid[:, None] == e[None, :]) & valid[:, None]
    counts = tl.sum(onehot.to(tl.int32), axis=0)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    rank = tl.sum(tl.where(onehot, tl.cumsum(onehot.to(tl.int32), axis=0) - 1, 0), axis=1)
    start = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1)
    # Padding first, then the pairs over it: the barrier orders the two stores.
    for p0 in range(0, num_blocks * BLOCK_SIZE, BLOCK_N):
        p = p0 + i
        tl.store(sorted_ptr + p, tl.zeros([BLOCK_N], dtype=tl.int32) + n, mask=p < num_blocks * BLOCK_SIZE)
    tl.debug_barrier()
    tl.store(sorted_ptr + start + rank, i, mask=valid)
    for b0 in range(0, num_blocks, BLOCK_N):
        b = b0 + i
        first = b * BLOCK_SIZE
        owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32) * (e[None, :] < E), axis=1)
        owner = tl.where(first < total, owner, -1)
        tl.store(expert_ids_ptr + b, owner, mask=b < num_blocks)
    tl.store(total_ptr, total)


@triton.jit
def _align_count_kernel(
    ids_ptr,
    chunk_counts_ptr,
    sorted_ptr,
    n,
    E,
    length,
    fill_share,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Pairs per expert in each chunk of CHUNK pairs; each program also pads its share of the output."""
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.arange(0, BLOCK_E)
    eid = tl.load(ids_ptr + i, mask=i < n, other=-1)
    valid = (eid >= 0) & (eid < E) & (i < n)
    onehot = (eid[:, None] == e[None, :]) & valid[:, None]
    tl.store(chunk_counts_ptr + c * BLOCK_E + e, tl.sum(onehot.to(tl.int32), axis=0))
    fill_end = tl.minimum((c + 1) * fill_share, length)
    for p0 in range(c * fill_share, fill_end, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + p, tl.zeros([CHUNK], dtype=tl.int32) + n, mask=p < fill_end)


@triton.jit
def _align_scan_kernel(
    chunk_counts_ptr,
    chunk_base_ptr,
    starts_ptr,
    expert_ids_ptr,
    total_ptr,
    E,
    num_chunks,
    num_blocks,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: each chunk's offset inside each expert group, group starts, block experts."""
    e = tl.arange(0, BLOCK_E)
    r = tl.arange(0, BLOCK_C)
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        rows = c0 + r
        ptrs = rows[:, None] * BLOCK_E + e[None, :]
        cnt = tl.load(chunk_counts_ptr + ptrs, mask=rows[:, None] < num_chunks, other=0)
        incl = tl.cumsum(cnt, axis=0)
        tl.store(chunk_base_ptr + ptrs, running[None, :] + incl - cnt, mask=rows[:, None] < num_chunks)
        running += tl.sum(cnt, axis=0)
    padded = (running + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + e, ends - padded)
    total = tl.sum(padded, axis=0)
    tl.store(total_ptr, total)
    for b0 in range(0, num_blocks, BLOCK_C):
        b = b0 + r
        first = b * BLOCK_SIZE
        owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32) * (e[None, :] < E), axis=1)
        owner = tl.where(first < total, owner, -1)
        tl.store(expert_ids_ptr + b, owner, mask=b < num_blocks)


@triton.jit
def _align_scatter_kernel(
    ids_ptr, chunk_base_ptr, starts_ptr, sorted_ptr, n, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr
):
    """Each pair to its place: group start + offset of its chunk + rank inside the chunk."""
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.arange(0, BLOCK_E)
    eid = tl.load(ids_ptr + i, mask=i < n, other=-1)
    valid = (eid >= 0) & (eid < E) & (i < n)
    onehot = (eid[:, None] == e[None, :]) & valid[:, None]
    rank = tl.sum(tl.where(onehot, tl.cumsum(onehot.to(tl.int32), axis=0) - 1, 0), axis=1)
    safe = tl.where(valid, eid, 0)
    start = tl.load(starts_ptr + safe, mask=valid, other=0)
    base = tl.load(chunk_base_ptr + c * BLOCK_E + safe, mask=valid, other=0)
    tl.store(sorted_ptr + start + base + rank, i, mask=valid)


def moe_align_triton(
    ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: configs.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher; `out` = (sorted_token_ids, expert_ids, num_tokens_post_padded)."""
    _check_args(ids, num_experts, block_size)
    device = check_launch(OP, ids=ids)
    n = ids.numel()
    blocks = num_blocks(n, num_experts, block_size)
    if out is None:
        sorted_ids = torch.empty(blocks * block_size, dtype=torch.int32, device=device)
        expert_ids = torch.empty(blocks, dtype=torch.int32, device=device)
        total = torch.empty((), dtype=torch.int32, device=device)
    else:
        sorted_ids, expert_ids, total = out
        for name, t, length in (
            ("sorted_token_ids", sorted_ids, blocks * block_size),
            ("expert_ids", expert_ids, blocks),
        ):
            if t.shape != (length,) or t.dtype != torch.int32 or t.device != device or t.stride(0) != 1:
                raise ValueError(
                    f"{OP}: out {name} must be a contiguous int32 tensor of length {length} on {device}"
                )
        if total.shape != () or total.dtype != torch.int32 or total.device != device:
            raise ValueError(f"{OP}: out num_tokens_post_padded must be a 0-dim int32 tensor on {device}")
    if n == 0:
        total.zero_()
        return sorted_ids, expert_ids, total
    flat = ids.reshape(-1)  # a view when ids is contiguous, else one small copy
    block_e = next_pow2(num_experts)
    cfg = config or configs.lookup(OP, device, ids.dtype, block_e)
    chunk = cfg["CHUNK"]
    check_block(OP, "CHUNK", chunk, minimum=16)
    warps = cfg.get("num_warps", 4)
    if n <= chunk:
        _align_small_kernel[(1,)](
            flat, sorted_ids, expert_ids, total, n, num_experts, blocks,
            BLOCK_SIZE=block_size, BLOCK_N=max(16, next_pow2(n)), BLOCK_E=block_e, num_warps=warps,
        )  # fmt: skip
        return sorted_ids, expert_ids, total
    chunks = triton.cdiv(n, chunk)
    chunk_counts = torch.empty((chunks, block_e), dtype=torch.int32, device=device)
    chunk_base = torch.empty_like(chunk_counts)
    starts = torch.empty(block_e, dtype=torch.int32, device=device)
    length = blocks * block_size
    _align_count_kernel[(chunks,)](
        flat, chunk_counts, sorted_ids, n, num_experts, length, triton.cdiv(length, chunks),
        CHUNK=chunk, BLOCK_E=block_e, num_warps=warps,
    )  # fmt: skip
    _align_scan_kernel[(1,)](
        chunk_counts, chunk_base, starts, expert_ids, total, num_experts, chunks, blocks,
        BLOCK_SIZE=block_size, BLOCK_E=block_e, BLOCK_C=cfg.get("SCAN_BLOCK", 64), num_warps=warps,
    )  # fmt: skip
    _align_scatter_kernel[(chunks,)](
        flat, chunk_base, starts, sorted_ids, n, num_experts, CHUNK=chunk, BLOCK_E=block_e, num_warps=warps
    )
    return sorted_ids, expert_ids, total


def moe_align(
    ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatcher: (sorted_token_ids, expert_ids, num_tokens_post_padded), see the module doc."""
    if use_triton(ids):
        return moe_align_triton(ids, num_experts, block_size)
    return moe_align_torch(ids, num_experts, block_size)
