"""The generation engine: continuous batching over a preallocated KV cache, with an async
token-streaming API.

One engine thread owns the model. Each iteration (`step`) it
  1. drops cancelled requests (their cache slots are freed at once),
  2. admits waiting requests while cache slots are free and prefills them together,
  3. runs one decode step for every running sequence (newly admitted ones included),
  4. samples, detokenises and hands each request its new text; finished requests leave the batch.
So a request that arrives while others decode joins the running batch at the next step.

Callers use `stream()` / `generate()` from asyncio, or `generate_batch()` from plain code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from concilium.specialists.runtime.detokenizer import IncrementalDecoder
from concilium.specialists.runtime.model import ForwardBatch, Model
from concilium.specialists.runtime.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from concilium.specialists.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt does not fit in the configured context (reported to clients as a 400)."""


@dataclass
class StreamEvent:
    """What one engine step produced for one request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # With `SamplingParams.logprobs`: one entry per token of the answer (an EOS or stop token id that
    # ends generation is not part of the answer and has none).
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None


class RequestHandle:
    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.cancelled = False
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves the batch at the next step."""
        self.cancelled = True


@dataclass
class _Sequence:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[StreamEvent], None]
    decoder: IncrementalDecoder
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [V] times each token was generated (penalized requests only)
    json: Any = None  # JSON mode: the recogniser's state after the tokens so far
    slot: int = -1
    num_cached: int = 0  # tokens whose keys/values are in the cache
    generated: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    max_batch_seen: int = 0
    decode_batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


