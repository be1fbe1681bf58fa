"""Concilium's local model runtime: dense Llama / Qwen2 / Qwen3 and mixture-of-experts Mixtral /
Qwen3-MoE from Hugging Face safetensors directories or GGUF files, in plain torch, with the Triton
kernels (`concilium.kernels`) for the hot ops on CUDA.

Where things are:
  config.py        ModelConfig from config.json or GGUF metadata
  loader.py        safetensors (sharded, per-expert or stacked experts), building weights, load_model()
  gguf_file.py     the GGUF container; gguf_loader.py: GGUF tensors -> runtime weights
  quant.py         int4 weight-only projections for CPU (GGUF Q4_0/Q4_1/Q8_0 blocks kept as stored)
  model.py         the transformer over a flat token batch; select_ops() picks kernels or torch ops
  torch_ops.py     the hot ops in torch (CPU path); rope.py: RoPE tables
  kv_cache.py      preallocated KV cache with slot allocation
  sampling.py      sampling parameters, greedy / temperature / top-k / top-p with per-request seeds
  detokenizer.py   incremental text with stop sequences
  engine.py        continuous batching, async streaming; cuda_graphs.py: captured decode steps
  memory.py        parameter and memory accounting, refusal when a model will not fit
  tokenizer.py     tokenizer and chat template from the checkpoint
  openai_adapter.py  OpenAI requests -> engine inputs, engine events -> completions and chunks (for both
                   the gateway's `local` provider and the model server)
  server.py, cli.py  the OpenAI-compatible model server (`concilium serve-model`)

In-process use::

    from concilium.specialists.runtime.loader import load_model
    from concilium.specialists.runtime.engine import Engine
    from concilium.specialists.runtime.sampling import SamplingParams

    loaded = load_model("model.gguf", max_batch=8, max_seq_len=4096)   # checks memory first
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=8, max_seq_len=4096)
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    async for event in engine.stream(ids, SamplingParams(max_tokens=64, temperature=0)):
        print(event.text, end="")
"""
