"""The shipped Grafana dashboard and Prometheus config match the metrics
Aivonx really exports."""
from __future__ import annotations

import asyncio
import json
import os
import re

import yaml
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import ROOT
from tests.helpers import configure

DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "aivonx-dashboard.json")
PROMETHEUS = os.path.join(ROOT, "contrib", "prometheus", "prometheus.yml")

# PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless", "le", "inf", "nan"}
# Counters of rare events: before the first one only their family is declared.
_MAY_HAVE_NO_SAMPLE = {"aivonx_rejected_total", "aivonx_key_rejected_total"}


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the panels and template variables."""
    found = []
    for panel in dashboard["panels"]:
        found += [t["expr"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


def metric_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers outside label matchers,
    ranges, strings and grouping clauses, not called as functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\((\w+)\s*,\s*\w+\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\s*(\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_metric_names_are_found_in_promql():
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(aivonx_ttft_bucket{node=~"$node"}'
            '[$__rate_interval]))) / on (node) aivonx_slots')
    assert metric_names(expr) == {"aivonx_ttft_bucket", "aivonx_slots"}


async def test_every_dashboard_metric_exists_in_metrics(make_node, make_proxy):
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    wanted = set().union(*map(metric_names, queries(dashboard)))
    assert len(wanted) >= 10 and all(name.startswith("aivonx_") for name in wanted), wanted

    # Traffic that fills every series: answers, a failover from a failing
    # node, requests waiting for the one slot of a slow node.
    good = await make_node(["llama3:latest"])
    flaky = await make_node(["llama3:latest"])
    flaky.fail_status = 500
    slow = await make_node(["slow:latest"], chunk_delay=0.05)
    proxy = await make_proxy([good, flaky, slow])
    configure(proxy, slow, slots=1)
    client = AsyncHTTPClient()

    def generate(model: str):
        return client.fetch(proxy.url + "/api/generate", method="POST", raise_error=False,
                            body=json.dumps({"model": model, "prompt": "hi"}))
    for _ in range(4):
        assert (await generate("llama3")).code == 200
    assert [r.code for r in await asyncio.gather(generate("slow"), generate("slow"))] == [200] * 2
    text = (await client.fetch(proxy.url + "/metrics")).body.decode()
    sampled = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    declared = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    missing = {name for name in wanted - sampled
               if not (name in _MAY_HAVE_NO_SAMPLE and name in declared)}
    assert not missing, f"the dashboard queries metrics /metrics lacks: {sorted(missing)}"


def test_prometheus_example_scrapes_metrics():
    with open(PROMETHEUS, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
