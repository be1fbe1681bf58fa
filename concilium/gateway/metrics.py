"""Prometheus metrics: requests, latency, time to first token, tokens and cost per model and route."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("concilium_requests", "Chat requests", ["model", "route", "status"], registry=r)
        self.latency = Histogram("concilium_request_seconds", "Request latency (to last byte)",
                                 ["model", "route"], buckets=_LAT_BUCKETS, registry=r)
        self.ttft = Histogram("concilium_time_to_first_token_seconds", "Time to first streamed token",
                              ["model", "route"], buckets=_LAT_BUCKETS, registry=r)
        self.tokens = Counter("concilium_tokens", "Tokens", ["model", "route", "kind"], registry=r)
        self.cost = Counter("concilium_cost_usd", "Estimated cost in USD", ["model", "route"], registry=r)
        self.upstream_errors = Counter("concilium_upstream_errors", "Failed provider attempts",
                                       ["model", "code"], registry=r)
        self.fallbacks = Counter("concilium_fallbacks", "Requests answered by a later candidate",
                                 ["route"], registry=r)
        self.in_flight = Gauge("concilium_requests_in_flight", "Requests being served", registry=r)
        self.policy_reloads = Counter("concilium_policy_reloads", "Policy reloads", ["result"], registry=r)
        self.jobs_submitted = Counter("concilium_jobs_submitted", "Background jobs submitted",
                                      ["kind", "route"], registry=r)
        self.jobs_diverted = Counter("concilium_jobs_chat_diverted", "Non-streaming chat requests run as jobs",
                                     ["outcome"], registry=r)
        self.cascade = Counter("concilium_cascade_drafts", "Cascade drafts by outcome (accepted, escalated, "
                               "trusted, skipped, failed)", ["route", "model", "outcome"], registry=r)
        self.cascade_score = Histogram("concilium_cascade_score", "Scores of cascade drafts", ["route", "model"],
                                       buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.composition_steps = Counter("concilium_composition_steps", "Calls of fusion panels and chains before "
                                         "the synthesis, by role and status (ok, failed, cancelled, restored)",
                                         ["route", "role", "status"], registry=r)
        self.composition_synthesis = Histogram("concilium_composition_synthesis_seconds", "Time the synthesiser of "
                                               "a fusion or chain took", ["route"], registry=r)
        self.learning_updates = Counter("concilium_router_learning_updates", "Feedback scores the online router "
                                        "learned from, by the model that had answered", ["model"], registry=r)
        self.learning_live = Gauge("concilium_router_learner_live", "1 while the online learner routes, 0 while it "
                                   "runs in shadow", registry=r)
        self.rejected = Counter("concilium_rejected_requests", "Requests refused with 401, 403 or 429, by status and "
                                "error code", ["status", "code"], registry=r)
        self.jobs_queued = Gauge("concilium_jobs_queued", "Jobs waiting in each queue for a worker (at scrape time)",
                                 ["queue"], registry=r)
        self.cache = Counter("concilium_cache_requests", "Response cache lookups by result (hit, miss, bypass) "
                             "and, for hits, kind (exact, semantic)", ["route", "result", "kind"], registry=r)
        self.key_spend = Counter("concilium_key_spend_usd", "Spend settled per API key, in USD", ["key"], registry=r)

        # Labelled children by (metric, label values): `labels()` takes a lock and builds a key per call.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached."""
        c = self._children.get((metric, labels))
        if c is None:
            c = self._children[(metric, labels)] = metric.labels(*labels)
        return c

    def record(self, model: str, route: str, status: str, seconds: float, usage: dict | None,
               cost: float | None) -> None:
        self.child(self.requests, model, route, status).inc()
        self.child(self.latency, model, route).observe(seconds)
        if usage:
            self.child(self.tokens, model, route, "prompt").inc(usage.get("prompt_tokens") or 0)
            self.child(self.tokens, model, route, "completion").inc(usage.get("completion_tokens") or 0)
        if cost:
            self.child(self.cost, model, route).inc(cost)

    def reject(self, status: int, code: str | None) -> None:
        """Count a refused request (401, 403, 429); other statuses are not rejections."""
        if status in (401, 403, 429):
            self.child(self.rejected, str(status), code or "none").inc()

    def watch_breakers(self, state: Any) -> None:
        """`concilium_circuit_open` (1 while a model's circuit is open) and `concilium_circuit_failures`
        (its failures in a row) for every model of the policy in force, read at scrape time."""
        def collect() -> list[GaugeMetricFamily]:
            now = state.breaker.snapshot()
            is_open = GaugeMetricFamily("concilium_circuit_open", "1 while the model's circuit is open",
                                        labels=["model"])
            failures = GaugeMetricFamily("concilium_circuit_failures", "The model's failed requests in a row",
                                         labels=["model"])
            for model in state.current.policy.models:
                st = now.get(model) or {}
                is_open.add_metric([model], 1.0 if st.get("open_for_s", 0) > 0 else 0.0)
                failures.add_metric([model], float(st.get("failures", 0)))
            return [is_open, failures]

        self.registry.register(_Collector(collect))


class _Collector:
    """A prometheus collector that builds its families when scraped."""

    def __init__(self, collect: Any) -> None:
        self.collect = collect

    def describe(self) -> list:
        return []  # nothing to check at registration: the families depend on the policy in force
