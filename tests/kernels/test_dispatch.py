"""The dispatchers pick Triton on CUDA (or when forced) and the torch reference otherwise."""

from __future__ import annotations

import importlib

import pytest
import torch

from concilium import kernels
from concilium.kernels.dispatch import use_triton

# (dispatcher name, module, arguments builder)
EPS = 1e-6


def arguments(name: str, device: str):
    T, H, E, k, inter = 3, 64, 4, 2, 32
    x = torch.randn(T, H, device=device)
    if name == "router_topk":
        return (torch.randn(T, E, device=device), k)
    if name == "moe_align":
        return (torch.tensor([[0, 2], [1, 2], [3, 0]], dtype=torch.int32, device=device), E, 16)
    if name == "fused_moe":
        w13 = torch.randn(E, 2 * inter, H, device=device) / 8
        w2 = torch.randn(E, H, inter, device=device) / 8
        weights, ids = kernels.router_topk(torch.randn(T, E, device=device), k)
        return (x, w13, w2, weights, ids)
    if name == "rmsnorm":
        return (x, torch.randn(H, device=device), EPS)
    if name == "add_rmsnorm":
        return (x, torch.randn(T, H, device=device), torch.randn(H, device=device), EPS)
    if name == "rope_kv_write":
        q, kk, v = (
            torch.randn(T, 4, 16, device=device),
            torch.randn(T, 2, 16, device=device),
            torch.randn(T, 2, 16, device=device),
        )
        cos, sin = torch.randn(8, 8, device=device), torch.randn(8, 8, device=device)
        cache = torch.zeros(2, 2, 8, 16, device=device)
        pos = torch.tensor([0, 1, 2], device=device)
        return (q, kk, v, cos, sin, pos, cache, cache.clone(), torch.tensor([1, 1, 0], device=device))
    if name == "decode_attention":
        cache = torch.randn(2, 2, 8, 16, device=device)
        lens = torch.tensor([5, 8, 1], dtype=torch.int32, device=device)
        return (
            torch.randn(T, 4, 16, device=device),
            cache,
            cache.clone(),
            torch.tensor([0, 1, 0], device=device),
            lens,
            0.25,
        )
    raise AssertionError(name)


OPS = {
    "router_topk": "router_topk",
    "moe_align": "moe_align",
    "fused_moe": "fused_moe",
    "rmsnorm": "rmsnorm",
    "add_rmsnorm": "rmsnorm",
    "rope_kv_write": "rope",
    "decode_attention": "decode_attention",
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_dispatch_follows_device_and_environment(device, monkeypatch, name):
    module = importlib.import_module(f"concilium.kernels.{OPS[name]}")
    calls: list[str] = []
    for impl in ("triton", "torch"):
        original = getattr(module, f"{name}_{impl}")

        def spy(*args, _impl=impl, _original=original, **kwargs):
            calls.append(_impl)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, f"{name}_{impl}", spy)
    dispatcher = getattr(kernels, name)
    args = arguments(name, device)

    results = {}
    for mode, expected in [
        (None, "triton" if device == "cuda" else "torch"),
        ("torch", "torch"),
        ("triton", "triton"),
    ]:
        if mode is None:
            monkeypatch.delenv("CONCILIUM_KERNELS", raising=False)
        else:
            monkeypatch.setenv("CONCILIUM_KERNELS", mode)
        calls.clear()
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # the caches are written
        results[mode] = dispatcher(*fresh)
        assert calls and calls[0] == expected, (mode, calls)
    first = results["torch"] if isinstance(results["torch"], tuple) else (results["torch"],)
    second = results["triton"] if isinstance(results["triton"], tuple) else (results["triton"],)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_modes(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("CONCILIUM_KERNELS", "torch")
    assert kernels.kernels_mode() == "torch" and not use_triton(cpu)
    monkeypatch.setenv("CONCILIUM_KERNELS", "auto")
    assert not use_triton(cpu)  # CPU tensors take the reference by default
    monkeypatch.setenv("CONCILIUM_KERNELS", "")
    assert kernels.kernels_mode() == "auto"
    monkeypatch.setenv("CONCILIUM_KERNELS", "fast")
    with pytest.raises(ValueError, match="CONCILIUM_KERNELS must be one of"):
        use_triton(cpu)


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("CONCILIUM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(1))
