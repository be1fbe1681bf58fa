"""OpenTelemetry traces, with the GenAI semantic conventions (see docs/tracing.md).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then the
SDK is set up on first use: a BatchSpanProcessor and the OTLP/HTTP protobuf exporter, configured by
the usual `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`, ...). Off, every
helper costs one check of `ENABLED` and creates nothing: call sites on a hot path test
`if tracing.ENABLED:` themselves; `span()` and `step()` hand back one shared no-op object.

The SDK is imported only when tracing is on, so the gateway does not need it installed otherwise;
on without the SDK, one warning is logged and tracing stays off.

Spans never carry prompt or answer text: names, models, ids, statuses, token counts and costs only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger("concilium.tracing")
T = TypeVar("T")

ENABLED: bool = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                     or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) and \
    os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


class _Noop:
    """What every helper hands back while tracing is off: a span and a context manager that do nothing."""

    __slots__ = ()

    def __enter__(self) -> _Noop:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def set_attributes(self, attributes: Any) -> None:
        return None

    def add_event(self, name: str, attributes: Any = None) -> None:
        return None

    def is_recording(self) -> bool:
        return False

    def end(self) -> None:
        return None


NOOP = _Noop()

_tracer: Any = None
_lock = threading.Lock()
_otel: Any = None  # the `opentelemetry.trace` module, once set up


def _setup() -> Any:
    """The tracer (the SDK set up on the first call); None, and ENABLED false, without the SDK."""
    global _tracer, _otel, ENABLED
    with _lock:
        if _tracer is not None or not ENABLED:
            return _tracer
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed (%s): "
                        "tracing is off; install opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http", e)
            ENABLED = False
            return None
        from concilium import __version__

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "concilium",
                                    "service.version": __version__})
        provider = TracerProvider(resource=resource)  # shut down (flushed) at exit
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _otel = trace
        _tracer = provider.get_tracer("concilium", __version__)
        return _tracer


def tracer() -> Any:
    return _tracer if _tracer is not None else _setup()


_KINDS = {"server": "SERVER", "client": "CLIENT", "internal": "INTERNAL", "consumer": "CONSUMER"}


def span(name: str, kind: str = "internal", attributes: dict[str, Any] | None = None, parent: Any = None) -> Any:
    """A context manager: a span, current inside the block (NOOP while off). A block that raises
    marks the span as failed with the exception's type only (a message may quote the prompt)."""
    if not ENABLED or (t := tracer()) is None:
        return NOOP
    return _Span(t, name, kind, attributes, parent)


class _Span:
    __slots__ = ("t", "name", "kind", "attributes", "parent", "span", "cm")

    def __init__(self, t: Any, name: str, kind: str, attributes: dict[str, Any] | None, parent: Any) -> None:
        self.t, self.name, self.kind, self.attributes, self.parent = t, name, kind, attributes, parent

    def __enter__(self) -> Any:
        self.cm = self.t.start_as_current_span(self.name, context=self.parent,
                                               kind=getattr(_otel.SpanKind, _KINDS[self.kind]),
                                               attributes=self.attributes, record_exception=False,
                                               set_status_on_exception=False)
        self.span = self.cm.__enter__()
        return self.span

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> Any:
        if exc is not None:
            failed(self.span, exc)
        return self.cm.__exit__(typ, exc, tb)


def start(name: str, kind: str = "internal", attributes: dict[str, Any] | None = None) -> Any:
    """A started span that is not current (end it with `.end()`; make it current with `use`)."""
    if not ENABLED or (t := tracer()) is None:
        return NOOP
    return t.start_span(name, kind=getattr(_otel.SpanKind, _KINDS[kind]), attributes=attributes)


