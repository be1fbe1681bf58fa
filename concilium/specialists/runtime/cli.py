"""`concilium serve-model`: run one local model as an OpenAI-compatible server."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "serve-model",
        help="serve a local model (HF checkpoint dir or GGUF file) as an OpenAI-compatible API",
        description="Load a Llama / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE checkpoint directory or a GGUF file "
        "and serve /v1/chat/completions with continuous batching.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file, or a built-in name")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", default=None, help="model id reported to clients")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="context per sequence (default min(model, 4096))"
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--weights",
        choices=["dense", "int4"],
        default="dense",
        help="int4: 4-bit weight-only projections on CPU (GGUF Q4_0/Q4_1/Q8_0 blocks kept as stored)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "llama.cpp"],
        default="torch",
        help="llama.cpp: run a GGUF file's forward pass with llama.cpp on CPU (needs llama-cpp-python)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch or llama.cpp (default: the usable cores)"
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--default-max-tokens", type=int, default=512)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import torch
    import uvicorn

    from concilium.specialists.runtime.engine import Engine
    from concilium.specialists.runtime.loader import LoadError, load_model, resolve_model_path
    from concilium.specialists.runtime.memory import InsufficientMemoryError
    from concilium.specialists.runtime.server import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("concilium.serve-model")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        path = resolve_model_path(args.model)
        loaded = load_model(
            path,
            dtype=args.dtype,
            device=device,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            weights=args.weights,
            backend=args.backend,
            threads=args.threads,
        )
    except (LoadError, InsufficientMemoryError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("loaded %s in %.1fs: %s", path, loaded.load_seconds, loaded.plan.summary())
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len or loaded.model.max_positions,
        cuda_graphs=False if args.no_cuda_graphs else None,
    )
    name = args.served_model_name or (path.stem if path.is_file() else path.name)
    app = create_app(engine, name, default_max_tokens=args.default_max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
