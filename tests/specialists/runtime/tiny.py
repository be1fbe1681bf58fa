"""Tiny random checkpoints built with transformers itself (offline, milliseconds): the reference the
runtime is compared against."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)

# arch -> (config class, model class, extra config)
ARCHS: dict[str, tuple[type, type, dict]] = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(tie_word_embeddings=True, rope_theta=500.0)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3_moe": (
        T.Qwen3MoeConfig,
        T.Qwen3MoeForCausalLM,
        # layer 1 is a dense MLP layer, 0 and 2 are sparse; top-3 of 8 without renormalisation
        dict(
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
    ),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
}


def build(arch: str, path: Path, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A randomly initialised transformers model saved to `path`; returns the model (eval, fp32)."""
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # weights big enough that every layer matters; norms away from 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return model
