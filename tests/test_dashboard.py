"""The Grafana dashboard of the `observability` compose profile (deploy/grafana/dashboards/concilium.json)
asks Prometheus only for series the gateway exports.

The exported names come from the real registry (`concilium.gateway.metrics.Metrics().registry`, with the
scrape-time circuit breaker families registered), not from a list kept here. The Celery workers export no
metrics endpoint (nothing under `concilium/workers/` uses prometheus_client): Prometheus scrapes the
gateway only, and the gateway's `/metrics` carries the job queue depth read from the broker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from concilium.gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "concilium.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# Words of PromQL that read like metric names: aggregation modifiers, binary operators, vector matching.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported_series() -> set[str]:
    """Every series name a scrape of the gateway can carry, from the registry the gateway serves."""
    metrics = Metrics()
    # `watch_breakers` adds the circuit families at scrape time from the policy in force; a stand-in state
    # with one model makes the collector yield them.
    state = SimpleNamespace(breaker=SimpleNamespace(snapshot=lambda: {}),
                            current=SimpleNamespace(policy=SimpleNamespace(models={"m": None})))
    metrics.watch_breakers(state)
    names: set[str] = set()
    # A labelled metric with no children yet has no samples, so the series names come from each family's
    # type (prometheus_client names a counter's family without its `_total`).
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created")}
    for family in metrics.registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are neither function calls, label
    names or values, range/offset durations, Grafana variables nor PromQL keywords."""
    assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"
    assert expr.count("{") == expr.count("}"), f"unbalanced braces: {expr}"
    assert expr.count("[") == expr.count("]"), f"unbalanced brackets: {expr}"
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # range selectors and subqueries' ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+\S+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables outside matchers
    names = set()
    for m in _IDENT.finditer(s):
        word = m.group()
        if word.lower() in _KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation call
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent or unit of a number (1e3)
        names.add(word)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])  # collapsed rows hold their panels


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    out = []
    for p in all_panels(dashboard()["panels"]):
        for t in p.get("targets") or []:
            out.append((f"panel {p['title']!r} {t.get('refId')}", t["expr"]))
    for v in dashboard().get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        out.append((f"variable {v['name']!r}", m.group(1) if m else q))
    return out


def test_the_registry_yields_the_known_families():
    """Guards the extraction itself: were `exported_series` to come back empty or wrong, every check below
    would be meaningless."""
    names = exported_series()
    for n in ("concilium_requests_total", "concilium_request_seconds_bucket", "concilium_requests_in_flight",
              "concilium_circuit_open", "concilium_jobs_queued", "concilium_key_spend_usd_total"):
        assert n in names
    assert "concilium_requests" not in names  # a counter's series carry `_total`
    assert "concilium_request_seconds" not in names  # a histogram's carry `_bucket`, `_sum`, `_count`


def test_metric_names_parses_promql():
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(concilium_request_seconds_bucket'
            '{model=~"$model", route="a_b"}[$__rate_interval]))) / ignoring(model) group_left '
            'sum(rate(concilium_requests_total[5m] offset 1h)) * 3600 + 1e3 > bool 0')
    assert metric_names(expr) == {"concilium_request_seconds_bucket", "concilium_requests_total"}
    assert metric_names("max(concilium_router_learner_live)") == {"concilium_router_learner_live"}
    assert metric_names("sum(concilium_typo_total)") == {"concilium_typo_total"}


@pytest.mark.parametrize("where,expr", queries(), ids=[w for w, _ in queries()])
def test_every_query_names_only_exported_metrics(where, expr):
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - exported_series()
    assert not unknown, f"{where}: {sorted(unknown)} not exported by the gateway (query: {expr})"


def test_the_dashboard_covers_the_operator_views():
    """Each view the observability profile promises has a panel over its metric."""
    used = set().union(*(metric_names(e) for _, e in queries()))
    for needed in ("concilium_requests_total", "concilium_request_seconds_bucket",
                   "concilium_time_to_first_token_seconds_bucket", "concilium_upstream_errors_total",
                   "concilium_fallbacks_total", "concilium_circuit_open", "concilium_cascade_drafts_total",
                   "concilium_composition_steps_total", "concilium_key_spend_usd_total", "concilium_cost_usd_total",
                   "concilium_jobs_queued", "concilium_router_learning_updates_total",
                   "concilium_router_learner_live"):
        assert needed in used, f"no panel queries {needed}"


def test_panels_are_well_formed_and_use_the_provisioned_datasource():
    d = dashboard()
    assert d["title"] == "Concilium gateway" and d["uid"]
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    (prom,) = [s for s in ds if s["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in all_panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(d["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == prom["uid"], p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == prom["uid"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_grafana_provisions_the_dashboard_and_prometheus_scrapes_the_gateway():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana, prometheus = compose["grafana"], compose["prometheus"]
    assert grafana["profiles"] == ["observability"] and prometheus["profiles"] == ["observability"]
    for svc in (grafana, prometheus):
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), "pin the image tag"
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "concilium.yml").read_text())["providers"]
    (path,) = [p["options"]["path"] for p in providers]
    assert mounts["./deploy/grafana/dashboards"] == path
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    # Prometheus scrapes the gateway service on the port it listens on, at the path the app serves.
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for job in scrape for sc in job.get("static_configs", []) for t in sc["targets"]]
    gateway_port = compose["gateway"]["ports"][0].split(":")[-1]
    assert f"gateway:{gateway_port}" in targets
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in scrape)
    assert any(v.startswith("./deploy/prometheus/prometheus.yml:") for v in prometheus["volumes"])
