"""deploy/grafana/s2sproxy-dashboard.json uses exactly the metrics a proxy exports
(issue 10): every ``s2sproxy_*`` name in a panel's expression is in the registry of a
Proxy, and every metric the proxy exports is on the dashboard or listed here as not
graphed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from tests.adapters.helpers import proxy

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/s2sproxy-dashboard.json"
README = Path(__file__).resolve().parents[2] / "README.md"
NOT_GRAPHED: set[str] = set()


def exported(tmp_path) -> set[str]:
    p, _reactor = proxy(tmp_path)
    text = generate_latest(p.metrics.registry).decode()
    names = set(re.findall(r"^# TYPE (s2sproxy_\w+) ", text, re.M))
    return {n for n in names if not n.endswith("_created")}


def test_every_dashboard_metric_is_exported(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    used = {name for panel in dash["panels"] for t in panel["targets"]
            for name in re.findall(r"s2sproxy_\w+", t["expr"])}
    have = exported(tmp_path)
    assert used, "no metric on the dashboard"
    assert used <= have, sorted(used - have)
    assert have - used <= NOT_GRAPHED, sorted(have - used - NOT_GRAPHED)


def test_every_exported_metric_is_in_the_readme(tmp_path):
    text = README.read_text()
    missing = sorted(n for n in exported(tmp_path) if f"`{n}" not in text)
    assert not missing, missing
