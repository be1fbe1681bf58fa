"""OpenTelemetry traces (concilium/core/tracing.py) from a real gateway to an in-process OTLP/HTTP
collector: the server span of a chat request and its children (admit, decide, each attempt and
fallback, each strategy step), with the GenAI attributes and never the prompt."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402

from tests.guard.support import make_key  # noqa: E402
from tests.pipeline.test_compose import FUSION  # noqa: E402
from tests.pipeline.test_compose import policy as compose_policy  # noqa: E402

SECRET = "zebra-quokka-7731 what is two plus two"
SERVER, CLIENT = 2, 3  # Span.SpanKind


class Collector:
    """Accepts POST /v1/traces (OTLP/HTTP protobuf) on a loopback port and keeps every span."""

    def __init__(self) -> None:
        self.spans: list = []
        self.raw: list[bytes] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    data = gzip.decompress(data)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(data)
                collector.raw.append(data)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, root_name: str, timeout: float = 15.0, settle: float = 0.5) -> tuple:
        """(the newest server span named `root_name`, every span of its trace) once they arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            roots = [s for s in self.spans if s.name == root_name and s.kind == SERVER]
            if roots:
                time.sleep(settle)  # spans of one trace may come in more than one batch
                root = roots[-1]
                return root, [s for s in self.spans if s.trace_id == root.trace_id]
            time.sleep(0.05)
        raise AssertionError(f"no {root_name!r} server span; got {[s.name for s in self.spans]}")

    def stop(self) -> None:
        self.server.shutdown()


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = list(x.string_value for x in v.array_value.values) if kind == "array_value" else getattr(v, kind)
    return out


def children(spans, parent) -> list:
    return [s for s in spans if s.parent_span_id == parent.span_id]


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def otel_env(collector: Collector) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "concilium-test"}


def fallback_policy(url: str, keys: str) -> str:
    return f"""
version: 1
models:
  first: {{provider: openai, base_url: "{url}", model: first-up, price: {{input: 1.0, output: 2.0}}}}
  second: {{provider: openai, base_url: "{url}", model: second-up, price: {{input: 1.0, output: 2.0}}}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: default
    targets: [first]
    fallbacks: [second]
    rank: false
retry: {{attempts: 0}}
{keys}
"""


def test_fallback_request_is_traced(fake_upstream, upstream, gateway_factory, collector):
    key, h = make_key()
    keys = f"keys:\n  - name: k\n    hash: {h}\n"
    gw = gateway_factory(fallback_policy(fake_upstream.url, keys), env=otel_env(collector))
    upstream.script("first-up", [{"status": 500}])
    raw = gw.client(api_key=key).chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": SECRET}])
    assert raw.headers["x-concilium-model"] == "second"
    answer = raw.parse()

    root, spans = collector.trace("chat concilium/auto")
    a = attrs(root)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "concilium/auto"
    assert a["gen_ai.response.model"] == "second" and a["concilium.route"] == "default"
    assert a["concilium.strategy"] == "single" and a["http.response.status_code"] == 200
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["concilium.cost_usd"] > 0
    assert not root.parent_span_id  # a new trace: the client sent no traceparent

    kids = children(spans, root)
    names = [s.name for s in kids]
    assert "concilium.admit" in names and "concilium.decide" in names
    decide = next(s for s in kids if s.name == "concilium.decide")
    assert attrs(decide)["concilium.candidates"] == ["first", "second"]
    tries = sorted((s for s in kids if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in tries] == ["chat first", "chat second"]
    first, second = (attrs(s) for s in tries)
    assert tries[0].status.code == 2 and "500" in first["error.type"]  # STATUS_CODE_ERROR
    assert first["concilium.attempt"] == 1 and first["concilium.fallback"] is False
    assert first["gen_ai.system"] == "openai" and first["gen_ai.request.model"] == "first"
    assert tries[1].status.code != 2
    assert second["concilium.attempt"] == 2 and second["concilium.fallback"] is True
    assert second["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    # no prompt and no answer anywhere in what was exported
    blob = b"".join(collector.raw)
    assert b"zebra-quokka" not in blob and answer.choices[0].message.content.encode()[:40] not in blob


def test_fusion_steps_are_traced(fake_upstream, upstream, gateway_factory, collector):
    gw = gateway_factory(compose_policy(fake_upstream.url, FUSION), env=otel_env(collector))
    upstream.script("b-up", [{"status": 500}])
    raw = gw.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": SECRET}])
    assert raw.headers["x-concilium-strategy"] == "fusion"

    root, spans = collector.trace("chat concilium/auto")
    assert attrs(root)["concilium.strategy"] == "fusion"
    assert attrs(root)["gen_ai.response.model"] == "synth"
    steps = [s for s in children(spans, root) if s.name == "concilium.step"]
    by_model = {attrs(s)["gen_ai.request.model"]: (s, attrs(s)) for s in steps}
    assert sorted(by_model) == ["a", "b", "c"]
    for model, (s, a) in by_model.items():
        assert a["concilium.step.role"] == "panelist" and a["concilium.step.id"]
        assert a["concilium.step.status"] == ("failed" if model == "b" else "ok")
        assert (s.status.code == 2) == (model == "b")
        calls = children(spans, s)  # each step's provider call is its child
        assert [c.name for c in calls] == [f"chat {model}"]
    synth = [s for s in children(spans, root) if s.name == "chat synth"]
    assert len(synth) == 1 and synth[0].kind == CLIENT
    assert b"zebra-quokka" not in b"".join(collector.raw)


def test_a_background_job_joins_the_request_trace(fake_upstream, upstream, gateway_factory, collector):
    """A chat request on a background route becomes a job (the embedded worker runs it here): its
    `concilium.job` span is a child of the request's server span, and the job's call is under it."""
    text = fallback_policy(fake_upstream.url, "").replace("    rank: false\n", "    rank: false\n    mode: background\n")
    gw = gateway_factory(text, env=otel_env(collector))
    gw.client().chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": SECRET}])
    root, _ = collector.trace("chat concilium/auto")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(s.name == "concilium.job" for s in collector.spans):
        time.sleep(0.05)
    time.sleep(0.5)
    (job,) = [s for s in collector.spans if s.name == "concilium.job"]
    assert job.trace_id == root.trace_id and job.parent_span_id == root.span_id
    assert attrs(job)["concilium.job.id"].startswith("resp_")
    calls = [s for s in collector.spans if s.parent_span_id == job.span_id]
    assert [c.name for c in calls] == ["chat first"] and calls[0].kind == CLIENT