def use(sp: Any) -> Any:
    """A context manager: `sp` is the current span inside the block, and is not ended by it."""
    if sp is NOOP or _otel is None:
        return NOOP
    return _otel.use_span(sp, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def failed(sp: Any, exc: BaseException | None = None, error_type: str | None = None) -> None:
    """Mark `sp` as failed: `error.type` is a status or code, the description names no text."""
    if not ENABLED or _otel is None or not sp.is_recording():
        return
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    kind = error_type or (code if isinstance(code, str) and code else None) or (
        str(status) if isinstance(status, int) else type(exc).__name__ if exc is not None else "error")
    sp.set_attribute("error.type", kind)
    if isinstance(status, int):
        sp.set_attribute("concilium.error.status", status)
    sp.set_status(_otel.Status(_otel.StatusCode.ERROR, kind))


def current() -> Any:
    """The current span (NOOP while off)."""
    if not ENABLED or _otel is None:
        return NOOP
    return _otel.get_current_span()


def usage_attributes(usage: Any) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    out = {}
    if isinstance(usage.get("prompt_tokens"), int):
        out["gen_ai.usage.input_tokens"] = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        out["gen_ai.usage.output_tokens"] = usage["completion_tokens"]
    return out


# ------------------------------------------------------------------------------ the call sites

async def attempt(aw: Awaitable[T], *, model: str, provider: str | None, number: int, fallback: bool,
                  retry: int = 0, operation: str = "chat") -> T:
    """Await one provider attempt (`aw`) inside its client span `"{operation} {model}"`. Call it
    only when ENABLED (`await (tracing.attempt(...) if tracing.ENABLED else aw)`)."""
    attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": model,
                             "concilium.attempt": number, "concilium.fallback": fallback}
    if provider:
        attrs["gen_ai.system"] = attrs["gen_ai.provider.name"] = provider
    if retry:
        attrs["concilium.retry"] = retry
    with span(f"{operation} {model}", "client", attrs) as sp:
        result = await aw
        if isinstance(result, dict):
            if isinstance(result.get("model"), str):
                sp.set_attribute("gen_ai.response.model", result["model"])
            sp.set_attributes(usage_attributes(result.get("usage")))
        return result


def step(s: Any, role: str | None = None) -> Any:
    """A context manager: the span of one strategy step (a cascade draft, a composition step),
    `concilium.step`; its outcome is read from `s` (a Step or CascadeStep) when the block ends."""
    if not ENABLED or (t := tracer()) is None:
        return NOOP
    return _Step(t, s, role)


class _Step(_Span):
    __slots__ = ("step",)

    def __init__(self, t: Any, s: Any, role: str | None) -> None:
        attrs = {"concilium.step.role": role or getattr(s, "role", None) or "step", "gen_ai.request.model": s.model}
        if (sid := getattr(s, "id", None)) is not None:
            attrs["concilium.step.id"] = sid
        super().__init__(t, "concilium.step", "internal", attrs, None)
        self.step = s

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> Any:
        s, sp = self.step, self.span
        status = getattr(s, "status", None)
        if getattr(s, "action", None) is not None:  # a cascade draft
            status = ("failed" if s.error else "accepted" if s.accepted else
                      "escalated" if s.score is not None else "cancelled" if exc is not None else "skipped")
            if s.score is not None:
                sp.set_attribute("concilium.cascade.score", s.score)
            if s.threshold is not None:
                sp.set_attribute("concilium.cascade.threshold", s.threshold)
        if status:
            sp.set_attribute("concilium.step.status", status)
        if getattr(s, "cost_usd", None) is not None:
            sp.set_attribute("concilium.cost_usd", s.cost_usd)
        sp.set_attributes(usage_attributes(getattr(s, "usage", None)))
        if exc is None and (status == "failed" or getattr(s, "error", None)):
            failed(sp, error_type="step_failed")
        return super().__exit__(typ, exc, tb)


def traceparent() -> str | None:
    """The current trace context as a W3C `traceparent` value (None while off or outside a span)."""
    if not ENABLED or _otel is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def job(job_id: str, traceparent: str | None, worker: str = "") -> Any:
    """A context manager: the span of one run of a background job, `concilium.job`, a child of the
    request that created the job when its `traceparent` was recorded (NOOP while off)."""
    if not ENABLED or tracer() is None:
        return NOOP
    parent = None
    if traceparent:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    attrs = {"concilium.job.id": job_id}
    if worker:
        attrs["concilium.worker"] = worker
    return span("concilium.job", "consumer", attrs, parent)