class Engine:
    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        max_prefill_tokens: int = 4096,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or min(model.cfg.max_position_embeddings, model.max_positions)
        if self.max_seq_len > model.max_positions:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} exceeds the model's RoPE table ({model.max_positions})"
            )
        self.max_prefill_tokens = max_prefill_tokens
        cfg = model.cfg
        graphs = self._want_graphs(cuda_graphs)
        # With CUDA graphs, one extra slot takes the padding rows of a captured batch.
        self.cache = model.new_cache(max_batch + (1 if graphs else 0), self.max_seq_len)
        if graphs:
            self.cache.reserve(max_batch)  # the padding rows of captured batches write here
        self.graph_runner = None
        if graphs:
            from concilium.specialists.runtime.cuda_graphs import DecodeGraphRunner

            self.graph_runner = DecodeGraphRunner(model, self.cache, max_batch, pad_slot=max_batch)
        eos = tokenizer.eos_token_ids if tokenizer is not None else cfg.eos_token_ids
        self.eos_ids = frozenset(int(t) for t in eos)
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._incoming: deque[_Sequence] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._decode_text = tokenizer.decode if tokenizer is not None else (lambda ids: "")
        self._json_vocab: Any = None  # built at the first JSON-mode request

    def _want_graphs(self, requested: bool | None) -> bool:
        usable = self.model.device.type == "cuda" and self.model.ops.name == "kernels"
        if requested and not usable:
            raise ValueError("CUDA graphs need a CUDA device and the Triton kernels (ops backend 'kernels')")
        return usable if requested is None else requested

    # -- submitting -------------------------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[StreamEvent], None]
    ) -> RequestHandle:
        """Queue a request; `sink` receives its events on the engine thread."""
        params.validate()
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but this model server's context is {self.max_seq_len} tokens"
            )
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop sequences need a tokenizer")
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.json_object and self.tokenizer is None:
            raise ValueError("JSON mode needs a tokenizer")
        handle = RequestHandle(next(self._ids))
        seq = _Sequence(
            handle=handle,
            prompt=list(prompt_ids),
            params=params,
            sink=sink,
            decoder=IncrementalDecoder(self._decode_text, params.stop),
            stop_ids=frozenset() if params.ignore_eos else self.eos_ids | frozenset(params.stop_token_ids),
            generator=params.make_generator(self.model.device),
            counts=torch.zeros(vocab, device=self.model.device) if params.penalized else None,
            json=_json_start() if params.json_object else None,
        )
        with self._cv:
            self._incoming.append(seq)
            self._cv.notify()
        return handle

    def _json_mode_vocab(self) -> Any:
        """Token masks for JSON mode, built on the engine thread at the first request that asks."""
        if self._json_vocab is None:
            from concilium.specialists.runtime.json_mode import JsonVocab

            tok, n = self.tokenizer, self.model.cfg.vocab_size
            raw = [tok.token_bytes(i) if i < tok.vocab_size else b"" for i in range(n)]
            self._json_vocab = JsonVocab(raw, tok.special_ids, self.eos_ids, self.model.device)
        return self._json_vocab

    # -- one iteration ----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Run one scheduling iteration. Returns False when there was nothing to do."""
        with self._cv:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, "cancelled", "")
        for seq in [s for s in self._waiting if s.handle.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled", "")
        admitted: list[_Sequence] = []
        budget = self.max_prefill_tokens
        while (
            self._waiting
            and self.cache.free_slots
            and (not admitted or len(self._waiting[0].prompt) <= budget)
        ):
            seq = self._waiting.popleft()
            seq.slot = self.cache.allocate()
            budget -= len(seq.prompt)
            admitted.append(seq)
        if not admitted and not self._running:
            return False
        self.stats.steps += 1
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()
        return True

    def _prefill(self, seqs: list[_Sequence]) -> None:
        batch = ForwardBatch.for_prefill([(s.prompt, s.slot) for s in seqs], self.model.device)
        logits = self.model(batch, self.cache)
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], self._counts(seqs), self._allowed(seqs))
        lps = self._logprobs(logits, seqs, tokens)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += batch.input_ids.numel()
        for seq, tok, lp in zip(seqs, tokens, lps, strict=True):
            seq.num_cached = len(seq.prompt)
            self.cache.lengths[seq.slot] = seq.num_cached
            self._running.append(seq)
            self._accept(seq, tok, lp)

    def _decode(self) -> None:
        seqs = list(self._running)
        tokens = [s.generated[-1] for s in seqs]
        slots = [s.slot for s in seqs]
        positions = [s.num_cached for s in seqs]
        logits = None
        if self.graph_runner is not None and self.graph_runner.can_run(len(seqs)):
            logits = self.graph_runner.run(tokens, slots, positions)
        if logits is None:
            batch = ForwardBatch.for_decode(tokens, slots, positions, self.model.device)
            logits = self.model(batch, self.cache)
        new = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], self._counts(seqs), self._allowed(seqs))
        lps = self._logprobs(logits, seqs, new)
        self.stats.decode_steps += 1
        self.stats.decode_batch_sizes.append(len(seqs))
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(seqs))
        for seq, tok, lp in zip(seqs, new, lps, strict=True):
            seq.num_cached += 1
            self.cache.lengths[seq.slot] = seq.num_cached
            self._accept(seq, tok, lp)

    @staticmethod
    def _counts(seqs: list[_Sequence]) -> list[torch.Tensor | None] | None:
        counts = [s.counts for s in seqs]
        return counts if any(c is not None for c in counts) else None

    def _allowed(self, seqs: list[_Sequence]) -> list[torch.Tensor | None] | None:
        if all(s.json is None for s in seqs):
            return None
        vocab = self._json_mode_vocab()
        return [vocab.mask(s.json) if s.json is not None else None for s in seqs]

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[_Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
        """Log-probs for the sequences that asked (none computed when no one did)."""
        out: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if rows:
            found = token_logprobs(
                logits, rows, [tokens[i] for i in rows], [seqs[i].params.top_logprobs for i in rows]
            )
            for i, lp in zip(rows, found, strict=True):
                out[i] = lp
        return out

    def _accept(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        seq.generated.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.json is not None and token not in seq.stop_ids:
            seq.json = self._json_vocab.advance(seq.json, token)
        self.stats.generated_tokens += 1
        finish: str | None = None
        if token in seq.stop_ids:
            finish, text = "stop", seq.decoder.flush()
            logprob = None  # the end of the answer, not part of it
        else:
            text = seq.decoder.push(token)
            if seq.decoder.stopped:
                finish = "stop"
            elif len(seq.generated) >= seq.params.max_tokens or seq.num_cached >= self.max_seq_len:
                finish = "length"
                text += seq.decoder.flush()
        lps = None if not seq.params.logprobs else [logprob] if logprob is not None else []
        if finish is None:
            self._emit(seq, StreamEvent(text, [token], logprobs=lps))
        else:
            self._finish(seq, finish, text, [token], logprobs=lps)

    def _finish(
        self,
        seq: _Sequence,
        reason: str,
        text: str,
        tokens: list[int] | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot >= 0:
            self.cache.release(seq.slot)
            seq.slot = -1
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        self._emit(
            seq,
            StreamEvent(
                text,
                tokens or [],
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.generated),
                error=error,
                logprobs=logprobs if logprobs is not None else [] if seq.params.logprobs else None,
            ),
        )
        seq.handle.finished.set()

    def _emit(self, seq: _Sequence, event: StreamEvent) -> None:
        try:
            seq.sink(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("request %s: event sink failed; cancelling it", seq.handle.id)
            seq.handle.cancel()

    def _fail_all(self, message: str) -> None:
        with self._cv:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "error", "", error=message)
        self._waiting.clear()

    # -- the engine thread ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="concilium-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all("the engine stopped")

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._incoming or self._waiting or self._running):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # e.g. out of memory: fail the batch, keep serving
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {e}")

    # -- APIs -------------------------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Events for one request as they are produced; closing the iterator cancels the request."""
        self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def sink(ev: StreamEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        handle = self.submit(prompt_ids, params, sink)
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if not handle.finished.is_set():
                handle.cancel()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        collector = _Collector()
        async for ev in self.stream(prompt_ids, params):
            collector(ev)
        return collector.result()

    def generate_batch(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run requests together and wait for all (inline when the engine thread is not started)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        collectors = [_Collector() for _ in prompts]
        handles = [self.submit(p, sp, c) for p, sp, c in zip(prompts, plist, collectors, strict=True)]
        if self._thread is None:
            while self.step():
                pass
        for h in handles:
            h.finished.wait()
        return [c.result() for c in collectors]

    def metrics(self) -> dict[str, Any]:
        s = self.stats
        return {
            "running": len(self._running),
            "waiting": len(self._waiting) + len(self._incoming),
            "steps": s.steps,
            "decode_steps": s.decode_steps,
            "prefill_tokens": s.prefill_tokens,
            "generated_tokens": s.generated_tokens,
            "requests_finished": s.requests_finished,
            "requests_cancelled": s.requests_cancelled,
            "max_batch_seen": s.max_batch_seen,
            "kv_cache": self.cache.usage(),
            "expert_tokens": self.model.expert_load() if self.model.cfg.is_moe else {},
            "time": time.time(),
        }


def _json_start() -> Any:
    from concilium.specialists.runtime.json_mode import INITIAL

    return INITIAL


class _Collector:
    """Accumulates a request's events into a GenerationResult."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.final: StreamEvent | None = None

    def __call__(self, ev: StreamEvent) -> None:
        self.text.append(ev.text)
        self.tokens += ev.token_ids
        if ev.logprobs is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs.extend(ev.logprobs)
        if ev.finish_reason is not None:
            self.final = ev

    def result(self) -> GenerationResult:
        f = self.final
        if f is None:
            raise RuntimeError("request did not finish")
        return GenerationResult(
            text="".join(self.text),
            token_ids=self.tokens,
            finish_reason=f.finish_reason or "stop",
            prompt_tokens=f.prompt_tokens,
            completion_tokens=f.completion_tokens,
            error=f.error,
            logprobs=self.logprobs,
        )
