"""A batch-1 decode step in one C call, for int4 dense models on CPU (`cpu_decode.c`).

On CPU the torch path spends one sequence's decode step in its int4 kernel plus ~1,000 small ops
(norms, RoPE, cache writes, attention, casts). `FusedDecode` runs the whole step in C against the
same int4 weights (`Int4Linear.rows16`, the C file's layout) and the same KV cache tensors, so a decode
step with one running sequence costs one call. Prefill and decode steps with several sequences
stay on the torch path, which is faster there (its int4 kernel is a matrix-matrix kernel).

The C file is compiled on first use with the system C compiler (`cc -O3 -march=native -fopenmp`,
about a second) into the user's cache directory, keyed by the source's hash and the machine.
Without a compiler, or on a CPU without AVX512-BF16 (where the portable loop would be slower than
torch's kernel), the model keeps the torch path; `describe()` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from concilium.specialists.runtime.config import ModelConfig
    from concilium.specialists.runtime.kv_cache import KVCache
    from concilium.specialists.runtime.model import Model

log = logging.getLogger("concilium.runtime")

SOURCE = Path(__file__).with_name("cpu_decode.c")


# --------------------------------------------------------------------------------- the library


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "concilium"


@functools.cache
def library(portable: bool = False) -> ctypes.CDLL | None:
    """The compiled step (None without a C compiler). `portable`: the plain-C loop even where
    AVX512-BF16 is available (the reference the tests compare the fast path with)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"] + (["-DCONCILIUM_PORTABLE"] if portable else [])
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags, platform.node()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_decode-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                part = Path(tmp) / out.name
                res = subprocess.run([cc, *flags, str(SOURCE), "-o", str(part), "-lm"], capture_output=True,
                                     text=True, timeout=120)
                if res.returncode != 0:
                    log.warning("cpu_decode: %s failed, the torch path decodes: %s", cc, res.stderr.strip()[-500:])
                    return None
                part.replace(out)  # atomic: concurrent first uses do not see half a file
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("cpu_decode: cannot build %s (%s), the torch path decodes", out, e)
            return None
    lib = ctypes.CDLL(str(out))
    lib.fast_path.restype = ctypes.c_int
    lib.scratch_floats.restype = ctypes.c_long
    lib.scratch_floats.argtypes = [ctypes.c_void_p]
    lib.step.restype = None
    lib.step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


def covers(cfg: ModelConfig, dtype: torch.dtype) -> bool:
    """Would a model of this shape decode with the fused step on this machine? The loader asks
    before it packs the weights a second time (`Int4Linear.rows16`), so nothing is packed for
    models (or machines) that keep the torch path."""
    dense = cfg.num_experts == 0 and not cfg.qk_norm and cfg.num_heads % cfg.num_kv_heads == 0
    lib = library() if dense and dtype == torch.float32 else None
    return lib is not None and bool(lib.fast_path())


class _Gemv(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("nplanes", ctypes.c_int32),
        ("nib", ctypes.c_void_p * 2), ("sz", ctypes.c_void_p * 2), ("bias", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("qkv", _Gemv), ("o", _Gemv), ("w13", _Gemv), ("w2", _Gemv)]


class _Net(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in ("vocab", "hidden", "inter", "layers", "heads", "kv_heads",
                                              "head_dim", "threads", "max_slots", "max_seq")),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("embed", "final_norm", "cos", "sin", "k_cache", "v_cache")),
        ("lm_head", _Gemv), ("layer", ctypes.c_void_p), ("scratch", ctypes.c_void_p), ("xb", ctypes.c_void_p),
    ]


# --------------------------------------------------------------------------------- the step


