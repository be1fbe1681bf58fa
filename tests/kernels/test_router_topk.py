from __future__ import annotations

import pytest
import torch

from concilium.kernels.router_topk import router_topk_torch, router_topk_triton
from tests.kernels.helpers import guarded_copy, guarded_empty


def run_guarded(logits: torch.Tensor, k: int, scoring: str, renormalize: bool, config=None):
    src = guarded_copy(logits)
    w_out = guarded_empty((logits.shape[0], k), torch.float32, str(logits.device))
    i_out = guarded_empty((logits.shape[0], k), torch.int32, str(logits.device))
    router_topk_triton(src.view, k, scoring, renormalize, out=(w_out.view, i_out.view), config=config)
    assert w_out.intact() and i_out.intact(), "kernel wrote outside its outputs"
    return w_out.view, i_out.view


@pytest.mark.parametrize(
    ("T", "E", "k", "scoring", "renormalize", "dtype"),
    [
        (1, 8, 2, "softmax", True, torch.float32),  # Mixtral decode
        (33, 60, 8, "softmax", False, torch.float16),  # Qwen-style, odd expert count, no renormalise
        (5, 128, 8, "softmax", True, torch.bfloat16),
        (17, 12, 3, "sigmoid", True, torch.float32),
        (4, 7, 7, "sigmoid", False, torch.float16),  # k == E
    ],
)
def test_matches_reference(device, T, E, k, scoring, renormalize, dtype):
    logits = (torch.randn(T, E) * 3).to(dtype).to(device)
    weights, ids = run_guarded(logits, k, scoring, renormalize, config={"BLOCK_T": 4})
    ref_w, ref_i = router_topk_torch(logits, k, scoring, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_i.cpu())
    torch.testing.assert_close(weights.cpu(), ref_w.cpu(), atol=1e-6, rtol=1e-5)


def test_reference_against_definition():
    logits = torch.randn(6, 10)
    w, ids = router_topk_torch(logits, 3, "softmax", renormalize=True)
    probs = torch.softmax(logits.double(), -1)
    for t in range(6):
        best = sorted(range(10), key=lambda e: -probs[t, e].item())[:3]
        assert ids[t].tolist() == best
        expected = probs[t, best] / probs[t, best].sum()
        torch.testing.assert_close(w[t].double(), expected, atol=1e-6, rtol=1e-6)
    w, ids = router_topk_torch(logits, 2, "sigmoid", renormalize=False)
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids.long()))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties_go_to_the_lowest_index(device, scoring):
    logits = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 2.0, 1.0, 2.0], [3.0, 0.0, 3.0, 0.0, 0.0, 3.0]],
        device=device,
    )
    expected = [[0, 1, 2], [1, 3, 5], [0, 2, 5]]
    for fn in (router_topk_torch, router_topk_triton):
        _, ids = fn(logits, 3, scoring, True)
        assert ids.tolist() == expected, fn.__name__
    # Many tied rows at once, against the reference.
    many = torch.randint(0, 3, (29, 9), device=device).float()
    assert torch.equal(router_topk_triton(many, 4)[1].cpu(), router_topk_torch(many, 4)[1].cpu())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_logits_still_name_real_experts(device):
    logits = torch.randn(3, 6, device=device)
    logits[1] = float("nan")
    logits[2, 4] = float("nan")
    _, ids = router_topk_triton(logits, 2)
    assert ((ids >= 0) & (ids < 6)).all()
    assert torch.equal(ids[0].cpu(), router_topk_torch(logits[:1], 2)[1][0].cpu())


def test_no_tokens(device):
    w, ids = router_topk_triton(torch.empty(0, 8, device=device), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_bad_arguments(device):
    logits = torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match="k must be"):
        router_topk_triton(logits, 5)
    with pytest.raises(ValueError, match="scoring"):
        router_topk_torch(logits, 2, "relu")
    with pytest.raises(ValueError, match="shape"):
        router_topk_triton(logits[None], 2)
    with pytest.raises(TypeError, match="logits must be"):
        router_topk_triton(logits.long(), 2)
    with pytest.raises(ValueError, match="BLOCK_T"):
        router_topk_triton(logits, 2, config={"BLOCK_T": 3})
    with pytest.raises(ValueError, match="out ids"):
        router_topk_triton(
            logits, 2, out=(torch.empty(2, 2, device=device), torch.empty(2, 2, device=device))
        )
