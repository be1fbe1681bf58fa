"""Weight-only int4 linears for CPU decoding (`weights="int4"`).

Decoding one token is bound by reading the weights, so on CPU the fastest thing is to read fewer
bytes: weights stay as 4-bit values with one scale and one offset per group of 32 inputs and are
multiplied by torch's int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations). Everything
else (norms, RoPE, attention, the KV cache) stays in float32. Mixture-of-experts layers keep each
expert's projections the same way (`Int4Experts`), multiplied only for the tokens routed to it.

GGUF blocks map onto this format without re-quantising: Q4_0 and Q4_1 are one 4-bit plane each,
and Q8_0 is split exactly into two 4-bit planes (high and low nibble). Only the group scales are
rounded (fp16 -> bf16). Other sources are quantised round-to-nearest per group of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32


def int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass
class Plane:
    """w = (q - 8) * scale + zero, per group of GROUP inputs. q: [N, K] in 0..15; scale/zero: [N, K/GROUP]."""

    q: torch.Tensor  # uint8
    scale: torch.Tensor  # float32
    zero: torch.Tensor  # float32

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = (self.q.float() - 8).view(n, k // GROUP, GROUP)
        return (g * self.scale[..., None] + self.zero[..., None]).view(n, k)


@dataclass
class BlockWeight:
    """A weight as one or more 4-bit planes that sum to it."""

    planes: list[Plane]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.planes[0].q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return sum((p.dequantize() for p in self.planes[1:]), self.planes[0].dequantize())

    def rows(self, start: int, stop: int) -> BlockWeight:
        return BlockWeight([Plane(p.q[start:stop], p.scale[start:stop], p.zero[start:stop]) for p in self.planes])

    def permute_rows(self, index: torch.Tensor) -> BlockWeight:
        return BlockWeight([Plane(p.q[index], p.scale[index], p.zero[index]) for p in self.planes])

    @staticmethod
    def concat(parts: list[BlockWeight]) -> BlockWeight:
        if len(parts) == 1:
            return parts[0]
        depth = max(len(p.planes) for p in parts)
        padded = [p.planes + [_zero_plane(p.shape) for _ in range(depth - len(p.planes))] for p in parts]
        return BlockWeight(
            [
                Plane(
                    torch.cat([pp[i].q for pp in padded]),
                    torch.cat([pp[i].scale for pp in padded]),
                    torch.cat([pp[i].zero for pp in padded]),
                )
                for i in range(depth)
            ]
        )


def _zero_plane(shape: tuple[int, int]) -> Plane:
    n, k = shape
    return Plane(
        torch.full((n, k), 8, dtype=torch.uint8), torch.zeros(n, k // GROUP), torch.zeros(n, k // GROUP)
    )


def quantize_rtn(w: torch.Tensor) -> BlockWeight:
    """Round-to-nearest asymmetric 4-bit quantisation per group of 32 inputs."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = torch.round((g - lo[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return BlockWeight([Plane(q, scale, lo + 8 * scale)])


def from_gguf_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> BlockWeight | None:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks -> planes; None for other block types."""
    n, k = shape
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(n * k // GROUP, -1)
    if type_name in ("Q4_0", "Q4_1"):
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        off = 2
        if type_name == "Q4_1":
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
            off = 4
        qs = blocks[:, off : off + GROUP // 2]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # element j < 16: low nibble of byte j
        zero = m + 8 * d if type_name == "Q4_1" else np.zeros_like(d)
        return BlockWeight([_plane(q, d, zero, n, k)])
    if type_name == "Q8_0":
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        qs = blocks[:, 2 : 2 + GROUP].view(np.int8).astype(np.int16)
        low = (qs & 0x0F).astype(np.uint8)  # value = 16 * high + low
        high = ((qs >> 4) + 8).astype(np.uint8)
        return BlockWeight([_plane(low, d, 8 * d, n, k), _plane(high, 16 * d, np.zeros_like(d), n, k)])
    return None


def _plane(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, n: int, k: int) -> Plane:
    return Plane(
        torch.from_numpy(np.ascontiguousarray(q).reshape(n, k)),
        torch.from_numpy(scale.reshape(n, k // GROUP).copy()),
        torch.from_numpy(zero.reshape(n, k // GROUP).copy()),
    )


ROWS16 = 16


def pack_rows16(weight: BlockWeight) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each plane as (nibbles, bf16 scales then zeros) in blocks of 16 output rows, the layout of
    the fused CPU decode step (`cpu_decode.c`); None when the shape does not fit it."""
    n, k = weight.shape
    if n % ROWS16 or k % GROUP or len(weight.planes) > 2:
        return None
    out = []
    for p in weight.planes:
        q = p.q.numpy().reshape(n // ROWS16, ROWS16, k // GROUP, 8, 4)  # block, row, group, chunk, input
        byte = (q[..., 2:4] << 4) | q[..., 0:2]  # [block, row, group, chunk, t]: inputs 4c+t and 4c+2+t
        nib = np.ascontiguousarray(byte.transpose(0, 2, 3, 1, 4)).reshape(-1)
        sz = torch.stack([p.scale, p.zero]).to(torch.bfloat16).view(torch.int16)  # [2, n, k/32]
        sz = sz.view(2, n // ROWS16, ROWS16, k // GROUP).permute(1, 3, 0, 2).contiguous().view(-1)
        out.append((torch.from_numpy(nib), sz))
    return out


class Int4Linear:
    """y = x @ W^T with W held as packed 4-bit planes; x of any float dtype, y in x's dtype.
    `rows16`: also keep the planes in the fused decode step's layout (`pack_rows16`)."""

    def __init__(self, weight: BlockWeight, *, rows16: bool = False) -> None:
        self.out_features, self.in_features = weight.shape
        self.rows16 = pack_rows16(weight) if rows16 else None
        self._planes = []
        for p in weight.planes:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(p.q.to(torch.int32), 2)
            sz = torch.stack([p.scale.t(), p.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self._planes.append((packed, sz))

    @staticmethod
    def supports(shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[1] % GROUP == 0 and shape[0] % 8 == 0 and int4_supported()

    @property
    def nbytes(self) -> int:
        packs = self._planes + (self.rows16 or [])
        return sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in packs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        packed, sz = self._planes[0]
        y = mm(xb, packed, GROUP, sz).to(x.dtype)
        for packed, sz in self._planes[1:]:  # the high plane of 8-bit blocks
            y += mm(xb, packed, GROUP, sz)
        return y


class Int4Experts:
    """A mixture-of-experts projection [E, N, K] as one `Int4Linear` per expert; `fused_moe_torch`
    indexes it like the stacked tensor and calls each expert's planes on the rows routed to it."""

    def __init__(self, experts: list[BlockWeight]) -> None:
        self._experts = [Int4Linear(b) for b in experts]
        first = self._experts[0]
        self.shape = torch.Size((len(self._experts), first.out_features, first.in_features))

    def dim(self) -> int:
        return 3

    def __getitem__(self, e: int) -> Int4Linear:
        return self._experts[e]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self._experts)
