"""Rotary position embedding tables (rotate-half / NeoX layout, as Llama and Qwen use).

The tables are `cos, sin` of shape [max_positions, head_dim / 2] in fp32; the hot op that applies
them lives with the other ops (`torch_ops.rope_kv_write` or the Triton kernel).
"""

from __future__ import annotations

import math

import torch

from concilium.specialists.runtime.config import ConfigError, ModelConfig


def inverse_frequencies(cfg: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] (fp32), with the checkpoint's RoPE scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if freq_factors is not None:  # GGUF `rope_freqs.weight` (Llama 3.1 style long-context factors)
        return inv / freq_factors.float()
    scaling = cfg.rope_scaling
    if not scaling:
        return inv
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def rope_tables(
    cfg: ModelConfig, max_positions: int, device: torch.device, freq_factors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    inv = inverse_frequencies(cfg, freq_factors)
    pos = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = pos[:, None] * inv[None, :]
    return freqs.cos().to(device), freqs.sin().to(device)
