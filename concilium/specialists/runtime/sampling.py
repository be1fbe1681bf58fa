"""Sampling parameters and next-token selection for a batch with per-request settings.

Each request that samples owns a `torch.Generator` seeded from its `seed`, so a request draws the
same tokens whether it runs alone or inside a batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """An invalid sampling parameter (reported to clients as a 400)."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop sequences (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS tokens
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise SamplingError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop must be up to 16 non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        return torch.Generator(device=device).manual_seed(int(seed) & ((1 << 63) - 1))


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    x = logits / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token for each row of `logits` [B, V] (fp32)."""
    out = logits.argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if not p.greedy:
            out[b] = _sample_row(logits[b], p, generators[b])
    return out
