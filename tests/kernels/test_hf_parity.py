"""The kernels reproduce transformers' own layers (fp32), not just our references."""

from __future__ import annotations

import pytest
import torch

from concilium.kernels.fused_moe import fused_moe_triton
from concilium.kernels.rmsnorm import rmsnorm_triton
from concilium.kernels.rope import rope_kv_write_triton
from concilium.kernels.router_topk import router_topk_triton


def moe_block(kind: str, norm_topk_prob: bool):
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(
            hidden_size=64,
            moe_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=norm_topk_prob,
        )
        return Qwen3MoeSparseMoeBlock(cfg), cfg.num_experts_per_tok
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=64, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(cfg), cfg.num_experts_per_tok


@pytest.mark.parametrize(("kind", "norm"), [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)])
def test_moe_block_matches_transformers(device, kind, norm):
    block, k = moe_block(kind, norm)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.1)
    block = block.to(device).eval()
    x = torch.randn(1, 11, 64, device=device)
    with torch.no_grad():
        expected = block(x)
        expected = expected[0] if isinstance(expected, tuple) else expected  # some blocks add router logits
        _, hf_weights, hf_ids = block.gate(x[0])
        weights, ids = router_topk_triton(x[0] @ block.gate.weight.t(), k, "softmax", renormalize=norm)
        got = fused_moe_triton(x[0], block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    assert torch.equal(ids.long().cpu(), hf_ids.long().cpu())  # exactly the same expert choices
    torch.testing.assert_close(weights.cpu(), hf_weights.float().cpu(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.cpu(), expected.reshape(11, 64).cpu(), atol=1e-5, rtol=1e-4)


def test_rmsnorm_matches_transformers(device):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(72, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        x = torch.randn(9, 72, device=device)
        torch.testing.assert_close(rmsnorm_triton(x, norm.weight, 1e-6), norm(x))


def test_rope_matches_transformers(device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64
    )
    D, T = 64, 7
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    table = torch.zeros(1, 64, D, device=device)
    cos, sin = rotary(table, torch.arange(64, device=device)[None])
    cos, sin = cos[0], sin[0]  # [64, D], the frequencies twice
    q, k, v = (
        torch.randn(T, 4, D, device=device),
        torch.randn(T, 2, D, device=device),
        torch.randn(T, 2, D, device=device),
    )
    positions = torch.tensor([0, 3, 9, 10, 11, 40, 63], device=device)
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1), k.transpose(0, 1), cos[positions], sin[positions], unsqueeze_dim=0
    )
    cache = torch.zeros(1, 2, 64, D, device=device)
    for table_cos, table_sin in ((cos, sin), (cos[:, : D // 2], sin[:, : D // 2])):
        q_rot, k_rot = rope_kv_write_triton(
            q,
            k,
            v,
            table_cos,
            table_sin,
            positions,
            cache,
            cache.clone(),
            torch.zeros(T, dtype=torch.long, device=device),
        )
        torch.testing.assert_close(q_rot, hf_q.transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_rot, hf_k.transpose(0, 1), atol=1e-5, rtol=1e-5)
