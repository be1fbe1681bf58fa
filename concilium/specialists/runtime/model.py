"""The transformer: dense Llama / Qwen2 / Qwen3 and mixture-of-experts Mixtral / Qwen3-MoE in plain
torch, running on a flat batch of tokens against the preallocated KV cache.

A forward pass is either a *prefill* (several fresh sequences packed one after another; causal
attention within each) or a *decode* step (one new token for each running sequence). The hot ops
are chosen once, in `select_ops`: the Triton kernels' dispatchers from `concilium.kernels` on CUDA,
the torch implementations in `torch_ops` otherwise.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from concilium.specialists.runtime import torch_ops
from concilium.specialists.runtime.config import ModelConfig
from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.quant import Int4Experts, Int4Linear

# A projection weight: a dense [out, in] tensor, or 4-bit planes on CPU (`weights="int4"`).
Weight = torch.Tensor | Int4Linear | Int4Experts


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w(x)
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# Op selection: the one place that decides which implementation runs the hot ops.
# ---------------------------------------------------------------------------------------------

KERNEL_OPS = ("rmsnorm", "add_rmsnorm", "rope_kv_write", "decode_attention", "router_topk", "fused_moe")


@dataclass(frozen=True)
class Ops:
    name: str  # "torch" or "kernels"
    rmsnorm: Callable[..., torch.Tensor]
    add_rmsnorm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope_kv_write: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    decode_attention: Callable[..., torch.Tensor]  # accepts the torch path's host-side hints
    router_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fused_moe: Callable[..., torch.Tensor]
    prefill_attention: Callable[..., torch.Tensor] = torch_ops.prefill_attention


TORCH_OPS = Ops(
    name="torch",
    rmsnorm=torch_ops.rmsnorm,
    add_rmsnorm=torch_ops.add_rmsnorm,
    rope_kv_write=torch_ops.rope_kv_write,
    decode_attention=torch_ops.decode_attention,
    router_topk=torch_ops.router_topk,
    fused_moe=torch_ops.fused_moe,
)


def kernels_available() -> bool:
    """True when `concilium.kernels` exports every dispatcher the runtime uses."""
    try:
        mod = importlib.import_module("concilium.kernels")
    except Exception:
        return False
    return all(callable(getattr(mod, name, None)) for name in KERNEL_OPS)


def _kernel_ops() -> Ops:
    kern = importlib.import_module("concilium.kernels")

    def decode_attention(q, k_cache, v_cache, slots, seq_lens, scale, *, max_len=None, **_hints):  # type: ignore[no-untyped-def]
        # `max_len` (a host-side bound on seq_lens) shrinks the kernel's grid; None inside CUDA graphs.
        return kern.decode_attention(q, k_cache, v_cache, slots, seq_lens, scale, max_seq_len=max_len)

    def rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, slots, *, gathered=None):  # type: ignore[no-untyped-def]
        return kern.rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, slots)

    return Ops(
        name="kernels",
        rmsnorm=kern.rmsnorm,
        add_rmsnorm=kern.add_rmsnorm,
        rope_kv_write=rope_kv_write,
        decode_attention=decode_attention,
        router_topk=kern.router_topk,
        fused_moe=kern.fused_moe,
    )


def select_ops(device: torch.device | str, backend: str = "auto") -> Ops:
    """`auto`: the kernels' dispatchers on CUDA when present, torch otherwise (and always on CPU).
    `kernels`: the dispatchers anywhere (on CPU they run their own torch references).
    `torch`: this package's torch ops. The env var CONCILIUM_KERNELS=torch also forces torch."""
    if backend not in ("auto", "kernels", "torch"):
        raise ValueError(f"unknown ops backend {backend!r} (auto, kernels, torch)")
    if backend == "torch" or os.environ.get("CONCILIUM_KERNELS") == "torch":
        return TORCH_OPS
    if backend == "kernels":
        if not kernels_available():
            raise RuntimeError(
                "concilium.kernels does not provide the runtime's ops: " + ", ".join(KERNEL_OPS)
            )
        return _kernel_ops()
    if torch.device(device).type == "cuda" and kernels_available():
        return _kernel_ops()
    return TORCH_OPS


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass
class AttentionWeights:
    qkv: Weight  # [(Hq + 2 Hk) * D, H]
    o: Weight  # [H, Hq * D]
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D]
    k_norm: torch.Tensor | None = None


@dataclass
class DenseMLPWeights:
    w13: Weight  # [2 I, H]: gate rows then up rows
    w2: Weight  # [H, I]


