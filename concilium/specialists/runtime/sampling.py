"""Sampling parameters and next-token selection for a batch with per-request settings.

Each request that samples owns a `torch.Generator` seeded from its `seed`, so a request draws the
same tokens whether it runs alone or inside a batch. `logit_bias` and the presence/frequency
penalties (OpenAI's: minus frequency_penalty x count and presence_penalty x seen, over the tokens
generated so far) change a request's logits before it samples; log-probs (`token_logprobs`) are
computed only for the rows that ask for them, from the model's own distribution (before
temperature, top-k/top-p, logit_bias and penalties).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20


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
    logprobs: bool = False  # report each generated token's log-prob
    top_logprobs: int = 0  # ... and the k most likely tokens at each position (0-20)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = 0.0  # -2..2, subtracted once from every token generated so far
    json_object: bool = False  # constrain the answer to a JSON object (`json_mode`)
    frequency_penalty: float = 0.0  # -2..2, subtracted per time a token was generated so far
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

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
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        for t, v in self.logit_bias.items():
            if not isinstance(t, int) or t < 0 or not -100 <= v <= 100:
                raise SamplingError("logit_bias maps token ids (>= 0) to values from -100 to 100")
        return self

    def bias(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`logit_bias` as (token ids, values) tensors on `device`, built once per request."""
        if self._bias is None or self._bias[0].device != device:
            ids = torch.tensor(list(self.logit_bias), dtype=torch.long, device=device)
            self._bias = ids, torch.tensor(list(self.logit_bias.values()), dtype=torch.float32, device=device)
        return self._bias

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

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


def _processed(
    logits: torch.Tensor,
    params: list[SamplingParams],
    counts: list[torch.Tensor | None] | None,
    allowed: list[torch.Tensor | None] | None,
) -> torch.Tensor:
    """`logits` with each row's logit_bias, penalties and allowed-token mask applied (the same tensor
    when none apply)."""
    rows = [
        b
        for b, p in enumerate(params)
        if p.logit_bias or (counts is not None and counts[b] is not None) or (allowed is not None and allowed[b] is not None)
    ]
    if not rows:
        return logits
    logits = logits.clone()  # the caller's logits stay the model's (log-probs are computed from them)
    for b in rows:
        p = params[b]
        if p.logit_bias:
            ids, values = p.bias(logits.device)
            logits[b].index_add_(0, ids, values.to(logits.dtype))
        seen = counts[b] if counts is not None else None
        if seen is not None:
            logits[b] -= p.frequency_penalty * seen + p.presence_penalty * (seen > 0).to(logits.dtype)
        mask = allowed[b] if allowed is not None else None
        if mask is not None:
            logits[b].masked_fill_(~mask, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    counts: list[torch.Tensor | None] | None = None,
    allowed: list[torch.Tensor | None] | None = None,
) -> list[int]:
    """Next token for each row of `logits` [B, V] (fp32). `counts[b]` (for penalized rows): how often
    each token was generated so far, a [V] float tensor; `allowed[b]`: a [V] bool mask of the tokens
    row b may take (constrained decoding)."""
    logits = _processed(logits, params, counts, allowed)
    out = logits.argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if not p.greedy:
            out[b] = _sample_row(logits[b], p, generators[b])
    return out


@dataclass
class TokenLogprob:
    """A generated token, its log-prob, and the most likely tokens at its position (id, log-prob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(
    logits: torch.Tensor, rows: list[int], tokens: list[int], top: list[int]
) -> list[TokenLogprob]:
    """Log-probs of `tokens[i]` under row `rows[i]` of `logits` [B, V], with the `top[i]` most likely
    tokens of that row, most likely first. One log_softmax over the asked rows only."""
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(1).tolist()
    k = max(top, default=0)
    values, ids = lp.topk(k, dim=-1) if k else (None, None)
    values, ids = (values.tolist(), ids.tolist()) if k else ([], [])
    return [
        TokenLogprob(tok, chosen[i], list(zip(ids[i][: top[i]], values[i][: top[i]], strict=True)) if k else [])
        for i, tok in enumerate(tokens)
    ]
