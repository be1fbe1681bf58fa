"""Mixture-of-experts models with `weights="int4"` on CPU: every expert's projections as 4-bit planes
(GGUF Q4_0/Q4_1/Q8_0 expert blocks kept as stored; other checkpoints quantised per group of 32), and
the same logits as a dense model holding the same (dequantised) weights, within bf16 rounding."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

from concilium.kernels.fused_moe import fused_moe_torch
from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.gguf_loader import GGUFSource
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.model import ForwardBatch, Int4Linear, MoEWeights
from concilium.specialists.runtime.quant import Int4Experts, quantize_rtn
from concilium.specialists.runtime.sampling import SamplingParams
from tests.specialists.runtime import gguf_writer, tiny

IDS = (torch.arange(12) * 13 + 3) % 160


def _logits(model) -> torch.Tensor:
    cache = model.new_cache(1, 64)
    batch = ForwardBatch.for_prefill([(IDS.tolist(), 0)], model.device)
    batch.logits_index = None
    with torch.inference_mode():
        return model(batch, cache)


def _experts_match(q4, dense) -> None:
    """Each MoE layer's experts, given the same tokens and routing, within bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    for lq, ld in zip(q4.w.layers, dense.w.layers, strict=True):
        x = torch.randn(6, q4.cfg.hidden_size, generator=gen)
        ids = torch.randint(0, q4.cfg.num_experts, (6, 3), generator=gen)
        w = torch.rand(6, 3, generator=gen)
        got = fused_moe_torch(x, lq.mlp.w13, lq.mlp.w2, w, ids)
        want = fused_moe_torch(x, ld.mlp.w13, ld.mlp.w2, w, ids)
        assert (got - want).abs().max() < 0.02 * want.abs().max()


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Whole models: bf16 activations move some near-tie routing decisions (a token then meets other
    experts), so the bound is loose; a wrong expert or a wrong row would be far outside it."""
    assert (out - ref).abs().max().item() < 0.4 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.6


def test_qwen3_moe_gguf_expert_blocks_are_kept(tmp_path):
    hf = tiny.build("qwen3_moe", tmp_path / "hf", mlp_only_layers=[], norm_topk_prob=True)  # as llama.cpp lays it out
    quant = {
        "ffn_gate_exps.weight": Q.Q4_0,
        "ffn_up_exps.weight": Q.Q8_0,
        "ffn_down_exps.weight": Q.Q4_1,
        "attn_q.weight": Q.Q4_1,
    }
    gguf_writer.write(hf, tmp_path / "moe.gguf", quant)  # hf now holds the dequantised values
    src = GGUFSource(tmp_path / "moe.gguf")
    blocks = src.get_expert_blocks("layers.0.w13")
    assert len(blocks) == 8 and len(blocks[0].planes) == 2  # Q8_0 up rows: two planes, Q4_0 gate padded
    assert torch.equal(torch.stack([b.dequantize() for b in blocks]), src.get("layers.0.w13"))
    assert torch.equal(torch.stack([b.dequantize() for b in src.get_expert_blocks("layers.2.w2")]),
                       src.get("layers.2.w2"))

    q4 = load_model(tmp_path / "moe.gguf", tokenizer=False, max_seq_len=64, weights="int4")
    moe = q4.model.w.layers[0].mlp
    assert isinstance(moe, MoEWeights) and isinstance(moe.w13, Int4Experts) and isinstance(moe.w2, Int4Experts)
    assert moe.w13.shape == (8, 64, 64) and moe.w2.shape == (8, 64, 32)
    assert isinstance(q4.model.w.layers[1].attn.qkv, Int4Linear)
    dense = load_model(tmp_path / "moe.gguf", tokenizer=False, max_seq_len=64, weights="dense")
    assert q4.model.w.nbytes() < 0.45 * dense.model.w.nbytes()
    assert q4.plan.weight_bytes < 0.45 * dense.plan.weight_bytes  # the plan counts the experts at 4 bits
    _experts_match(q4.model, dense.model)
    with torch.no_grad():
        ref = hf(IDS[None]).logits[0]
    _close(_logits(q4.model), ref)
    # decoding several sequences through the engine routes each token to its own experts
    engine = Engine(q4.model, max_batch=3, max_seq_len=64)
    prompts = [[5, 9, 33], [100, 7], [42, 42, 42, 1]]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    together = [r.token_ids for r in engine.generate_batch(prompts, greedy)]
    assert together == [engine.generate_batch([p], greedy)[0].token_ids for p in prompts]


def test_mixtral_experts_quantised_round_to_nearest(tmp_path, tiny_models):
    _, path = tiny_models["mixtral"]
    q4 = load_model(path, tokenizer=False, max_seq_len=64, weights="int4").model
    ref = load_model(path, tokenizer=False, max_seq_len=64, weights="dense").model
    assert isinstance(q4.w.layers[0].mlp.w13, Int4Experts) and q4.w.layers[0].mlp.w13.shape == (4, 192, 64)

    def rtn(w: torch.Tensor) -> torch.Tensor:
        return quantize_rtn(w).dequantize()

    # the reference: the dense model with every 4-bit weight replaced by its dequantised value
    for layer in ref.w.layers:
        layer.attn.qkv, layer.attn.o = rtn(layer.attn.qkv), rtn(layer.attn.o)
        m = layer.mlp
        m.w13 = torch.stack([rtn(w) for w in m.w13])
        m.w2 = torch.stack([rtn(w) for w in m.w2])
    ref.w.lm_head = rtn(ref.w.lm_head)
    _experts_match(q4, ref)
    _close(_logits(q4), _logits(ref))
