"""Run by test_kernels_interpreted.py in a fresh process with CONCILIUM_KERNELS=triton and
TRITON_INTERPRET=1: the runtime's model with every hot op executed by the Triton kernels (through
the interpreter on CPU), compared with transformers. Prints one JSON line of max errors."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from concilium.specialists.runtime.kv_cache import KVCache
from concilium.specialists.runtime.loader import load_model
from concilium.specialists.runtime.model import ForwardBatch
from tests.specialists.runtime import tiny


def main() -> None:
    errors: dict[str, float] = {}
    for arch in sys.argv[1:]:
        d = Path(tempfile.mkdtemp())
        hf = tiny.build(arch, d)
        model = load_model(d, tokenizer=False, max_batch=2, max_seq_len=64, ops_backend="kernels").model
        gen = torch.Generator().manual_seed(3)
        a = torch.randint(0, hf.config.vocab_size, (10,), generator=gen)
        b = torch.randint(0, hf.config.vocab_size, (7,), generator=gen)
        with torch.no_grad():
            ref_a, ref_b = hf(a[None]).logits[0], hf(b[None]).logits[0]
        c = model.cfg
        cache = KVCache(c.num_layers, 3, c.num_kv_heads, 64, c.head_dim, model.dtype, model.device)
        worst = 0.0
        with torch.inference_mode():
            # two sequences prefilled together, then decoded together at different lengths
            out = model(
                ForwardBatch.for_prefill([(a[:8].tolist(), 2), (b[:5].tolist(), 0)], model.device), cache
            )
            worst = max(worst, (out[0] - ref_a[7]).abs().max().item(), (out[1] - ref_b[4]).abs().max().item())
            for step in range(2):
                out = model(
                    ForwardBatch.for_decode(
                        [int(a[8 + step]), int(b[5 + step])], [2, 0], [8 + step, 5 + step], model.device
                    ),
                    cache,
                )
                worst = max(
                    worst,
                    (out[0] - ref_a[8 + step]).abs().max().item(),
                    (out[1] - ref_b[5 + step]).abs().max().item(),
                )
        errors[arch] = worst
    print(json.dumps({"ops": model.ops.name, "errors": errors}))


if __name__ == "__main__":
    main()
