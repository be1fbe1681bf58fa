"""Model configuration: one `ModelConfig` for every supported architecture, read from a Hugging Face
`config.json` or from GGUF metadata.

Supported families: dense Llama (and Mistral without sliding window), Qwen2 (q/k/v bias), Qwen3
(per-head q/k RMSNorm), and the mixture-of-experts Mixtral and Qwen3-MoE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DENSE_ARCHS = ("llama", "qwen2", "qwen3")
MOE_ARCHS = ("mixtral", "qwen3_moe")
SUPPORTED_ARCHS = DENSE_ARCHS + MOE_ARCHS
# Hugging Face `model_type` -> our architecture name.
_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
}


class ConfigError(ValueError):
    """The checkpoint's configuration is missing something or describes an unsupported model."""


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Hugging Face `rope_scaling` / `rope_parameters` (without rope_theta); None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # Mixture of experts (num_experts == 0 for dense models).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # the checkpoint's stored dtype, informational

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.is_moe:
            if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"{self.arch}: need 0 < num_experts_per_tok ({self.num_experts_per_tok}) <= num_experts ({self.num_experts})"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"{self.arch}: moe_intermediate_size must be positive")
            if any(not 0 <= i < self.num_layers for i in self.moe_layers):
                raise ConfigError(f"moe layer index out of range 0..{self.num_layers - 1}: {self.moe_layers}")

    @property
    def is_moe(self) -> bool:
        return self.arch in MOE_ARCHS

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i in self.moe_layer_set

    @property
    def moe_layer_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, list | tuple):
        return [int(x) for x in v]
    return [int(v)]


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    merged["rope_type"] = kind
    return float(theta), merged


def config_from_hf_dict(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face config.json (and generation_config.json)."""
    model_type = cfg.get("model_type")
    arch = _HF_MODEL_TYPES.get(str(model_type))
    if arch is None:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_HF_MODEL_TYPES))}"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"unsupported hidden_act {act!r} (only silu)")
    if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
        raise ConfigError("sliding-window attention is not supported")
    if cfg.get("mlp_bias"):
        raise ConfigError("MLP bias is not supported")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        common: dict[str, Any] = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
    theta, scaling = _rope_from_hf(cfg)
    generation = generation or {}
    eos = _as_list(generation.get("eos_token_id")) or _as_list(cfg.get("eos_token_id"))
    extra: dict[str, Any] = {}
    if arch == "qwen2":
        extra["qkv_bias"] = True
    elif arch == "llama":
        extra["qkv_bias"] = extra["o_bias"] = bool(cfg.get("attention_bias", False))
    elif arch in ("qwen3", "qwen3_moe"):
        extra["qk_norm"] = True
        extra["qkv_bias"] = bool(cfg.get("attention_bias", False))
    if arch == "mixtral":
        n = int(cfg.get("num_local_experts") or 0)
        extra.update(
            num_experts=n,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            moe_intermediate_size=common["intermediate_size"],
            norm_topk_prob=True,
            moe_layers=list(range(common["num_layers"])),
        )
    elif arch == "qwen3_moe":
        n = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense_only = set(_as_list(cfg.get("mlp_only_layers")))
        extra.update(
            num_experts=n,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 8)),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            moe_layers=[
                i
                for i in range(common["num_layers"])
                if i not in dense_only and n > 0 and (i + 1) % step == 0
            ],
        )
    return ModelConfig(
        arch=arch,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=generation.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_ids=eos,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        **common,
        **extra,
    )


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    d = Path(model_dir)
    path = d / "config.json"
    if not path.is_file():
        raise ConfigError(f"{d} has no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    gen_path = d / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return config_from_hf_dict(cfg, gen)


# GGUF architecture name -> ours (llama with experts is Mixtral).
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}


def config_from_gguf_fields(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build a ModelConfig from GGUF key/values (already decoded to Python values)."""
    garch = meta.get("general.architecture")
    if garch not in _GGUF_ARCHS:
        raise ConfigError(f"unsupported GGUF architecture {garch!r}; supported: {', '.join(_GGUF_ARCHS)}")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{garch}.{key}"
        if full not in meta:
            if required:
                raise ConfigError(f"GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    n_experts = int(get("expert_count", 0) or 0)
    arch = _GGUF_ARCHS[garch]
    if arch == "llama" and n_experts > 0:
        arch = "mixtral"
    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ConfigError("per-layer KV head counts are not supported")
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", 0) or (len(tokens) if tokens is not None else 0))
    if not vocab and "token_embd.weight" not in tensor_names:
        raise ConfigError("GGUF file gives no vocabulary size")
    n_layers = int(get("block_count", required=True))
    scaling: dict[str, Any] | None = None
    stype = get("rope.scaling.type")
    if stype in ("linear",):
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    elif stype not in (None, "none"):
        raise ConfigError(f"unsupported GGUF rope scaling {stype!r}")
    extra: dict[str, Any] = {}
    if arch == "qwen2":
        extra["qkv_bias"] = True
    if arch in ("qwen3", "qwen3_moe"):
        extra["qk_norm"] = True
    if arch in ("mixtral", "qwen3_moe"):
        extra.update(
            num_experts=n_experts,
            num_experts_per_tok=int(get("expert_used_count", 2 if arch == "mixtral" else 8)),
            moe_intermediate_size=int(get("expert_feed_forward_length", 0) or get("feed_forward_length", 0)),
            norm_topk_prob=bool(get("expert_weights_norm", True)),
            moe_layers=list(range(n_layers)),
        )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", 0) or 0),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=sorted({int(x) for x in (eos, eot) if x is not None}),
        **extra,
    )