@dataclass
class MoEWeights:
    router: torch.Tensor  # [E, H]
    w13: torch.Tensor | Int4Experts  # [E, 2 I, H]
    w2: torch.Tensor | Int4Experts  # [E, H, I]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: AttentionWeights
    mlp: DenseMLPWeights | MoEWeights


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor
    lm_head: Weight  # [V, H] (the embedding itself when tied)
    layers: list[LayerWeights]
    rope_freq_factors: torch.Tensor | None = None

    def tensors(self) -> list[Weight]:
        out: list[Weight] = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            out.append(self.lm_head)
        for layer in self.layers:
            out += [layer.input_norm, layer.post_norm]
            a = layer.attn
            out += [t for t in (a.qkv, a.o, a.qkv_bias, a.o_bias, a.q_norm, a.k_norm) if t is not None]
            m = layer.mlp
            out += [m.router, m.w13, m.w2] if isinstance(m, MoEWeights) else [m.w13, m.w2]
        return out

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes for t in self.tensors()
        )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class ForwardBatch:
    """A flat batch of tokens. Tensors live on the model's device; the lists are host-side copies."""

    kind: str  # "prefill" or "decode"
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    token_slots: torch.Tensor  # [N] int64: cache slot of each token
    logits_index: torch.Tensor | None  # rows whose logits are returned (None = all rows)
    # prefill: (start, length) of each packed sequence
    spans: list[tuple[int, int]] = field(default_factory=list)
    # decode: one row per sequence
    slots: torch.Tensor | None = None  # [B] int64
    seq_lens: torch.Tensor | None = None  # [B] int32, including the new token
    max_len: int | None = None  # host-side bound on seq_lens (None: unknown, e.g. inside a CUDA graph)
    slot_range: tuple[int, int] | None = None
    uniform: bool = False
    host: tuple[list[int], list[int], list[int]] | None = None  # decode: (tokens, positions, slots)

    @staticmethod
    def for_prefill(seqs: list[tuple[list[int], int]], device: torch.device) -> ForwardBatch:
        """`seqs`: (prompt token ids, cache slot) per fresh sequence."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        spans: list[tuple[int, int]] = []
        last: list[int] = []
        for tokens, slot in seqs:
            if not tokens:
                raise ValueError("cannot prefill an empty sequence")
            spans.append((len(ids), len(tokens)))
            ids += tokens
            pos += range(len(tokens))
            slots += [slot] * len(tokens)
            last.append(len(ids) - 1)
        data = torch.tensor([ids, pos, slots], dtype=torch.int64)
        return ForwardBatch(
            kind="prefill",
            input_ids=data[0].to(device),
            positions=data[1].to(device),
            token_slots=data[2].to(device),
            logits_index=torch.tensor(last, dtype=torch.int64).to(device),
            spans=spans,
        )

    @staticmethod
    def for_decode(
        tokens: list[int], slots: list[int], positions: list[int], device: torch.device
    ) -> ForwardBatch:
        """One new token per sequence; `positions[b]` is where it goes (= tokens already cached)."""
        data = torch.tensor([tokens, positions, slots], dtype=torch.int64).to(device)
        seq_lens = (data[1] + 1).to(torch.int32)
        n = len(slots)
        consecutive = slots == list(range(slots[0], slots[0] + n))
        return ForwardBatch(
            kind="decode",
            input_ids=data[0],
            positions=data[1],
            token_slots=data[2],
            logits_index=None,
            slots=data[2],
            seq_lens=seq_lens,
            max_len=max(positions) + 1,
            slot_range=(slots[0], n) if consecutive else None,
            uniform=min(positions) == max(positions),
            host=(tokens, positions, slots),
        )


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Model:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        *,
        max_positions: int,
        ops: Ops | None = None,
        fused_decode: bool = True,
    ) -> None:
        """`fused_decode`: on CPU with int4 weights, run decode steps of one sequence as one C call
        (`cpu_decode`) where the machine supports it."""
        from concilium.specialists.runtime.cpu_decode import FusedDecode
        from concilium.specialists.runtime.rope import rope_tables

        self.cfg = cfg
        self.w = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.ops = ops or select_ops(self.device)
        self.cos, self.sin = rope_tables(cfg, max_positions, self.device, weights.rope_freq_factors)
        self.scale = cfg.head_dim**-0.5
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # Tokens routed to each expert, per layer (summed since start) for load-balance metrics.
        n_exp = max(cfg.num_experts, 1)
        self.expert_tokens = torch.zeros((cfg.num_layers, n_exp), dtype=torch.int64, device=self.device)
        # When a list, each MoE layer appends (layer index, expert ids [N, k]) during forward.
        self.routing_trace: list[tuple[int, torch.Tensor]] | None = None
        self.fused = FusedDecode.create(self) if fused_decode else None

    @property
    def max_positions(self) -> int:
        """The longest sequence the RoPE tables cover."""
        return self.cos.shape[0]

    def new_cache(self, max_slots: int, max_seq_len: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, max_slots, c.num_kv_heads, max_seq_len, c.head_dim, self.dtype, self.device)

    # -- pieces -----------------------------------------------------------------------------

    def _attention(
        self, i: int, h: torch.Tensor, batch: ForwardBatch, cache: KVCache, rope: tuple | None
    ) -> torch.Tensor:
        cfg, ops, a = self.cfg, self.ops, self.w.layers[i].attn
        n = h.shape[0]
        qkv = linear(h, a.qkv, a.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, cfg.num_heads, cfg.head_dim)
        k = k.view(n, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        if a.q_norm is not None:
            q = ops.rmsnorm(q, a.q_norm, cfg.rms_norm_eps)
            k = ops.rmsnorm(k, a.k_norm, cfg.rms_norm_eps)
        k_cache, v_cache = cache.layer(i)
        q, k = ops.rope_kv_write(
            q, k, v, self.cos, self.sin, batch.positions, k_cache, v_cache, batch.token_slots, gathered=rope
        )
        if batch.kind == "decode":
            out = ops.decode_attention(
                q,
                k_cache,
                v_cache,
                batch.slots,
                batch.seq_lens,
                self.scale,
                max_len=batch.max_len,
                slot_range=batch.slot_range,
                uniform=batch.uniform,
            )
        elif len(batch.spans) == 1:
            out = ops.prefill_attention(q, k, v, self.scale)
        else:
            out = torch.cat(
                [
                    ops.prefill_attention(q[s : s + m], k[s : s + m], v[s : s + m], self.scale)
                    for s, m in batch.spans
                ]
            )
        return linear(out.reshape(n, self.q_size), a.o, a.o_bias)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        m = self.w.layers[i].mlp
        if isinstance(m, DenseMLPWeights):
            g = linear(h, m.w13)
            inter = g.shape[1] // 2
            return linear(F.silu(g[:, :inter]) * g[:, inter:], m.w2)
        cfg = self.cfg
        logits = F.linear(h, m.router)
        weights, ids = self.ops.router_topk(logits, cfg.num_experts_per_tok, "softmax", cfg.norm_topk_prob)
        self.expert_tokens[i].index_add_(
            0, ids.reshape(-1).long(), torch.ones(ids.numel(), dtype=torch.int64, device=ids.device)
        )
        if self.routing_trace is not None:
            self.routing_trace.append((i, ids.detach().clone()))
        return self.ops.fused_moe(h, m.w13, m.w2, weights, ids)

    # -- forward ----------------------------------------------------------------------------

    def hidden_states(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states of the rows in `batch.logits_index` (all rows when None)."""
        ops, eps = self.ops, self.cfg.rms_norm_eps
        x = F.embedding(batch.input_ids, self.w.embed)
        # The torch path gathers the RoPE factors of these positions once, not in every layer.
        rope = (
            torch_ops.rope_tables_at(self.cos, self.sin, batch.positions, self.dtype)
            if ops is TORCH_OPS
            else None
        )
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.w.layers):
            if residual is None:
                residual = x
                h = ops.rmsnorm(x, layer.input_norm, eps)
            else:
                h, residual = ops.add_rmsnorm(x, residual, layer.input_norm, eps)
            x = self._attention(i, h, batch, cache, rope)
            h, residual = ops.add_rmsnorm(x, residual, layer.post_norm, eps)
            x = self._mlp(i, h)
        assert residual is not None
        if batch.logits_index is not None:
            x, residual = x[batch.logits_index], residual[batch.logits_index]
        h, _ = ops.add_rmsnorm(x, residual, self.w.final_norm, eps)
        return h

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """fp32 logits [rows, vocab] for the rows in `batch.logits_index` (all rows when None)."""
        if self.fused is not None and batch.host is not None and len(batch.host[0]) == 1:
            (token,), (position,), (slot,) = batch.host
            return self.fused(token, position, slot, cache)
        return linear(self.hidden_states(batch, cache), self.w.lm_head).float()

    __call__ = forward

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer."""
        counts = self.expert_tokens.cpu().tolist()
        return {i: counts[i] for i in self.cfg.moe_layers}

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.cfg.arch,
            "dtype": str(self.dtype),
            "device": str(self.device),
            "ops": self.ops.name,
            "decode_b1": "fused C step" if self.fused is not None else "torch",
        }