class FusedDecode:
    """Model.forward for a decode step of one sequence; build with `FusedDecode.create(model)`."""

    def __init__(self, model: Model, lib: ctypes.CDLL) -> None:
        from concilium.specialists.runtime.model import DenseMLPWeights

        cfg, w = model.cfg, model.w
        self.lib = lib
        self._keep: list[torch.Tensor] = []  # everything the C struct points at

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t.data_ptr()

        def gemv(lin, bias: torch.Tensor | None = None) -> _Gemv:  # type: ignore[no-untyped-def]
            g = _Gemv(n=lin.out_features, k=lin.in_features, nplanes=len(lin.rows16))
            for i, (nib, sz) in enumerate(lin.rows16):
                self._keep += [nib, sz]
                g.nib[i], g.sz[i] = nib.data_ptr(), sz.data_ptr()
            g.bias = ptr(bias)
            return g

        layers = (_Layer * cfg.num_layers)()
        for i, lw in enumerate(w.layers):
            assert isinstance(lw.mlp, DenseMLPWeights)
            a = lw.attn
            layers[i] = _Layer(ptr(lw.input_norm), ptr(lw.post_norm), gemv(a.qkv, a.qkv_bias), gemv(a.o, a.o_bias),
                               gemv(lw.mlp.w13), gemv(lw.mlp.w2))
        self._layers = layers
        self.net = _Net(
            vocab=cfg.vocab_size, hidden=cfg.hidden_size, inter=cfg.intermediate_size, layers=cfg.num_layers,
            heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            eps=cfg.rms_norm_eps, scale=model.scale,
            embed=ptr(w.embed), final_norm=ptr(w.final_norm), cos=ptr(model.cos), sin=ptr(model.sin),
            lm_head=gemv(w.lm_head), layer=ctypes.addressof(layers),
        )
        widest = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
        self.xb = torch.empty(widest, dtype=torch.int16)
        self.net.xb = self.xb.data_ptr()
        self._cache: KVCache | None = None

    @staticmethod
    def supports(model: Model) -> bool:
        from concilium.specialists.runtime.model import DenseMLPWeights

        cfg, w = model.cfg, model.w
        lins = [w.lm_head] + [x for lw in w.layers for x in (lw.attn.qkv, lw.attn.o, lw.mlp.w13, lw.mlp.w2)
                              if isinstance(lw.mlp, DenseMLPWeights)]
        return (
            model.device.type == "cpu"
            and model.dtype == torch.float32
            and all(isinstance(lw.mlp, DenseMLPWeights) and lw.attn.q_norm is None for lw in w.layers)
            and all(getattr(x, "rows16", None) for x in lins)
            and cfg.num_heads % cfg.num_kv_heads == 0
        )

    @classmethod
    def create(cls, model: Model, *, portable: bool = False) -> FusedDecode | None:
        """The fused step for `model`, or None where it does not apply or would not be faster."""
        if not cls.supports(model):
            return None
        lib = library(portable)
        if lib is None or not (portable or lib.fast_path()):
            return None
        return cls(model, lib)

    def _bind(self, cache: KVCache) -> None:
        _, slots, _, max_seq, _ = cache.k.shape
        if cache.k.dtype != torch.float32 or not (cache.k.is_contiguous() and cache.v.is_contiguous()):
            raise ValueError("the fused decode step needs a contiguous float32 KV cache")
        self.net.k_cache, self.net.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        self.net.max_slots, self.net.max_seq = slots, max_seq
        self.scratch = torch.empty(self.lib.scratch_floats(ctypes.byref(self.net)), dtype=torch.float32)
        self.net.scratch = self.scratch.data_ptr()
        self._cache = cache

    def __call__(self, token: int, position: int, slot: int, cache: KVCache) -> torch.Tensor:
        """fp32 logits [1, vocab] of `token` at `position` in `slot`, its keys and values cached."""
        if cache is not self._cache:
            self._bind(cache)
        self.net.threads = torch.get_num_threads()
        logits = torch.empty((1, self.net.vocab), dtype=torch.float32)
        self.lib.step(ctypes.byref(self.net), token, position, slot, logits.data_ptr())
        return logits
