"""Native client for OpenAI-compatible servers (OpenAI, vLLM, Ollama, llama.cpp, our model server).

aiohttp, one pooled session per provider, and SSE passed through as the upstream's own bytes: each
event is split out of the byte stream and parsed once (to find usage, content and malformed chunks),
never re-encoded.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import orjson

from concilium.specialists.base import CONTEXT_LENGTH_EXCEEDED, Provider, ProviderError, classify_status
from concilium.specialists.deployments import Balancer, Replica

# Longest wait for the end of a streamed body after its [DONE] event.
_END_WAIT_S = 0.25
# Gateway-level fields an upstream would reject.
_GATEWAY_ONLY = ("metadata", "background", "user_tags", "fallbacks", "models")
# What an embeddings request passes upstream.
_EMBED_FIELDS = ("input", "encoding_format", "dimensions", "user")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: treat as unknown


def describe(e: aiohttp.ClientError) -> str:
    """A connection failure in plain words (aiohttp's own text carries its internals: `ssl:default`,
    `[Connect call failed ('127.0.0.1', 1)]`, class names)."""
    if isinstance(e, aiohttp.ClientConnectorError):
        errno = getattr(e.os_error, "errno", None)
        why = os.strerror(errno).lower() if errno else None  # asyncio's strerror repeats the address
        return f"cannot connect to {e.host}:{e.port}" + (f" ({why})" if why else "")
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the response body was cut short"
    if isinstance(e, aiohttp.ClientResponseError):
        return f"bad response ({e.status} {e.message})"
    if isinstance(e, aiohttp.ClientOSError) and e.errno:
        return os.strerror(e.errno).lower()
    if isinstance(e, aiohttp.InvalidURL):
        return f"invalid URL {e.url}"
    return "the connection failed"


async def error_from_response(resp: aiohttp.ClientResponse, who: str) -> ProviderError:
    raw = await resp.read()
    message = raw[:500].decode("utf-8", "replace")
    upstream_code = None
    try:
        err = orjson.loads(raw).get("error")
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        if isinstance(err, dict):
            upstream_code = err.get("code")
    except (orjson.JSONDecodeError, AttributeError):
        pass
    retryable, fallback = classify_status(resp.status)
    code = f"upstream_{resp.status}"
    if upstream_code == CONTEXT_LENGTH_EXCEEDED:  # too long for this model; one with a longer context may take it
        fallback, code = True, CONTEXT_LENGTH_EXCEEDED
    return ProviderError(
        f"{who}: upstream answered {resp.status}: {message}",
        status=resp.status if resp.status < 500 else 502,
        retryable=retryable,
        fallback=fallback,
        retry_after=parse_retry_after(resp.headers.get("retry-after")),
        code=code,
    )


def check_event(who: str, event: bytes) -> None:
    """Reject a malformed chunk or an in-stream error so the caller can fall back or report it."""
    try:
        obj = orjson.loads(event[5:])
    except orjson.JSONDecodeError:
        raise ProviderError(f"{who}: upstream sent a malformed chunk", code="bad_upstream_chunk") from None
    if not isinstance(obj, dict):
        raise ProviderError(f"{who}: upstream sent a malformed chunk", code="bad_upstream_chunk")
    if "error" in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise ProviderError(f"{who}: upstream stream error: {msg}", code="upstream_stream_error")


async def _read_to_end(resp: aiohttp.ClientResponse) -> None:
    """After [DONE], read the (normally empty, already arriving) end of the body.

    A response left unfinished closes its connection; one read to the end goes back to the pool, so
    the next request skips a new TCP connection. An upstream that keeps the body open after [DONE]
    gets `_END_WAIT_S`, then its connection is closed as before.
    """
    if resp.content.at_eof():
        return
    try:
        async with asyncio.timeout(_END_WAIT_S):
            while await resp.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError):
        pass


class SSEEvents:
    """The events of one streamed answer, one per iteration, plus a hint for whoever relays them.

    `ready()` is True when the next event has already arrived (it is waiting in the read buffer), so
    a relay can write the events of one network read with one write instead of one write each.
    """

    __slots__ = ("buf", "_it")

    def __init__(self) -> None:
        self.buf = b""  # bytes read but not yet yielded (the generator keeps it up to date)
        self._it: AsyncIterator[bytes] | None = None

    def start(self, it: AsyncIterator[bytes]) -> None:
        self._it = it

    def __aiter__(self) -> SSEEvents:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()

    def ready(self) -> bool:
        buf = self.buf
        return (b"\n\n" in buf and buf.startswith(b"data:")
                and not (buf.startswith(b"data: [DONE]") or buf.startswith(b"data:[DONE]")))


class OpenAICompatProvider(Provider):
    kind = "openai"

    def __init__(self, name: str, spec: Any) -> None:
        super().__init__(name, spec)
        self.url = spec.base_url.rstrip("/") + "/chat/completions" if spec.base_url else ""
        self._session: aiohttp.ClientSession | None = None
        # `deployments`: replicas balanced by in-flight requests (see deployments.py)
        self.balancer = Balancer(spec.deployments, spec.deployment_health, spec.api_key_env) if spec.deployments else None

    def _api_key(self) -> str | None:
        return os.environ.get(self.spec.api_key_env) if self.spec.api_key_env else None

    def unavailable_reason(self) -> str | None:
        if self.balancer is not None:
            return self.balancer.missing_keys()
        if self.spec.api_key_env and not self._api_key():
            return f"{self.spec.api_key_env} is not set"
        return None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    async def start(self) -> None:
        if self.balancer is not None:
            self.balancer.start_probes(self._get_session)

    async def close(self) -> None:
        if self.balancer is not None:
            await self.balancer.stop_probes()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request(self, body: dict[str, Any], stream: bool, at: Replica | None = None) -> tuple[bytes, dict[str, str]]:
        payload = {k: v for k, v in body.items() if k not in _GATEWAY_ONLY}
        payload["model"] = (at.spec.model if at is not None else None) or self.spec.model
        payload["stream"] = stream
        if stream:
            opts = dict(payload.get("stream_options") or {})
            opts["include_usage"] = True  # we need usage for metrics and cost; dropped if not asked
            payload["stream_options"] = opts
        else:
            payload.pop("stream_options", None)
        headers = {"content-type": "application/json", "accept": "application/json"}
        key = at.api_key() if at is not None else self._api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return orjson.dumps(payload), headers

    def _url(self, at: Replica | None, path: str) -> str:
        return at.url + path if at is not None else self.spec.base_url.rstrip("/") + path

    async def _balanced(self, call: Any) -> Any:
        """`call(replica)` on the least loaded usable deployment, then on the next one while they fail
        (errors about the request itself are raised at once); `call(None)` without deployments."""
        b = self.balancer
        if b is None:
            return await call(None)
        tried: set[Replica] = set()
        errors: list[str] = []
        last: ProviderError | None = None
        while (r := b.pick(tried)) is not None:
            tried.add(r)
            b.started(r)
            ok: bool | None = None
            try:
                out = await call(r)
                ok = True
                return out
            except ProviderError as e:
                if not e.fallback:
                    raise
                ok, last = False, e
                errors.append(f"{r.label()}: {e.message.removeprefix(self.name + ': ')}")
            finally:
                b.finished(r, ok, errors[-1] if ok is False else None)
        raise self._all_failed(errors, last)

    def _all_failed(self, errors: list[str], last: ProviderError | None) -> ProviderError:
        assert self.balancer is not None
        if last is None:
            return ProviderError(f"{self.name}: no deployment is usable: {self.balancer.unavailable()}",
                                 status=503, code="no_usable_deployment")
        return ProviderError(f"{self.name}: every deployment failed: " + "; ".join(errors), status=last.status,
                             retryable=last.retryable, fallback=True, retry_after=last.retry_after, code=last.code)

    async def complete(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        return await self._balanced(lambda at: self._complete_at(body, timeout, at))

    async def _complete_at(self, body: dict[str, Any], timeout: float, at: Replica | None) -> dict[str, Any]:
        data, headers = self._request(body, stream=False, at=at)
        return await self._post_json(at, "/chat/completions", data, headers, timeout, "choices")

    async def embed(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        return await self._balanced(lambda at: self._embed_at(body, timeout, at))

    async def _embed_at(self, body: dict[str, Any], timeout: float, at: Replica | None) -> dict[str, Any]:
        payload = {k: body[k] for k in _EMBED_FIELDS if body.get(k) is not None}
        payload["model"] = (at.spec.model if at is not None else None) or self.spec.model
        _, headers = self._request({}, stream=False, at=at)
        return await self._post_json(at, "/embeddings", orjson.dumps(payload), headers, timeout, "data")

    async def _post_json(self, at: Replica | None, path: str, data: bytes, headers: dict[str, str], timeout: float,
                         listed: str) -> dict[str, Any]:
        """POST a non-streamed request; the JSON object answered, which must hold a list `listed`."""
        try:
            async with self._get_session().post(self._url(at, path), data=data, headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    raise await error_from_response(resp, self.name)
                raw = await resp.read()
        except TimeoutError:
            raise ProviderError(f"{self.name}: timed out after {timeout:g}s", status=504, code="timeout") from None
        except aiohttp.ClientError as e:
            raise ProviderError(f"{self.name}: connection failed: {describe(e)}", code="connection_error") from None
        try:
            out = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError(f"{self.name}: upstream sent invalid JSON", code="bad_upstream_json") from None
        if not isinstance(out, dict) or not isinstance(out.get(listed), list):
            raise ProviderError(f"{self.name}: upstream response has no {listed}", code="bad_upstream_json")
        return out

    def stream(self, body: dict[str, Any], *, timeout: float) -> SSEEvents:
        events = SSEEvents()
        # One upstream: its events directly (a balancing layer would be one more generator per event).
        if self.balancer is None:
            events.start(self._events_at(body, timeout, events, None))
        else:
            events.start(self._balanced_events(self.balancer, body, timeout, events))
        return events

    async def _balanced_events(self, b: Balancer, body: dict[str, Any], timeout: float,
                               st: SSEEvents) -> AsyncIterator[bytes]:
        tried: set[Replica] = set()
        errors: list[str] = []
        last: ProviderError | None = None
        while (r := b.pick(tried)) is not None:  # a stream moves on only before its first event
            tried.add(r)
            b.started(r)
            ok: bool | None = None
            started = False
            try:
                async for ev in self._events_at(body, timeout, st, r):
                    started = True
                    yield ev
                ok = True
                return
            except ProviderError as e:
                if started or not e.fallback:
                    ok = False if started else None
                    raise
                ok, last = False, e
                errors.append(f"{r.label()}: {e.message.removeprefix(self.name + ': ')}")
            finally:
                b.finished(r, ok, errors[-1] if errors and ok is False else None)
        raise self._all_failed(errors, last)

    async def _events_at(self, body: dict[str, Any], timeout: float, st: SSEEvents,
                         at: Replica | None) -> AsyncIterator[bytes]:
        data, headers = self._request(body, stream=True, at=at)
        headers["accept"] = "text/event-stream"
        # `timeout` bounds the wait for the first byte and each gap between chunks, not the whole stream.
        ct = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        try:
            async with self._get_session().post(self._url(at, "/chat/completions"), data=data, headers=headers,
                                                timeout=ct) as resp:
                if resp.status != 200:
                    raise await error_from_response(resp, self.name)
                async for piece in resp.content.iter_any():
                    buf = st.buf + piece
                    if b"\r" in buf:
                        buf = buf.replace(b"\r\n", b"\n")
                    while (i := buf.find(b"\n\n")) >= 0:
                        event, buf = buf[: i + 2], buf[i + 2 :]
                        if not event.startswith(b"data:"):
                            continue  # comments / keep-alives / other fields
                        if event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]"):
                            st.buf = b""
                            await _read_to_end(resp)
                            return
                        check_event(self.name, event)
                        st.buf = buf
                        yield event
                    st.buf = buf
                raise ProviderError(f"{self.name}: stream ended before [DONE]", code="stream_dropped")
        except TimeoutError:
            raise ProviderError(f"{self.name}: no data for {timeout:g}s", status=504, code="timeout") from None
        except aiohttp.ClientError as e:
            raise ProviderError(f"{self.name}: stream failed: {describe(e)}", code="stream_dropped") from None
