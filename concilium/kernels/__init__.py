"""Triton kernels for the local runtime's hot operations, each beside its torch reference.

One module per op: the Triton kernel(s), a launcher (`*_triton`) that checks shapes, dtypes,
strides and block sizes, the torch reference (`*_torch`, also the CPU path) and the dispatcher
exported here. Block configurations come from `configs/<op>.json` (see `configs.py`).

How the runtime uses them
-------------------------
Call the dispatchers below from the model code on every device; nothing else is needed::

    from concilium import kernels

    weights, ids = kernels.router_topk(router_logits, k, "softmax", renormalize=True)
    y = kernels.fused_moe(x, w13, w2, weights, ids)      # w13 [E, 2I, H], w2 [E, H, I]
    y, residual = kernels.add_rmsnorm(x, residual, norm_weight, eps)
    q = kernels.rmsnorm(q.view(T, Hq, D), q_norm_weight, eps)          # Qwen3 per-head q/k norm
    q, k = kernels.rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    attn = kernels.decode_attention(q, k_cache, v_cache, slots, seq_lens, scale)

On CUDA tensors with Triton installed they run the Triton kernels; on CPU (or without Triton)
the torch references. `CONCILIUM_KERNELS=torch` forces the references everywhere (compare the
two paths, or rule the kernels out); `CONCILIUM_KERNELS=triton` forces the kernels, on CPU
through the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported) — slow, but
it runs a whole model through the kernels on a machine without a GPU. The variable is read at
every call. For CUDA graphs: no dispatcher reads device values on the host when it runs Triton
(decode_attention sizes its grid from the cache length, or from the optional host-side
`max_seq_len` bound), so a decode step can be captured.

Checking and tuning
-------------------
`pytest tests/kernels` proves each kernel against its reference (in the interpreter on CPU, on
the device when there is a GPU). `python -m concilium.kernels.aot --arch 90` compiles every
configuration in the tables for a GPU architecture without needing one. On a GPU,
`python benchmarks/kernels.py` measures the kernels against eager and compiled references and
`--tune` adds measured fused-MoE tables for that device.
"""

from concilium.kernels.decode_attention import decode_attention
from concilium.kernels.dispatch import kernels_mode, use_triton
from concilium.kernels.fused_moe import fused_moe
from concilium.kernels.moe_align import moe_align
from concilium.kernels.rmsnorm import add_rmsnorm, rmsnorm
from concilium.kernels.rope import rope_kv_write
from concilium.kernels.router_topk import router_topk

__all__ = [
    "add_rmsnorm",
    "decode_attention",
    "fused_moe",
    "kernels_mode",
    "moe_align",
    "rmsnorm",
    "rope_kv_write",
    "router_topk",
    "use_triton",
]
