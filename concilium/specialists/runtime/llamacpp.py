"""llama.cpp as a CPU backend for GGUF files (`options: {backend: llama.cpp}`, `serve-model
--backend llama.cpp`; needs `llama-cpp-python`).

The engine keeps everything that is ours (scheduling and continuous batching, sampling, JSON mode,
stop strings, log-probs, streaming, the OpenAI adapter) and llama.cpp only runs the forward pass:
`LlamaCppModel` is a drop-in for `Model` whose `forward(batch)` hands the batch's tokens to
`llama_decode`, one llama.cpp sequence per cache slot, and returns the logits rows the engine asked
for. It decodes one sequence faster than the torch runtime on CPU, but its 8-bit activation rounding
changes a small model's answers, so it is not the default: docs/local-runtime.md has the numbers.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concilium.specialists.runtime.config import ModelConfig
from concilium.specialists.runtime.kv_cache import Slots
from concilium.specialists.runtime.loader import LoadError
from concilium.specialists.runtime.model import ForwardBatch

INSTALL_HINT = "install llama-cpp-python (pip install 'concilium[cpu]'; it builds from source, a few minutes)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass(frozen=True)
class _Backend:
    name: str = "llama.cpp"


class LlamaCppSlots(Slots):
    """Cache slots whose keys and values live in llama.cpp's memory: slot i is llama.cpp sequence i,
    and releasing a slot drops that sequence's cells."""

    def __init__(self, model: LlamaCppModel, max_slots: int, max_seq_len: int) -> None:
        super().__init__(max_slots, max_seq_len)
        self._model = model
        self.nbytes = model.kv_bytes

    def release(self, slot: int) -> None:
        super().release(slot)
        self._model.drop_sequence(slot)


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp, with the interface the engine uses from `Model`."""

    device = torch.device("cpu")
    dtype = torch.float32
    ops = _Backend()

    def __init__(
        self, path: Path, cfg: ModelConfig, *, max_batch: int, max_seq_len: int, threads: int | None = None
    ) -> None:
        if not available():
            raise LoadError(f"backend llama.cpp: {INSTALL_HINT}")
        import llama_cpp as lc

        quiet = logging.getLogger("llama-cpp-python")  # llama.cpp's own log; it prints INFO lines by default
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        self._lc = lc
        self.cfg = cfg
        self.path = Path(path)
        self.max_positions = max_seq_len
        self.threads = threads or default_threads()
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self._model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise LoadError(f"llama.cpp could not load {path}")
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        if n_vocab != cfg.vocab_size:
            raise LoadError(f"{path}: llama.cpp reads {n_vocab} tokens, the GGUF metadata {cfg.vocab_size}")
        cparams = lc.llama_context_default_params()
        cparams.n_seq_max = max_batch
        cparams.n_ctx = max_batch * max_seq_len  # split evenly: each sequence gets max_seq_len cells
        self.n_batch = min(cparams.n_batch, cparams.n_ctx)
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(cparams.n_ubatch, self.n_batch)
        cparams.n_threads = cparams.n_threads_batch = self.threads
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise LoadError(f"llama.cpp could not create a context for {path} ({max_batch} x {max_seq_len} tokens)")
        self._memory = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        # Every token belongs to one sequence; the per-token sequence-id arrays are filled per call.
        ones = np.ones(self.n_batch, dtype=np.int32)
        ctypes.memmove(self._batch.n_seq_id, ones.ctypes.data, ones.nbytes)
        # f16 keys and values (llama.cpp's default cache type).
        self.kv_bytes = 2 * cfg.num_layers * cparams.n_ctx * cfg.num_kv_heads * cfg.head_dim * 2

    # -- what the engine calls ---------------------------------------------------------------

    def new_cache(self, max_slots: int, max_seq_len: int) -> LlamaCppSlots:
        n_seq = self._lc.llama_n_seq_max(self._ctx)
        if max_slots > n_seq:
            raise ValueError(f"the llama.cpp context holds {n_seq} sequences, not {max_slots}")
        return LlamaCppSlots(self, max_slots, max_seq_len)

    def drop_sequence(self, seq: int) -> None:
        self._lc.llama_memory_seq_rm(self._memory, seq, -1, -1)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: Slots | None = None) -> torch.Tensor:
        """fp32 logits [rows, vocab] for the rows in `batch.logits_index` (all rows when None)."""
        tokens = batch.input_ids.to(torch.int32).numpy()
        positions = batch.positions.to(torch.int32).numpy()
        seqs = batch.token_slots.to(torch.int32).numpy()
        want = np.zeros(len(tokens), dtype=np.int8)
        want[batch.logits_index.numpy() if batch.logits_index is not None else slice(None)] = 1
        if batch.kind == "prefill":  # a prefill starts its sequence at position 0
            for s in {int(x) for x in seqs}:
                self.drop_sequence(s)
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            end = min(start + self.n_batch, len(tokens))
            n_out = int(want[start:end].sum())
            self._decode(tokens[start:end], positions[start:end], seqs[start:end], want[start:end])
            if n_out:
                out = np.ctypeslib.as_array(self._lc.llama_get_logits(self._ctx), shape=(n_out, self.cfg.vocab_size))
                rows.append(torch.from_numpy(out.copy()))
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    __call__ = forward

    def _decode(self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray, want: np.ndarray) -> None:
        b, n = self._batch, len(tokens)
        b.n_tokens = n
        ctypes.memmove(b.token, np.ascontiguousarray(tokens).ctypes.data, 4 * n)
        ctypes.memmove(b.pos, np.ascontiguousarray(positions).ctypes.data, 4 * n)
        ctypes.memmove(b.logits, np.ascontiguousarray(want).ctypes.data, n)
        for i, s in enumerate(seqs.tolist()):
            b.seq_id[i][0] = s
        rc = self._lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}: {'no KV-cache room' if rc == 1 else 'error'})")

    def expert_load(self) -> dict[int, list[int]]:
        return {}  # llama.cpp does not report expert routing

    def describe(self) -> dict[str, Any]:
        return {"arch": self.cfg.arch, "dtype": "gguf blocks", "device": "cpu", "ops": "llama.cpp",
                "threads": self.threads}

    def close(self) -> None:
        lc = self._lc
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


def default_threads() -> int:
    """Threads for llama.cpp when the policy sets none: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
