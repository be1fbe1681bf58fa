"""The preallocated key/value cache and its slot allocator.

Per layer the cache is `[max_batch_slots, n_kv_heads, max_seq_len, head_dim]` (the layout the
kernels expect). A running sequence owns one slot for its lifetime; the lowest free slot is handed
out first so that a full batch usually occupies a consecutive range (cheaper to read on CPU).
"""

from __future__ import annotations

import heapq

import torch


class CacheFullError(RuntimeError):
    """No free slot (the batch is full)."""


class Slots:
    """The slot allocator: which cache slots are free and how many tokens each one holds."""

    def __init__(self, max_slots: int, max_seq_len: int) -> None:
        if max_slots <= 0 or max_seq_len <= 0:
            raise ValueError("max_slots and max_seq_len must be positive")
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self._free: list[int] = list(range(max_slots))
        heapq.heapify(self._free)
        self.lengths = [0] * max_slots  # tokens held per slot (host-side bookkeeping)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("no free KV-cache slot")
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def reserve(self, slot: int) -> None:
        """Take `slot` out of circulation for good (e.g. as the target of padding rows)."""
        self._free.remove(slot)
        heapq.heapify(self._free)

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def usage(self) -> dict[str, float]:
        """Cache occupancy for metrics: tokens held against capacity, slots in use."""
        used_tokens = sum(self.lengths)
        capacity = self.max_slots * self.max_seq_len
        return {
            "slots_used": self.max_slots - len(self._free),
            "slots_total": self.max_slots,
            "tokens_used": used_tokens,
            "tokens_capacity": capacity,
            "fraction_used": used_tokens / capacity,
        }


class KVCache(Slots):
    """Slots with their keys and values in preallocated tensors (the torch runtime's cache)."""

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(max_slots, max_seq_len)
        shape = (num_layers, max_slots, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(
        num_layers: int,
        max_slots: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * max_slots * num_kv_heads * max_seq_len * head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]
