"""Compile the kernels for a CUDA architecture on a machine without a GPU.

The interpreter proves what the kernels compute, not that Triton's GPU compiler accepts them,
nor what they cost in shared memory and registers. Here each launcher runs on small stand-in
CPU tensors with its kernels replaced by recorders; every recorded launch (argument types,
constexprs, warps, stages: exactly what the launcher would send) is then compiled to a cubin
for the target with the ptxas that ships with Triton, and the cubin's resources are read back
with the bundled cuobjdump.

    python -m concilium.kernels.aot --arch 90            # every configuration in the tables
    python -m concilium.kernels.aot --arch 80 --ops fused_moe

Shared memory is checked against the architecture's per-block limit (a configuration above it
would fail to launch); local memory in the report means register spills.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Largest dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {
    75: 65536,
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    120: 101376,
}


@dataclass
class Launch:
    kernel: Any  # the JITFunction
    args: tuple
    kwargs: dict[str, Any]


@dataclass
class Compiled:
    name: str
    constexprs: dict[str, Any]
    options: dict[str, int]
    shared: int
    registers: int | None
    local: int | None
    seconds: float


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recording(module_names: list[str]) -> Iterator[list[Launch]]:
    """Replace every kernel of the named op modules by a recorder, and let launchers run on CPU."""
    from triton.runtime.jit import JITFunction

    sink: list[Launch] = []
    saved: list[tuple[Any, str, Any]] = []
    for name in module_names:
        module = importlib.import_module(f"concilium.kernels.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction):
                saved.append((module, attr, value))
                setattr(module, attr, _Recorder(value, sink))
        if hasattr(module, "check_launch"):
            saved.append((module, "check_launch", module.check_launch))
            module.check_launch = lambda op, **tensors: next(iter(tensors.values())).device
    try:
        yield sink
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def signature_of(launch: Launch) -> tuple[dict[str, str], dict[str, Any], dict[str, int], dict]:
    """(signature, constexprs, options, attrs) of a recorded launch, specialised as the JIT would:
    pointers and integers divisible by 16 are marked so (alignment enables vector loads and
    software pipelining), integers equal to 1 become constants."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    values = dict(zip(names, launch.args, strict=False))
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    values |= {k: v for k, v in launch.kwargs.items() if k not in options}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", values[name]
            continue
        kind, spec = native_specialize_impl(BaseBackend, values[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, options, attrs


def compile_launch(launch: Launch, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, options, attrs = signature_of(launch)
    started = time.perf_counter()
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - started
    registers, local = _resources(compiled.asm["cubin"])
    return Compiled(
        launch.kernel.__name__, constexprs, options, compiled.metadata.shared, registers, local, seconds
    )


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local memory bytes) from `cuobjdump -res-usage`."""
    tool = (
        Path(importlib.import_module("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    )
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=60
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


# ---------------------------------------------------------------- what to compile


def _table_configs(op: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(dtype, size bound, config) for every GPU configuration in the op's tables."""
    from concilium.kernels import configs

    found = []
    for table in configs.load_tables(op):
        if table["device"] == "cpu":
            continue
        dtype = table["dtype"] if table["dtype"] != "*" else "bfloat16"
        for bound, cfg in table["bounds"].items():
            found.append((dtype, bound, cfg))
    return found


def _drive(op: str, dtype: torch.dtype, size: int, cfg: dict[str, Any]) -> None:
    """Call the op's launcher(s) once with stand-in tensors of the size a configuration is for."""
    f = {"dtype": dtype}
    if op == "router_topk":  # size: experts
        from concilium.kernels.router_topk import router_topk_triton

        router_topk_triton(torch.zeros(4, size, **f), min(8, size), config=cfg)
    elif op == "moe_align":  # size: experts (a power of two)
        from concilium.kernels.moe_align import moe_align_triton

        k = min(8, size)
        for n in (k, 8192):  # the single-program path and the three-kernel path
            moe_align_triton(torch.zeros(n // k, k, dtype=torch.int32), size, 16, config=cfg)
    elif op == "fused_moe":  # size: tokens
        from concilium.kernels.fused_moe import fused_moe_triton

        E, H, inter, T = 8, 256, 128, min(size, 1024)
        weights, ids = torch.zeros(T, 2), torch.zeros(T, 2, dtype=torch.int32)
        w13, w2 = torch.zeros(E, 2 * inter, H, **f), torch.zeros(E, H, inter, **f)
        fused_moe_triton(torch.zeros(T, H, **f), w13, w2, weights, ids, config=cfg)
    elif op == "rmsnorm":  # size: hidden size (a power of two)
        from concilium.kernels.rmsnorm import add_rmsnorm_triton, rmsnorm_triton

        x, w = torch.zeros(4, size, **f), torch.zeros(size, **f)
        rmsnorm_triton(x, w, 1e-6, config=cfg)
        add_rmsnorm_triton(x, x, w, 1e-6, config=cfg)
    elif op == "rope_kv_write":  # size: heads
        from concilium.kernels.rope import rope_kv_write_triton

        heads = min(size, 128)
        q, k = torch.zeros(2, heads, 128, **f), torch.zeros(2, max(1, heads // 4), 128, **f)
        cache = torch.zeros(2, k.shape[1], 16, 128, **f)
        table = torch.zeros(16, 128)
        pos = torch.zeros(2, dtype=torch.long)
        rope_kv_write_triton(q, k, k, table, table, pos, cache, cache, pos, config=cfg)
    elif op == "decode_attention":  # size: context (the kernels do not depend on it)
        from concilium.kernels.decode_attention import decode_attention_triton

        q, cache = torch.zeros(2, 32, 128, **f), torch.zeros(2, 8, 4096, 128, **f)
        lens = torch.zeros(2, dtype=torch.int32)
        multi = cfg | {"MIN_PROGRAMS": 4096, "MAX_SPLITS": max(2, cfg.get("MAX_SPLITS", 2))}
        for c in (cfg | {"MAX_SPLITS": 1}, multi):  # one split (direct write) and split-K + merge
            decode_attention_triton(q, cache, cache, torch.zeros(2, dtype=torch.long), lens, 0.1, config=c)
    else:
        raise ValueError(f"unknown op {op!r}")


OPS = {
    "router_topk": ["router_topk"],
    "moe_align": ["moe_align"],
    "fused_moe": ["fused_moe", "moe_align"],
    "rmsnorm": ["rmsnorm"],
    "rope_kv_write": ["rope"],
    "decode_attention": ["decode_attention"],
}


def launches(op: str, configs_of_op: list[tuple[str, int, dict[str, Any]]]) -> list[Launch]:
    """Distinct launches (kernel, constexprs, options) the op makes over these configurations."""
    seen, unique = set(), []
    for dtype_name, size, cfg in configs_of_op:
        with recording(OPS[op]) as sink:
            _drive(op, getattr(torch, dtype_name), size, cfg)
        for launch in sink:
            sig, const, opts, _ = signature_of(launch)
            key = (
                launch.kernel.__name__,
                tuple(sorted(sig.items())),
                repr(sorted(const.items())),
                tuple(sorted(opts.items())),
            )
            if key not in seen:
                seen.add(key)
                unique.append(launch)
    return unique


def check(ops: list[str], arch: int, first_only: bool = False) -> list[tuple[str, Compiled | str]]:
    """Compile every launch; returns (op, result or error message). Needs TRITON_INTERPRET unset."""
    results: list[tuple[str, Compiled | str]] = []
    for op in ops:
        table = _table_configs(op)
        for launch in launches(op, table[:1] if first_only else table):
            try:
                results.append((op, compile_launch(launch, arch)))
            except Exception as exc:  # report every failure, not only the first
                results.append((op, f"{launch.kernel.__name__}: {type(exc).__name__}: {str(exc)[:300]}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the kernels for a CUDA architecture, no GPU needed")
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability x10, e.g. 80 (A100), 90 (H100)"
    )
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--first-only", action="store_true", help="only each op's first table configuration")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the GPU compiler", file=sys.stderr)
        return 2
    limit = SHARED_LIMIT.get(args.arch)
    failures = 0
    print(f"{'op':<17}{'kernel':<24}{'smem KB':>8}{'regs':>6}{'local':>7}{'s':>6}  constexprs / options")
    for op, result in check(args.ops, args.arch, args.first_only):
        if isinstance(result, str):
            failures += 1
            print(f"{op:<17}FAILED {result}")
            continue
        over = limit is not None and result.shared > limit
        failures += over
        consts = {
            k: v
            for k, v in result.constexprs.items()
            if k.startswith("BLOCK") or k in ("CHUNK", "NUM_SPLITS")
        }
        print(
            f"{op:<17}{result.name:<24}{result.shared / 1024:>8.1f}{result.registers or '-':>6}{result.local or 0:>7}"
            f"{result.seconds:>6.1f}  {consts} {result.options}"
            + ("  OVER THE SHARED-MEMORY LIMIT" if over else "")
        )
    print(f"sm_{args.arch}: {'all compiled' if not failures else f'{failures} problem(s)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
