from __future__ import annotations

import pytest
import torch

from concilium.kernels.moe_align import moe_align_torch, moe_align_triton, num_blocks
from tests.kernels.helpers import Guarded


def check_layout(ids: torch.Tensor, E: int, B: int, sorted_ids, expert_ids, total) -> None:
    """The alignment contract, checked from its definition (independently of either implementation)."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    sorted_ids, expert_ids, total = sorted_ids.tolist(), expert_ids.tolist(), int(total)
    assert len(expert_ids) == num_blocks(n, E, B) and len(sorted_ids) == len(expert_ids) * B
    pos = 0
    for e in range(E):
        members = [i for i, x in enumerate(flat) if x == e]
        size = -(-len(members) // B) * B
        assert sorted_ids[pos : pos + len(members)] == members
        assert sorted_ids[pos + len(members) : pos + size] == [n] * (size - len(members))
        assert expert_ids[pos // B : (pos + size) // B] == [e] * (size // B)
        pos += size
    assert total == pos and total % B == 0
    assert sorted_ids[pos:] == [n] * (len(sorted_ids) - pos)
    assert expert_ids[pos // B :] == [-1] * (len(expert_ids) - pos // B)


def routed(T: int, k: int, E: int, used: int | None = None) -> torch.Tensor:
    """k distinct experts per token, drawn from the first `used` experts (the rest get nothing)."""
    used = used or E
    return torch.stack([torch.randperm(used)[:k] for _ in range(T)]).to(torch.int32)


CASES = [
    # (T, k, E, block, CHUNK): CHUNK >= T*k takes the single-program fast path
    (1, 2, 8, 16, 64),
    (1, 8, 128, 16, 64),
    (4, 2, 8, 32, 64),
    (33, 2, 8, 16, 16),  # several chunks
    (33, 8, 60, 16, 64),
    (19, 3, 5, 64, 16),
]


@pytest.mark.parametrize(("T", "k", "E", "block", "chunk"), CASES)
def test_exactly_equal_to_reference(device, T, k, E, block, chunk):
    ids = routed(T, k, E, used=max(k, E - 2)).to(device)  # the last two experts receive nothing
    ref = moe_align_torch(ids, E, block)
    check_layout(ids.cpu(), E, block, *(t.cpu() for t in ref))
    blocks = num_blocks(ids.numel(), E, block)
    outs = (
        Guarded((blocks * block,), torch.int32, device),
        Guarded((blocks,), torch.int32, device),
        Guarded((), torch.int32, device),
    )
    got = moe_align_triton(
        ids, E, block, out=tuple(o.view for o in outs), config={"CHUNK": chunk, "SCAN_BLOCK": 16}
    )
    assert all(o.intact() for o in outs), "kernel wrote outside its outputs"
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.int32
        assert torch.equal(g.cpu(), r.cpu())


@pytest.mark.parametrize("chunk", [16, 256])
def test_ids_outside_the_experts_are_dropped(device, chunk):
    ids = routed(21, 2, 6)
    ids[3, 0], ids[7, 1], ids[8, 0] = -1, 6, 100
    ids = ids.to(torch.int64).to(device)
    ref = moe_align_torch(ids, 6, 16)
    got = moe_align_triton(ids, 6, 16, config={"CHUNK": chunk})
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g.cpu(), r.cpu())
    kept = ids.clone().cpu()
    kept[(kept < 0) | (kept >= 6)] = 10**6  # never equal to a real expert
    check_layout(kept, 6, 16, *(t.cpu() for t in ref))
    assert 3 * 2 + 0 not in ref[0].tolist()


def test_default_config_and_empty_input(device):
    ids = routed(9, 2, 8).to(device)
    for g, r in zip(moe_align_triton(ids, 8, 16), moe_align_torch(ids, 8, 16), strict=True):
        assert torch.equal(g.cpu(), r.cpu())
    empty = torch.empty(0, 2, dtype=torch.int32, device=device)
    for fn in (moe_align_torch, moe_align_triton):
        sorted_ids, expert_ids, total = fn(empty, 8, 16)
        assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and int(total) == 0


def test_bad_arguments(device):
    ids = routed(2, 2, 4).to(device)
    with pytest.raises(TypeError, match="ids must be"):
        moe_align_triton(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        moe_align_torch(ids, 0, 16)
    with pytest.raises(ValueError, match="block_size"):
        moe_align_triton(ids, 4, 0)
    with pytest.raises(ValueError, match="CHUNK"):
        moe_align_triton(ids, 4, 16, config={"CHUNK": 8})
