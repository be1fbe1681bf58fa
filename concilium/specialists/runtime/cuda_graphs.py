"""CUDA graphs for decode steps.

A decode step launches a few hundred small kernels; at batch 1 the launch overhead costs more than
the work. Each batch-size bucket (1, 2, 4, 8, ... up to max_batch) is captured once into a CUDA
graph over static input buffers, then replayed: a step is one graph launch. Rows beyond the real
batch are padding that writes to a reserved cache slot. Capture needs ops that never read device
values on the host, i.e. the Triton kernels (`ops.name == "kernels"`); if capture fails the runner
turns itself off and the engine runs decode steps eagerly.
"""

from __future__ import annotations

import logging

import torch

from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.model import ForwardBatch, Model

log = logging.getLogger(__name__)


def buckets_for(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class DecodeGraphRunner:
    def __init__(self, model: Model, cache: KVCache, max_batch: int, pad_slot: int) -> None:
        self.model = model
        self.cache = cache
        self.pad_slot = pad_slot
        self.buckets = buckets_for(max_batch)
        dev = model.device
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), pad_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: object = None
        self.disabled = False

    def can_run(self, n: int) -> bool:
        return not self.disabled and n <= self.buckets[-1]

    def batch(self, bs: int) -> ForwardBatch:
        """The decode batch over the first `bs` rows of the static buffers."""
        return ForwardBatch(
            kind="decode",
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            token_slots=self.slots[:bs],
            logits_index=None,
            slots=self.slots[:bs],
            seq_lens=self.seq_lens[:bs],
            max_len=None,  # no host-side bound: the kernel covers the whole cache
        )

    def capture(self, bs: int) -> None:
        batch = self.batch(bs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up (Triton compiles, allocator settles) outside the graph
                self.model(batch, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(batch, self.cache)
        self.pool = graph.pool()
        self.graphs[bs] = (graph, out)

    def capture_all(self) -> None:
        for bs in self.buckets:
            if bs not in self.graphs:
                self.capture(bs)

    def stage(self, tokens: list[int], slots: list[int], positions: list[int]) -> int:
        """Copy one decode step's inputs into the static buffers; returns the bucket size. Rows past
        the real batch decode token 0 at position 0 into the reserved padding slot."""
        n = len(tokens)
        bs = next(b for b in self.buckets if b >= n)
        pad = bs - n
        host = torch.tensor(
            [tokens + [0] * pad, positions + [0] * pad, slots + [self.pad_slot] * pad], dtype=torch.int64
        )
        self.input_ids[:bs].copy_(host[0], non_blocking=True)
        self.positions[:bs].copy_(host[1], non_blocking=True)
        self.slots[:bs].copy_(host[2], non_blocking=True)
        self.seq_lens[:bs].copy_(host[1] + 1, non_blocking=True)
        return bs

    def run(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits [n, vocab] of one decode step, or None when capture failed (run it eagerly)."""
        bs = self.stage(tokens, slots, positions)
        if bs not in self.graphs:
            try:
                self.capture(bs)
            except Exception as e:
                self.disabled = True
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                return None
        graph, out = self.graphs[bs]
        graph.replay()
        return out[: len(tokens)]
