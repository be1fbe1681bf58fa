"""GGUF files: metadata -> ModelConfig, tensors dequantised to float through the `gguf` package.

llama.cpp's converter interleaves the two RoPE halves of each head in the q/k projections of
Llama-architecture models (Llama, Mistral, Mixtral); they are put back in the rotate-half order
the runtime uses. Qwen architectures are stored unpermuted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from concilium.specialists.runtime.config import ModelConfig, config_from_gguf_fields
from concilium.specialists.runtime.gguf_file import GGUFFile, GGUFFormatError
from concilium.specialists.runtime.loader import LoadError
from concilium.specialists.runtime.quant import BlockWeight, from_gguf_blocks


def open_gguf(path: str | Path) -> GGUFFile:
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"GGUF file {p} does not exist")
    try:
        return GGUFFile(p)
    except (GGUFFormatError, ValueError) as e:
        raise LoadError(f"{p} is not a readable GGUF file: {e}") from None


def gguf_config(path: str | Path) -> ModelConfig:
    f = open_gguf(path)
    return config_from_gguf_fields(f.metadata, set(f.tensors))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleaving: rows (head, pair, 2) -> (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """Canonical tensor names -> dequantised GGUF tensors (float32 torch tensors on CPU)."""

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None) -> None:
        self.path = Path(path)
        self.file = open_gguf(path)
        self.meta = self.file.metadata
        self.tensors = self.file.tensors
        self.cfg = cfg or config_from_gguf_fields(self.meta, set(self.tensors))
        self._permuted = self.meta.get("general.architecture") == "llama"

    def _gguf_name(self, name: str) -> str:
        fixed = {
            "embed": "token_embd.weight",
            "final_norm": "output_norm.weight",
            "lm_head": "output.weight",
            "rope_freqs": "rope_freqs.weight",
        }
        if name in fixed:
            return fixed[name]
        _, i, rest = name.split(".", 2)
        table = {
            "input_norm": "attn_norm.weight",
            "post_norm": "ffn_norm.weight",
            "q": "attn_q.weight",
            "k": "attn_k.weight",
            "v": "attn_v.weight",
            "o": "attn_output.weight",
            "q_bias": "attn_q.bias",
            "k_bias": "attn_k.bias",
            "v_bias": "attn_v.bias",
            "o_bias": "attn_output.bias",
            "q_norm": "attn_q_norm.weight",
            "k_norm": "attn_k_norm.weight",
            "gate": "ffn_gate.weight",
            "up": "ffn_up.weight",
            "down": "ffn_down.weight",
            "router": "ffn_gate_inp.weight",
            "gate_exps": "ffn_gate_exps.weight",
            "up_exps": "ffn_up_exps.weight",
            "down_exps": "ffn_down_exps.weight",
        }
        if rest in table:
            return f"blk.{i}.{table[rest]}"
        _, e, which = rest.split(".")  # experts.{e}.{gate|up|down}: older per-expert Mixtral files
        return f"blk.{i}.ffn_{which}.{e}.weight"

    def _read(self, gname: str) -> np.ndarray:
        from gguf import dequantize

        t = self.tensors.get(gname)
        if t is None:
            raise LoadError(f"{self.path} lacks tensor {gname!r}")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise LoadError(f"{gname}: {e}") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists dimensions innermost first
        return np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)

    def has(self, name: str) -> bool:
        if name.endswith((".w13", ".w2")):
            layer = name.rsplit(".", 1)[0]
            return self.has(layer + ".down_exps") or self.has(layer + ".experts.0.down")
        return self._gguf_name(name) in self.tensors

    def get(self, name: str) -> torch.Tensor:
        if name.endswith((".w13", ".w2")):
            arr = self._experts(name)
            return torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        arr = self._read(self._gguf_name(name))
        kind = name.rsplit(".", 1)[-1]
        if self._permuted and kind in ("q", "k", "q_bias", "k_bias"):
            arr = _unpermute(arr, self.cfg.num_heads if kind.startswith("q") else self.cfg.num_kv_heads)
        return torch.from_numpy(np.array(arr, copy=True) if not arr.flags.writeable else arr)

    def matrix_types(self) -> set[str]:
        """Block types of the 2-D weights (projections and embeddings)."""
        return {t.tensor_type.name for t in self.tensors.values() if len(t.shape) == 2}

    def get_blocks(self, name: str) -> BlockWeight | None:
        """The stored 4-bit/8-bit blocks of a 2-D weight (Q4_0, Q4_1, Q8_0), or None for other types."""
        t = self.tensors.get(self._gguf_name(name))
        if t is None or len(t.shape) != 2:
            return None
        shape = (int(t.shape[1]), int(t.shape[0]))
        blocks = from_gguf_blocks(t.data, t.tensor_type.name, shape)
        kind = name.rsplit(".", 1)[-1]
        if blocks is not None and self._permuted and kind in ("q", "k"):
            n_head = self.cfg.num_heads if kind == "q" else self.cfg.num_kv_heads
            order = _unpermute(np.arange(shape[0]), n_head)
            blocks = blocks.permute_rows(torch.from_numpy(np.ascontiguousarray(order)))
        return blocks

    def get_expert_blocks(self, name: str) -> list[BlockWeight] | None:
        """Each expert's stored blocks of `layers.i.w13` (gate rows then up rows) or `layers.i.w2`;
        None when they are not Q4_0/Q4_1/Q8_0."""
        layer, which = name.rsplit(".", 1)
        parts = ["down"] if which == "w2" else ["gate", "up"]
        if self.has(layer + ".down_exps"):  # stacked [E, N, K]
            per_part = []
            for part in parts:
                t = self.tensors[self._gguf_name(f"{layer}.{part}_exps")]
                e, n, k = (int(d) for d in reversed(t.shape))
                b = from_gguf_blocks(t.data, t.tensor_type.name, (e * n, k))
                if b is None:
                    return None
                per_part.append([b.rows(i * n, (i + 1) * n) for i in range(e)])
        else:  # one tensor per expert
            per_part = [[self.get_blocks(f"{layer}.experts.{i}.{part}") for i in range(self.cfg.num_experts)]
                        for part in parts]
            if any(b is None for bs in per_part for b in bs):
                return None
        return [BlockWeight.concat(list(bs)) for bs in zip(*per_part, strict=True)]

    def _experts(self, name: str) -> np.ndarray:
        layer, which = name.rsplit(".", 1)
        if self.has(layer + ".down_exps"):  # stacked [E, I, H] / [E, H, I]
            if which == "w2":
                return self._read(self._gguf_name(layer + ".down_exps"))
            gate = self._read(self._gguf_name(layer + ".gate_exps"))
            up = self._read(self._gguf_name(layer + ".up_exps"))
            return np.concatenate([gate, up], axis=1)
        n = self.cfg.num_experts
        if which == "w2":
            return np.stack([self._read(self._gguf_name(f"{layer}.experts.{e}.down")) for e in range(n)])
        return np.stack(
            [
                np.concatenate(
                    [
                        self._read(self._gguf_name(f"{layer}.experts.{e}.gate")),
                        self._read(self._gguf_name(f"{layer}.experts.{e}.up")),
                    ]
                )
                for e in range(n)
            ]
        )
