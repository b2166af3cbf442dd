"""Every query of the Grafana dashboard and of the fleet rules returns data from a real
Prometheus scraping a real daemon over a real conflict scene.

Prometheus (Debian's package) scrapes the daemon of tests/test_daemon.py every second as job
"tcprio", with the `cluster` and `node` target labels the PodMonitor and external labels give
on a cluster, and evaluates deploy/prometheus/fleet.yml every second. The scene: Datadog's
classifier on two hooks, one behind Cilium-named terminal program at priority 1 (critical),
one behind a terminal program at priority 5 (error: a classifier_priority fixes it).
The dashboard's variables are replaced by regexes matching those labels, Grafana's built-in
intervals by fixed ones; then each query must give at least one series.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tcprio.model import Direction
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import daemon
from tests.test_prometheus import running_prometheus
from tests.timing import HANG_GUARD_S, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tcprio.json"
FLEET = ROOT / "deploy" / "prometheus" / "fleet.yml"
E = Direction.EGRESS
CLUSTER, NODE = "test-cluster", "test-node"
# Prometheus first scrapes about 5 s after it starts; then a scrape and a rule evaluation a
# second each, twice over (the fleet rules read each other's results). 10x, and more.
PROMETHEUS_GUARD_S = 60.0
BUILT_INS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed (scripts/setup.sh dev installs it)",
)


# --- what the dashboard and the rules ask -----------------------------------------------------


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in _panels(dashboard["panels"])
        for t in p.get("targets", [])
    ]


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, metric selector, label) of every `label_values(...)` variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"${var['name']}: {query}"
        found.append((var["name"], match.group(1), match.group(2)))
    return found


def fleet_queries() -> list[tuple[str, str]]:
    rules = [r for g in yaml.safe_load(FLEET.read_text())["groups"] for r in g["rules"]]
    return [(f"rule {r['record']}", r["expr"]) for r in rules] + [
        (f"recorded {r['record']}", r["record"]) for r in rules
    ]


def substitute(expr: str, port: int) -> str:
    values = {"$cluster": "test-.*", "$node": "test-no.*", "$instance": f".*:{port}"}
    for name, value in {**BUILT_INS, **values}.items():
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[:1] == ["datasource"] and {"cluster", "node", "instance"} <= set(names)
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert "namespace" not in re.findall(r"\b(\w+)\s*=~?", target["expr"]), (
                "tcprio's network namespace label is `netns`"
            )
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[0] == "Fleet" and rows[1].startswith("Node")
    # the fleet view reads the recording rules; the node drill-down filters on the variables
    recorded = {r["record"] for g in yaml.safe_load(FLEET.read_text())["groups"]
                for r in g["rules"]}  # fmt: skip
    used = " ".join(expr for _, expr in dashboard_queries())
    assert {name for name in recorded if name in used} >= {
        "cluster_severity:tcprio_conflicts:sum",
        "cluster_state:tcprio_datadog_network_detection:sum",
        "cluster_vendor:tcprio_nodes_with_classifiers:count",
    }
    assert "tcprio_conflict_blockers" in used


# --- a real Prometheus ---------------------------------------------------------------------------


@contextlib.contextmanager
def prometheus(tmp_path: Path, scrape_port: int) -> Iterator[int]:
    rules = yaml.safe_load(FLEET.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp_path / "fleet.yml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "fleet.yml")],
        "scrape_configs": [{
            "job_name": "tcprio",
            "static_configs": [{
                "targets": [f"127.0.0.1:{scrape_port}"],
                "labels": {"cluster": CLUSTER, "node": NODE},
            }],
        }],
    }  # fmt: skip
    with running_prometheus(tmp_path, config) as port:
        yield port


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=HANG_GUARD_S) as r:
            return json.load(r)["data"]["result"]
    except urllib.error.HTTPError as exc:  # a bad query: 400 with Prometheus' own message
        raise AssertionError(f"{promql}: {exc.read().decode()}") from exc


def _metrics_of(expr: str) -> list[str]:
    return sorted(set(re.findall(r"\b((?:cluster\w*:)?tcprio_\w+(?::\w+)?)", expr)))


def test_every_query_returns_data_from_a_real_daemon(tmp_path, classifier_programs):
    with (
        daemon(tmp_path) as running,
        prometheus(tmp_path, running.port) as prom,
        netns("d-dash") as ns,
    ):
        # critical: a Cilium-named terminal filter at priority 1 before Datadog's
        veth_in_one(ns, "c0", "c1")
        add_clsact(ns, "c0")
        attach_filter(ns, "c0", E, 10, "classifier_egress")
        attach_filter(ns, "c0", E, 1, "term_ok", filter_name="bpf_lxc.o:[to-container]")
        # error: a terminal filter at priority 5, below Datadog's 10
        veth_in_one(ns, "f0", "f1")
        add_clsact(ns, "f0")
        attach_filter(ns, "f0", E, 10, "classifier_egress")
        attach_filter(ns, "f0", E, 5, "term_shot")

        def scene_scraped() -> bool:
            critical = query(prom, 'cluster_severity:tcprio_conflicts:sum{severity="critical"}')
            error = query(prom, 'cluster_severity:tcprio_conflicts:sum{severity="error"}')
            return bool(
                critical and float(critical[0]["value"][1]) >= 1
                and error and float(error[0]["value"][1]) >= 1
            )  # fmt: skip

        wait_until(scene_scraped, "the conflicts never reached the fleet rules",
                   PROMETHEUS_GUARD_S, poll_s=0.5)  # fmt: skip
        # one more change, on a hook the daemon knows already; rate() over the counters needs
        # two samples of a series
        attach_filter(ns, "f0", E, 20, "pass_unspec")
        wait_until(
            lambda: query(prom, "rate(tcprio_filter_changes_total[1m])"),
            "no rate of filter changes",
            PROMETHEUS_GUARD_S,
            poll_s=0.5,
        )

        empty: list[str] = []
        for where, expr in [*dashboard_queries(), *fleet_queries()]:
            promql = substitute(expr, running.port)
            if not query(prom, promql):
                empty.append(f"{where}: {promql} (metrics: {', '.join(_metrics_of(expr))})")
        for name, selector, label in variable_queries():
            promql = f"count by ({label}) ({substitute(selector, running.port)})"
            result = query(prom, promql)
            if not any(r["metric"].get(label) for r in result):
                empty.append(f"variable ${name}: {promql}")
        log = running.log()
    assert empty == [], "queries without data:\n" + "\n".join(empty) + "\n" + log[-2000:]
