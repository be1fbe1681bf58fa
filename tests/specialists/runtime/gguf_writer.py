"""Write a tiny transformers model as a GGUF file the way llama.cpp's converter lays it out (q/k
rows interleaved for the llama architecture, experts stacked per layer), optionally quantising the
projections, and put the quantisation round trip back into the transformers model so both sides
hold the same weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation: rotate-half row order -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantised(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks, dequantised float32 values)."""
    raw = gguf.quants.quantize(w.astype(np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape)


def write(
    hf: torch.nn.Module,
    path: Path,
    quant: dict[str, gguf.GGMLQuantizationType] | None = None,
    vocab: bool = False,
) -> None:
    """`quant`: tensor-name suffix (e.g. "attn_q.weight") -> block type; others are stored F32.
    `vocab`: also store a placeholder SentencePiece vocabulary (llama.cpp will not load a file without one)."""
    cfg = hf.config
    arch = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}[cfg.model_type]
    quant = quant or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if vocab:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, cfg.vocab_size)])
        w.add_token_scores([0.0] * cfg.vocab_size)
        w.add_token_types([2, 3, 3] + [1] * (cfg.vocab_size - 3))  # unknown, control, control, normal
    if arch == "qwen3moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)

    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = dict(hf.named_parameters())

    def put(name: str, hf_name: str, value: np.ndarray | None = None, n_head: int | None = None) -> None:
        arr = state[hf_name] if value is None else value
        qtype = next((q for suffix, q in quant.items() if name.endswith(suffix)), None)
        if qtype is not None:
            raw, deq = _quantised(arr, qtype)
            with torch.no_grad():  # the reference model gets the same (dequantised) weights
                params[hf_name].copy_(torch.from_numpy(deq))
            arr = raw
        if n_head is not None:
            arr = _permute(arr, n_head)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(name, arr, raw_dtype=qtype)

    put("token_embd.weight", "model.embed_tokens.weight")
    put("output_norm.weight", "model.norm.weight")
    if not cfg.tie_word_embeddings:
        put("output.weight", "lm_head.weight")
    heads = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads} if arch == "llama" else {}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight")
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            put(b + f"attn_{ours}.weight", p + f"self_attn.{theirs}.weight", n_head=heads.get(ours))
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        if arch in ("qwen3", "qwen3moe"):
            put(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight")
            put(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight")
        if arch == "qwen3moe":
            put(b + "ffn_gate_inp.weight", p + "mlp.gate.weight")
            gate_up = state[p + "mlp.experts.gate_up_proj"].copy()  # [E, 2I, H]
            down = state[p + "mlp.experts.down_proj"].copy()
            inter = gate_up.shape[1] // 2
            for name, part in (("ffn_gate_exps", gate_up[:, :inter]), ("ffn_up_exps", gate_up[:, inter:]),
                               ("ffn_down_exps", down)):
                qtype = quant.get(name + ".weight")
                if qtype is None:
                    w.add_tensor(b + name + ".weight", np.ascontiguousarray(part))
                    continue
                raw, deq = _quantised(np.ascontiguousarray(part), qtype)
                part[...] = deq  # a view into gate_up / down: the reference gets the dequantised values
                w.add_tensor(b + name + ".weight", raw, raw_dtype=qtype)
            with torch.no_grad():
                params[p + "mlp.experts.gate_up_proj"].copy_(torch.from_numpy(gate_up))
                params[p + "mlp.experts.down_proj"].copy_(torch.from_numpy(down))
        else:
            put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight")
            put(b + "ffn_up.weight", p + "mlp.up_proj.weight")
            put(b + "ffn_down.weight", p + "mlp.down_proj.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
