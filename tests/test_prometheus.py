"""A real Prometheus scrapes the daemon and fires the critical-conflict alert; promtool lints.

Prometheus (Debian's package, installed by scripts/setup.sh) runs on loopback with the
project's alert rules, their `for:` durations shortened so the test takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tcprio.model import Direction
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import RunningDaemon, daemon, free_port

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
E = Direction.EGRESS

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
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(shortened_rules(tmp_path / "alerts.yml"))],
        "scrape_configs": [
            {"job_name": "tcprio", "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def firing(port: int, alert: str) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as r:
        alerts = json.load(r)["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def test_prometheus_fires_the_critical_alert_when_a_terminal_classifier_takes_priority_1(
    tmp_path, classifier_programs
):
    with (
        daemon(tmp_path) as running,
        prometheus(tmp_path, running.port) as prom,
        netns("d-prom") as ns,
    ):
        veth_in_one(ns, "x0", "x1")
        add_clsact(ns, "x0")
        attach_filter(ns, "x0", E, 10, "classifier_egress")
        time.sleep(2)
        assert firing(prom, "TcprioCriticalConflict") == []
        attach_filter(ns, "x0", E, 1, "term_ok")
        deadline = time.monotonic() + 45
        while not (alerts := firing(prom, "TcprioCriticalConflict")):
            assert time.monotonic() < deadline, "the critical alert never fired"
            time.sleep(0.5)
    labels = alerts[0]["labels"]
    assert labels["namespace"] == ns.name and labels["interface"] == "x0"
    assert labels["direction"] == "egress"


def test_metrics_pass_promtool_check_metrics(tmp_path, classifier_programs):
    with daemon(tmp_path) as running, netns("d-lint") as ns:
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
    deadline = time.monotonic() + 5
    while True:
        _, text = running.get("/metrics")
        if 'tcprio_conflict{' in text:
            return text
        assert time.monotonic() < deadline, "no conflict in /metrics"
        time.sleep(0.05)
