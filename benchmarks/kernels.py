"""Benchmark the Triton kernels against their torch references, eager and under torch.compile (GPU).

For each op at the expert / attention shapes of Qwen3-30B-A3B and Mixtral-8x7B, batch 1, 4, 16,
64 and 256: the median time of the Triton kernel, of the torch reference in eager mode and of
`torch.compile` of that reference; achieved GB/s and TFLOP/s; and those as fractions of two
ceilings measured in the same run (a large device-to-device copy, a large bf16 matmul).

    python benchmarks/kernels.py                  # everything (a few minutes on an H100)
    python benchmarks/kernels.py --ops fused_moe --batches 1 4 16
    python benchmarks/kernels.py --tune           # measure block configs, add a table for this GPU

How it is timed. Each implementation is timed as a CUDA graph of many unrolled calls when it can
be captured (triton.testing.do_bench_cudagraph: GPU time, no host launch overhead; this is how
the runtime runs decode steps), otherwise (the references that read device values on the host)
with CUDA events per call (triton.testing.do_bench). The method is recorded beside each number;
the Triton path is also timed with events ("launch"), host overhead included. Inputs rotate
through enough copies that every call reads its weights and caches from HBM, not from L2, as
each layer of a real model does. Bytes count what an op must move: for the MoE only the experts
its tokens touch.

Targets (issue: kernels): fused MoE at decode (batch 1-16) >= 70% of copy bandwidth and >= 2x
the eager reference; every kernel at least as fast as torch.compile of its reference at decode
shapes. The table marks each.

Writes benchmarks/results/kernels-<device>.json. Needs a CUDA device: elsewhere it says so and
exits (the kernels' correctness is tested on CPU by `pytest tests/kernels`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, git_commit, machine_info, versions, write_json

MODELS = {
    "qwen3-30b-a3b": {"H": 2048, "I": 768, "E": 128, "k": 8, "Hq": 32, "Hk": 4, "D": 128},
    "mixtral-8x7b": {"H": 4096, "I": 14336, "E": 8, "k": 2, "Hq": 32, "Hk": 8, "D": 128},
}
BATCHES = [1, 4, 16, 64, 256]
DECODE_BATCHES = {1, 4, 16}
CONTEXT = 4096  # decode attention: every sequence holds this many cached positions
OPS = ["router_topk", "moe_align", "fused_moe", "rmsnorm", "add_rmsnorm", "rope_kv_write", "decode_attention"]
DTYPE = torch.bfloat16


@dataclass
class Case:
    """One op at one shape: how to make inputs, the implementations, and what a call must move."""

    op: str
    model: str
    batch: int
    make: Callable[[], tuple]  # one fresh set of inputs
    bytes_moved: float
    flops: float = 0.0
    graphable_reference: bool = True  # the torch reference never reads device values on the host
    notes: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- timing


def measure(fn: Callable[[], Any], graphable: bool) -> tuple[float, str]:
    """(median microseconds, method)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graphable:
        try:
            return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3, "cuda-graph"
        except Exception as exc:  # a sync inside the call: fall back to events
            torch.cuda.synchronize()
            print(f"    (no CUDA graph: {type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3, "events"


def rotating(fn: Callable[..., Any], inputs: list[tuple]) -> Callable[[], Any]:
    """A call that takes the next input set each time (also while a CUDA graph is captured)."""
    cycle = itertools.cycle(inputs)
    return lambda: fn(*next(cycle))


def copies_needed(case: Case, l2_bytes: int, budget_bytes: float, per_copy_bytes: float) -> int:
    """Input copies so that a pass over them is 3x the L2 cache, within the memory budget."""
    wanted = math.ceil(3 * l2_bytes / max(case.bytes_moved, 1))
    affordable = max(1, int(budget_bytes // max(per_copy_bytes, 1)))
    return max(1, min(wanted, affordable, 64))


def tensor_bytes(args: tuple) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def ceilings() -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul throughput (TFLOP/s) of this device."""
    return {"copy_GBps": _copy_bandwidth(), "bf16_matmul_TFLOPs": _matmul_throughput()}


def _copy_bandwidth(size: int = 2**30) -> float:
    from triton.testing import do_bench

    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * size / (ms * 1e-3) / 1e9


def _matmul_throughput(n: int = 8192) -> float:
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------- cases


def routing(T: int, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from concilium.kernels.router_topk import router_topk_torch

    return router_topk_torch(torch.randn(T, E, device="cuda"), k)


def cases_for(op: str, model: str, T: int) -> Case:
    m = MODELS[model]
    H, inter, E, k, Hq, Hk, D = m["H"], m["I"], m["E"], m["k"], m["Hq"], m["Hk"], m["D"]
    elt = torch.finfo(DTYPE).bits // 8
    if op == "router_topk":
        return Case(
            op, model, T, lambda: (torch.randn(T, E, device="cuda", dtype=DTYPE), k), T * E * elt + T * k * 8
        )
    if op == "moe_align":
        ids = routing(T, E, k)[1]
        return Case(op, model, T, lambda: (ids.clone(), E, 16), T * k * 4 * 3, graphable_reference=False)
    if op == "fused_moe":
        weights, ids = routing(T, E, k)
        touched = int(torch.unique(ids).numel())

        def make() -> tuple:
            x = torch.randn(T, H, device="cuda", dtype=DTYPE)
            w13 = (torch.randn(E, 2 * inter, H, device="cuda", dtype=DTYPE) * H**-0.5).contiguous()
            w2 = (torch.randn(E, H, inter, device="cuda", dtype=DTYPE) * inter**-0.5).contiguous()
            return x, w13, w2, weights, ids

        return Case(
            op, model, T, make,
            bytes_moved=touched * 3 * inter * H * elt + 2 * T * H * elt + T * k * 8,
            flops=2 * T * k * 3 * inter * H, graphable_reference=False, notes={"experts_touched": touched},
        )  # fmt: skip
    if op == "rmsnorm":
        return Case(
            op, model, T,
            lambda: (torch.randn(T, H, device="cuda", dtype=DTYPE), torch.randn(H, device="cuda", dtype=DTYPE), 1e-6),
            2 * T * H * elt + H * elt,
        )  # fmt: skip
    if op == "add_rmsnorm":
        return Case(
            op, model, T,
            lambda: (
                torch.randn(T, H, device="cuda", dtype=DTYPE), torch.randn(T, H, device="cuda", dtype=DTYPE),
                torch.randn(H, device="cuda", dtype=DTYPE), 1e-6,
            ),
            4 * T * H * elt + H * elt,
        )  # fmt: skip
    if op == "rope_kv_write":
        slots_n, cache_len = max(T, 1), 512  # where the rows land does not change the cost
        angles = torch.arange(CONTEXT, device="cuda")[:, None] / (
            1e6 ** (torch.arange(0, D, 2, device="cuda") / D)
        )
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

        def make() -> tuple:
            q, kk, v = (torch.randn(T, h, D, device="cuda", dtype=DTYPE) for h in (Hq, Hk, Hk))
            cache = lambda: torch.zeros(slots_n, Hk, cache_len, D, device="cuda", dtype=DTYPE)  # noqa: E731
            positions = torch.randint(0, cache_len, (T,), device="cuda")
            return q, kk, v, cos, sin, positions, cache(), cache(), torch.arange(T, device="cuda")

        moved = T * (Hq + 2 * Hk) * D * elt + T * (Hq + Hk) * D * elt + 2 * T * Hk * D * elt + 2 * T * D * 4
        return Case(op, model, T, make, moved)
    if op == "decode_attention":

        def make() -> tuple:
            q = torch.randn(T, Hq, D, device="cuda", dtype=DTYPE)
            k_cache = torch.randn(T, Hk, CONTEXT, D, device="cuda", dtype=DTYPE)
            v_cache = torch.randn(T, Hk, CONTEXT, D, device="cuda", dtype=DTYPE)
            lens = torch.full((T,), CONTEXT, device="cuda", dtype=torch.int32)
            return q, k_cache, v_cache, torch.arange(T, device="cuda"), lens, D**-0.5, CONTEXT

        moved = 2 * T * Hk * CONTEXT * D * elt + 2 * T * Hq * D * elt
        return Case(op, model, T, make, moved, flops=4 * T * Hq * CONTEXT * D)
    raise ValueError(op)


def implementations(op: str) -> dict[str, Callable[..., Any]]:
    module = {
        "router_topk": "router_topk",
        "moe_align": "moe_align",
        "fused_moe": "fused_moe",
        "rmsnorm": "rmsnorm",
        "add_rmsnorm": "rmsnorm",
        "rope_kv_write": "rope",
        "decode_attention": "decode_attention",
    }[op]
    mod = __import__(f"concilium.kernels.{module}", fromlist=["_"])
    return {"triton": getattr(mod, f"{op}_triton"), "eager": getattr(mod, f"{op}_torch")}


# ---------------------------------------------------------------- running


def run_case(case: Case, ceil: dict[str, float], l2_bytes: int, budget: float) -> dict[str, Any]:
    impls = implementations(case.op)
    first = case.make()
    copies = copies_needed(case, l2_bytes, budget, tensor_bytes(first))
    inputs = [first] + [case.make() for _ in range(copies - 1)]
    compiled = torch.compile(impls["eager"])
    row: dict[str, Any] = {
        "op": case.op, "model": case.model, "batch": case.batch, "dtype": str(DTYPE).removeprefix("torch."),
        "bytes": case.bytes_moved, "flops": case.flops, "input_copies": copies, **case.notes,
    }  # fmt: skip
    for name, fn, graphable in (
        ("triton", impls["triton"], True),
        ("eager", impls["eager"], case.graphable_reference),
        ("compile", compiled, case.graphable_reference),
    ):
        try:
            call = rotating(fn, inputs)
            call()  # compile / autotune outside the timing
            torch.cuda.synchronize()
            us, method = measure(call, graphable)
        except Exception as exc:  # record and go on: one failing variant must not lose the run
            torch.cuda.synchronize()
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"    {name} failed: {row[f'{name}_error']}", file=sys.stderr)
            continue
        row[f"{name}_us"], row[f"{name}_method"] = us, method
    if "triton_us" in row:
        row["triton_launch_us"] = measure(rotating(impls["triton"], inputs), graphable=False)[0]
        seconds = row["triton_us"] * 1e-6
        row["GBps"] = case.bytes_moved / seconds / 1e9
        row["pct_copy_bw"] = 100 * row["GBps"] / ceil["copy_GBps"]
        if case.flops:
            row["TFLOPs"] = case.flops / seconds / 1e12
            row["pct_matmul"] = 100 * row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
        for ref in ("eager", "compile"):
            if f"{ref}_us" in row:
                row[f"speedup_vs_{ref}"] = row[f"{ref}_us"] / row["triton_us"]
    row.update(targets(row))
    del inputs, first
    torch.cuda.empty_cache()
    return row


def targets(row: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets that apply to this row: name -> met (bool)."""
    out: dict[str, Any] = {}
    decode = row["batch"] in DECODE_BATCHES
    if row["op"] == "fused_moe" and decode and "pct_copy_bw" in row:
        out["target_70pct_copy_bw"] = row["pct_copy_bw"] >= 70.0
        if "speedup_vs_eager" in row:
            out["target_2x_eager"] = row["speedup_vs_eager"] >= 2.0
    if decode and "speedup_vs_compile" in row:
        out["target_not_slower_than_compile"] = row["speedup_vs_compile"] >= 1.0
    return out


def print_table(rows: list[dict[str, Any]], ceil: dict[str, float]) -> None:
    print(
        f"\nceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s"
    )
    head = (
        f"{'op':<17}{'model':<15}{'T':>5}{'triton us':>11}{'launch us':>11}{'eager us':>11}{'compile us':>12}"
        f"{'GB/s':>8}{'%copy':>7}{'TFLOP/s':>9}{'%mm':>6}{'x eager':>9}{'x compile':>10}  targets"
    )
    print(head)
    print("-" * len(head))

    def num(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None:
            return "err" if key.endswith("_us") and f"{key[:-3]}_error" in row else "-"
        text = format(value, fmt)
        method = row.get(f"{key[:-3]}_method") if key.endswith("_us") else None
        return text + ("*" if method == "events" else "")

    for r in rows:
        met = [
            k.removeprefix("target_") + ("=ok" if v else "=MISS")
            for k, v in r.items()
            if k.startswith("target_")
        ]
        print(
            f"{r['op']:<17}{r['model']:<15}{r['batch']:>5}{num(r, 'triton_us', '.1f'):>11}"
            f"{num(r, 'triton_launch_us', '.1f'):>11}{num(r, 'eager_us', '.1f'):>11}{num(r, 'compile_us', '.1f'):>12}"
            f"{num(r, 'GBps', '.0f'):>8}{num(r, 'pct_copy_bw', '.0f'):>7}{num(r, 'TFLOPs', '.1f'):>9}"
            f"{num(r, 'pct_matmul', '.0f'):>6}{num(r, 'speedup_vs_eager', '.2f'):>9}{num(r, 'speedup_vs_compile', '.2f'):>10}"
            f"  {' '.join(met)}"
        )
    print("times: median; * = CUDA events per call (not capturable in a CUDA graph), else CUDA-graph replay")


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------- tuning


TUNE_SPACE = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [32, 64, 128],
    "DOWN_BLOCK_N": [64, 128],
    "BLOCK_K": [64, 128],
    "num_warps": [4, 8],
    "num_stages": [3, 4],
}


def tune_fused_moe(
    models: list[str], batches: list[int], l2_bytes: int, budget: float
) -> list[dict[str, Any]]:
    """Time every configuration of TUNE_SPACE per model and batch; one table per model for this GPU."""
    from concilium.kernels.fused_moe import fused_moe_torch, fused_moe_triton

    device = torch.cuda.get_device_name()
    tables = []
    for model in models:
        m = MODELS[model]
        bounds: dict[str, dict[str, int]] = {}
        for T in batches:
            case = cases_for("fused_moe", model, T)
            first = case.make()
            copies = copies_needed(case, l2_bytes, budget, tensor_bytes(first))
            inputs = [first] + [case.make() for _ in range(copies - 1)]
            expected = fused_moe_torch(*first)
            best: tuple[float, dict[str, int]] | None = None
            keys = list(TUNE_SPACE)
            for values in itertools.product(*(TUNE_SPACE[k] for k in keys)):
                cfg = dict(zip(keys, values, strict=True))
                if cfg["BLOCK_M"] > max(16, 2 * T * m["k"]):  # larger blocks than tokens only pad
                    continue
                try:
                    got = fused_moe_triton(*first, config=cfg)
                    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
                    if not err < 1e-2:
                        print(
                            f"  {model} T={T} {cfg}: wrong result (relative error {err:.3g})", file=sys.stderr
                        )
                        continue
                    us, _ = measure(rotating(lambda *a, c=cfg: fused_moe_triton(*a, config=c), inputs), True)
                except Exception as exc:  # e.g. out of shared memory for this block shape
                    torch.cuda.synchronize()
                    print(f"  {model} T={T} {cfg}: {type(exc).__name__}", file=sys.stderr)
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg)
            if best:
                print(f"  {model} T={T}: {best[0]:.1f} us with {best[1]}")
                bounds[str(T)] = best[1]
            del inputs, first
            torch.cuda.empty_cache()
        tables.append(
            {"device": device, "dtype": str(DTYPE).removeprefix("torch."),
             "shape": {"E": m["E"], "H": m["H"], "I": m["I"]}, "configs": bounds}
        )  # fmt: skip
    return tables


def save_tables(op: str, tables: list[dict[str, Any]], path: Path | None = None) -> Path:
    """Merge tuned configs into configs/<op>.json: same device, dtype and shape -> same table."""
    from concilium.kernels import configs

    path = path or configs.CONFIG_DIR / f"{op}.json"
    doc = json.loads(path.read_text())

    def key(t: dict[str, Any]) -> tuple:
        return t.get("device", "*"), t.get("dtype", "*"), tuple(sorted(t.get("shape", {}).items()))

    existing = {key(t): t for t in doc["tables"]}
    for table in tables:
        if not table["configs"]:
            continue
        if key(table) in existing:
            merged = existing[key(table)]["configs"] | table["configs"]
            existing[key(table)]["configs"] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
        else:
            doc["tables"].append(table)
            existing[key(table)] = table
    path.write_text(json.dumps(doc, indent=2) + "\n")
    configs.load_tables.cache_clear()
    configs.load_tables(op, path)  # still valid
    return path


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/kernels-<device>.json)"
    )
    parser.add_argument(
        "--tune", action="store_true", help="tune fused_moe block configs for this GPU and save them"
    )
    parser.add_argument(
        "--memory-fraction", type=float, default=0.5, help="of free GPU memory for input copies"
    )
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py measures the Triton kernels on a CUDA GPU, and this machine has none "
            "(torch.cuda.is_available() is False). Nothing was measured. The kernels' correctness runs on "
            "CPU: pytest tests/kernels",
            file=sys.stderr,
        )
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py needs triton (pip install -c constraints.txt triton)", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    budget = torch.cuda.mem_get_info()[0] * args.memory_fraction
    name = torch.cuda.get_device_name()

    if args.tune:
        tables = tune_fused_moe(args.models, args.batches, l2_bytes, budget)
        print(f"saved to {save_tables('fused_moe', tables)}")
        return 0

    started = time.time()
    ceil = ceilings()
    print(f"{name}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    rows = []
    for op in args.ops:
        for model in args.models:
            for T in args.batches:
                print(f"  {op} {model} T={T}", file=sys.stderr, flush=True)
                rows.append(run_case(cases_for(op, model, T), ceil, l2_bytes, budget))
    print_table(rows, ceil)
    result = {
        "benchmark": "kernels",
        "device": name,
        "device_properties": {
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": l2_bytes,
        },
        "ceilings": ceil,
        "dtype": str(DTYPE).removeprefix("torch."),
        "context_for_attention": CONTEXT,
        "rows": rows,
        "versions": versions(["torch", "triton"]) | {"cuda": torch.version.cuda},
        "machine": machine_info(),
        "git_commit": git_commit(),
        "seconds": round(time.time() - started, 1),
        "method": "median; CUDA-graph replay where capturable, else CUDA events per call; inputs rotated past L2",
    }
    out = args.out or RESULTS_DIR / f"kernels-{device_slug(name)}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
