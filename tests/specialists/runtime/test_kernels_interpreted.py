"""The runtime driving the real Triton kernels (not their torch references): in a fresh process
with CONCILIUM_KERNELS=triton and TRITON_INTERPRET=1, every hot op of a dense and a
mixture-of-experts model runs as a Triton kernel in the interpreter, and the logits of batched
prefill and decode still match transformers'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_model_through_triton_kernels_matches_transformers():
    env = {**os.environ, "CONCILIUM_KERNELS": "triton", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.specialists.runtime.interpreted_check", "llama", "qwen3_moe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ops"] == "kernels"
    assert set(result["errors"]) == {"llama", "qwen3_moe"}
    for arch, err in result["errors"].items():
        assert err < 1e-4, f"{arch}: max |logit difference| {err}"
