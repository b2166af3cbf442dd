"""A real Prometheus scrapes the daemon and fires the critical-conflict alert; promtool lints.

Prometheus (Debian's package, installed by scripts/setup.sh) runs on loopback with the
project's alert rules, their `for:` durations shortened so the test takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tcprio.model import Direction
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import RunningDaemon, daemon, free_port
from tests.timing import HANG_GUARD_S, wait_until

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
E = Direction.EGRESS
# Prometheus first scrapes its target about 5 s after it starts (service discovery hands it
# over every 5 s); from a conflict to the firing alert then takes a scrape, a rule evaluation
# and the 1 s `for:` (about 2 s here). 10x the longer, and more:
PROMETHEUS_GUARD_S = 60.0

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (scripts/setup.sh dev installs it)",
)


def shortened_rules(target: Path) -> Path:
    """The project's rules with every `for:` cut to 1s: the same expressions, faster."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    target.write_text(yaml.safe_dump(document))
    return target


@contextlib.contextmanager
def prometheus(tmp_path: Path, scrape_port: int) -> Iterator[int]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(shortened_rules(tmp_path / "alerts.yml"))],
        "scrape_configs": [
            {"job_name": "tcprio", "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}]}
        ],
    }
    with running_prometheus(tmp_path, config) as port:
        yield port


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, config: dict) -> Iterator[int]:
    """Debian's prometheus with `config` on a free loopback port, once ready; its port."""
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def ready() -> bool:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r,
        ):
            if r.status == 200:
                return True
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        return False

    try:
        wait_until(ready, "prometheus never became ready", poll_s=0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def api(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HANG_GUARD_S) as r:
        return json.load(r)["data"]


def firing(port: int, alert: str) -> list[dict]:
    alerts = api(port, "/api/v1/alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def scraped_at(port: int, query: str) -> float | None:
    """When Prometheus scraped the series of `query` (its newest sample); None: not yet."""
    found = api(port, "/api/v1/query?" + urllib.parse.urlencode({"query": f"timestamp({query})"}))
    return float(found["result"][0]["value"][1]) if found["result"] else None


def rules_evaluated_at(port: int) -> float:
    """When Prometheus last evaluated the alert rules (its own /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HANG_GUARD_S) as r:
        text = r.read().decode()
    times = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "prometheus_rule_group_last_evaluation_timestamp_seconds"
    ]
    return min(times, default=0.0)


def test_prometheus_fires_the_critical_alert_when_a_terminal_classifier_takes_priority_1(
    tmp_path, classifier_programs
):
    with (
        daemon(tmp_path, full_inventory=False) as running,  # the default, bounded metrics
        prometheus(tmp_path, running.port) as prom,
        netns("d-prom") as ns,
    ):
        veth_in_one(ns, "x0", "x1")
        add_clsact(ns, "x0")
        attach_filter(ns, "x0", E, 10, "classifier_egress")
        # No alert while Datadog's classifier is alone: checked once the rules have run twice
        # (enough for a `for: 1s` alert to fire) on a scrape that has the classifier.
        classifier = 'tcprio_classifiers{datadog="true"} > 0'
        scraped = wait_until(
            lambda: scraped_at(prom, classifier), "the classifier scraped", PROMETHEUS_GUARD_S
        )
        wait_until(lambda: rules_evaluated_at(prom) >= scraped + 2, "the rules evaluated")
        assert firing(prom, "TcprioCriticalConflict") == []
        attach_filter(ns, "x0", E, 1, "term_ok")
        alerts = wait_until(
            lambda: firing(prom, "TcprioCriticalConflict"),
            "the critical alert never fired",
            PROMETHEUS_GUARD_S,
            poll_s=0.5,
        )
    assert len(alerts) == 1  # one per node
    assert alerts[0]["labels"]["instance"] == f"127.0.0.1:{running.port}"
    description = alerts[0]["annotations"]["description"]
    assert description.startswith("term_ok at clsact priority 1, on 1 egress hook(s).")
    assert f"x0 egress in {ns.name}" in description  # the per-hook detail, through `query`


@pytest.mark.parametrize("full_inventory", [False, True], ids=["bounded", "full"])
def test_metrics_pass_promtool_check_metrics(tmp_path, classifier_programs, full_inventory):
    with daemon(tmp_path, full_inventory=full_inventory) as running, netns("d-lint") as ns:
        veth_in_one(ns, "l0", "l1")
        add_clsact(ns, "l0")
        attach_filter(ns, "l0", E, 5, "term_shot")
        attach_filter(ns, "l0", E, 10, "classifier_egress")
        text = _wait_for_conflict(running)
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr


def _wait_for_conflict(running: RunningDaemon) -> str:
    def conflict() -> str | None:
        _, text = running.get("/metrics")
        return text if "tcprio_conflict{" in text else None

    return wait_until(conflict, "no conflict in /metrics")
