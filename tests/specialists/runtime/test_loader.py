"""Checkpoint formats: sharded safetensors with an index, experts stored stacked, GGUF (permuted q/k,
stacked experts, quantised blocks), and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from concilium.specialists.runtime.config import ConfigError
from concilium.specialists.runtime.gguf_loader import GGUFSource
from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.loader import LoadError, load_model, resolve_model_path
from concilium.specialists.runtime.model import ForwardBatch
from concilium.specialists.runtime.quant import Int4Linear
from tests.specialists.runtime import gguf_writer, tiny

Q = gguf.GGMLQuantizationType


def _max_logit_error(model, hf, n: int = 12) -> float:
    ids = torch.arange(3, 3 + n) * 7 % hf.config.vocab_size
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    c = model.cfg
    cache = KVCache(c.num_layers, 1, c.num_kv_heads, 64, c.head_dim, model.dtype, model.device)
    batch = ForwardBatch.for_prefill([(ids.tolist(), 0)], model.device)
    batch.logits_index = None
    with torch.inference_mode():
        return (model(batch, cache) - ref).abs().max().item()


def test_sharded_checkpoint_with_index(tmp_path):
    hf = tiny.build("qwen3", tmp_path / "src")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = load_model(tmp_path / "sharded", tokenizer=False, max_seq_len=64).model
    assert _max_logit_error(model, hf) < 1e-4


def test_experts_stored_stacked(tmp_path, tiny_models):
    """Checkpoints that already hold experts as [E, 2I, H] / [E, H, I] tensors load too."""
    hf, src = tiny_models["qwen3_moe"]
    stacked = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers' in-memory layout
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in stacked)
    d = tmp_path / "stacked"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    save_file(stacked, str(d / "model.safetensors"))
    model = load_model(d, tokenizer=False, max_seq_len=64).model
    assert _max_logit_error(model, hf) < 1e-4


def test_missing_and_misshapen_tensors_are_named(tmp_path, tiny_models):
    hf, src = tiny_models["llama"]
    state = load_file(str(src / "model.safetensors"))
    d = tmp_path / "broken"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    save_file(
        {k: v for k, v in state.items() if "layers.1.self_attn.v_proj" not in k}, str(d / "model.safetensors")
    )
    with pytest.raises(LoadError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        load_model(d, tokenizer=False, max_seq_len=64)
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"][
        :, :32
    ].contiguous()
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(LoadError, match=r"layers\.0\.down has shape \(64, 32\), expected \(64, 96\)"):
        load_model(d, tokenizer=False, max_seq_len=64)


def test_config_errors(tmp_path, tiny_models):
    _, src = tiny_models["llama"]
    cfg = json.loads((src / "config.json").read_text())
    d = tmp_path / "cfg"
    d.mkdir()
    for change, message in [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "unsupported rope scaling",
        ),
    ]:
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        shutil.copy(src / "model.safetensors", d / "model.safetensors")
        with pytest.raises((ConfigError, ValueError), match=message):
            load_model(d, tokenizer=False, max_seq_len=64)
    with pytest.raises(LoadError, match="neither a Hugging Face model directory nor a .gguf file"):
        load_model(src / "config.json", tokenizer=False)
    with pytest.raises(LoadError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(LoadError, match="not a readable GGUF file"):
        load_model(tmp_path / "bad.gguf", tokenizer=False)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_gguf_matches_transformers(tmp_path, arch):
    """F32 GGUF written like llama.cpp's converter (interleaved q/k for llama, stacked experts)."""
    extra = {"mlp_only_layers": [], "norm_topk_prob": True} if arch == "qwen3_moe" else {}
    hf = tiny.build(arch, tmp_path / "hf", **extra)
    gguf_writer.write(hf, tmp_path / "model.gguf")
    model = load_model(tmp_path / "model.gguf", tokenizer=False, max_seq_len=64).model
    assert model.cfg.arch == arch and model.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    assert _max_logit_error(model, hf) < 1e-4


def test_gguf_quantised_blocks_dense_and_int4(tmp_path):
    hf = tiny.build("llama", tmp_path / "hf")
    quant = {
        "token_embd.weight": Q.Q8_0,
        "attn_q.weight": Q.Q4_0,
        "attn_k.weight": Q.Q8_0,
        "attn_v.weight": Q.Q4_1,
        "attn_output.weight": Q.Q8_0,
        "ffn_gate.weight": Q.Q4_1,
        "ffn_up.weight": Q.Q8_0,
        "ffn_down.weight": Q.Q4_0,
    }
    gguf_writer.write(hf, tmp_path / "q.gguf", quant)  # hf now holds the dequantised values
    dense = load_model(tmp_path / "q.gguf", tokenizer=False, max_seq_len=64, weights="dense").model
    assert _max_logit_error(dense, hf) < 1e-4
    # the 4-bit planes are exactly the stored blocks (q rows put back in rotate-half order)
    src = GGUFSource(tmp_path / "q.gguf")
    for name in (
        "embed",
        "layers.0.q",
        "layers.1.k",
        "layers.2.v",
        "layers.1.o",
        "layers.0.gate",
        "layers.2.down",
    ):
        assert torch.equal(src.get_blocks(name).dequantize(), src.get(name)), name
    assert src.get_blocks("layers.0.input_norm") is None  # F32 vectors are not blocks
    # int4 mode keeps those blocks: the same model within bf16 rounding of activations and scales
    q4 = load_model(tmp_path / "q.gguf", tokenizer=False, max_seq_len=64, weights="int4").model
    assert isinstance(q4.w.layers[0].attn.qkv, Int4Linear)
    ids = torch.arange(10) * 11 % 160
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    c = q4.cfg
    cache = KVCache(c.num_layers, 1, c.num_kv_heads, 64, c.head_dim, q4.dtype, q4.device)
    batch = ForwardBatch.for_prefill([(ids.tolist(), 0)], q4.device)
    batch.logits_index = None
    with torch.inference_mode():
        out = q4(batch, cache)
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
