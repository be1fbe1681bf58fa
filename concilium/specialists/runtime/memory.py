"""Parameter and memory accounting, done from the configuration before any weight is loaded.

`plan_memory` counts total and active parameters (active = what one token touches: the routed
experts only, for mixture-of-experts models) and the bytes needed for weights plus the KV cache at
the configured context and batch; `check_fits` refuses with a clear message when that exceeds what
the device has free.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from concilium.specialists.runtime import cpu_decode
from concilium.specialists.runtime.config import ModelConfig

GiB = 1024**3


class InsufficientMemoryError(MemoryError):
    pass


@dataclass
class ParamCount:
    total: int
    active: int  # per token
    embedding: int
    attention: int
    mlp_total: int
    mlp_active: int


@dataclass
class MemoryPlan:
    params: ParamCount
    dtype: str
    bytes_per_param: int
    weight_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    max_batch: int
    max_seq_len: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def active_weight_bytes_per_token(self) -> int:
        return self.params.active * self.bytes_per_param

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["active_weight_bytes_per_token"] = self.active_weight_bytes_per_token
        return d

    def summary(self) -> str:
        p = self.params
        return (
            f"{p.total / 1e9:.3f}B parameters ({p.active / 1e9:.3f}B active per token), "
            f"weights {self.weight_bytes / GiB:.2f} GiB in {self.dtype} + KV cache {self.kv_cache_bytes / GiB:.2f} GiB "
            f"({self.max_batch} sequences x {self.max_seq_len} tokens) + workspace {self.workspace_bytes / GiB:.2f} GiB "
            f"= {self.total_bytes / GiB:.2f} GiB"
        )


def count_params(cfg: ModelConfig) -> ParamCount:
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    embedding = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2)
    attn_layer = H * (q + 2 * kv) + q * H + 2 * H  # projections + the two layer norms
    if cfg.qkv_bias:
        attn_layer += q + 2 * kv
    if cfg.o_bias:
        attn_layer += H
    if cfg.qk_norm:
        attn_layer += 2 * D
    mlp_total = mlp_active = 0
    for i in range(cfg.num_layers):
        if cfg.layer_is_moe(i):
            expert = 3 * H * cfg.moe_intermediate_size
            router = cfg.num_experts * H
            mlp_total += router + cfg.num_experts * expert
            mlp_active += router + cfg.num_experts_per_tok * expert
        else:
            dense = 3 * H * cfg.intermediate_size
            mlp_total += dense
            mlp_active += dense
    attention = attn_layer * cfg.num_layers
    total = embedding + attention + mlp_total + H
    # A token reads one embedding row but the whole output projection.
    active = cfg.vocab_size * H + H + attention + mlp_active + (0 if cfg.tie_word_embeddings else H)
    return ParamCount(total, active, embedding, attention, mlp_total, mlp_active)


def kv_cache_bytes(cfg: ModelConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * max_batch * cfg.num_kv_heads * max_seq_len * cfg.head_dim * elem


def plan_memory(
    cfg: ModelConfig,
    dtype: torch.dtype,
    max_batch: int,
    max_seq_len: int,
    cache_slots: int | None = None,
    weights: str = "dense",
) -> MemoryPlan:
    """`weights="int4"`: attention, MLP (experts too) and output projections at 4 bits plus a bf16 scale and
    offset per 32 weights (up to two planes for 8-bit GGUF blocks: counted as one, the common case);
    dense projections twice where the fused decode step runs (`cpu_decode.covers`)."""
    if max_batch < 1 or max_seq_len < 2:
        raise ValueError("max_batch must be >= 1 and max_seq_len >= 2")
    params = count_params(cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    weight_bytes = params.total * elem
    if weights == "int4":
        experts = sum(3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_experts for i in range(cfg.num_layers)
                      if cfg.layer_is_moe(i))
        dense = sum(3 * cfg.hidden_size * cfg.intermediate_size for i in range(cfg.num_layers)
                    if not cfg.layer_is_moe(i)) + params.attention + cfg.vocab_size * cfg.hidden_size  # + output head
        # Dense projections are held twice where the fused decode step runs: for torch's int4 kernel
        # and in that step's layout.
        copies = 2 if cpu_decode.covers(cfg, dtype) else 1
        weight_bytes += int((experts + copies * dense) * 0.625) - (experts + dense) * elem
        if cfg.tie_word_embeddings:  # the embedding table stays dense for lookups, the output head is int4
            weight_bytes += cfg.vocab_size * cfg.hidden_size * elem
    # Activations: a prefill chunk's logits row and MLP intermediate, plus the RoPE tables; small next
    # to the weights, but counted so that a tight fit is refused rather than failing mid-request.
    inter = max(cfg.intermediate_size, cfg.moe_intermediate_size * max(cfg.num_experts_per_tok, 1))
    workspace = (
        4 * max_batch * cfg.vocab_size + 8 * max_seq_len * (cfg.head_dim + 2 * cfg.hidden_size + inter) * 4
    )
    return MemoryPlan(
        params=params,
        dtype=str(dtype).removeprefix("torch."),
        bytes_per_param=elem,
        weight_bytes=weight_bytes,
        kv_cache_bytes=kv_cache_bytes(cfg, cache_slots or max_batch, max_seq_len, dtype),
        workspace_bytes=workspace,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
    )


def available_bytes(device: torch.device | str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:  # Linux: what the kernel reports as available without swapping
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(plan: MemoryPlan, device: torch.device | str, available: int | None = None) -> None:
    """Raise InsufficientMemoryError when the plan needs more than `device` has free."""
    free = available_bytes(device) if available is None else available
    if plan.total_bytes > free:
        raise InsufficientMemoryError(
            f"model does not fit on {device}: needs {plan.total_bytes / GiB:.2f} GiB "
            f"({plan.summary()}), but only {free / GiB:.2f} GiB is free. "
            "Lower --max-seq-len or --max-batch, or use a smaller --dtype."
        )
