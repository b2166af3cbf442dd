"""`tcprio --scan` as a user runs it: exit statuses, JSON schema, privilege errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources

import jsonschema
import pytest

from tcprio.model import Direction
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth_in_one

E = Direction.EGRESS
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DD_")}


def tcprio(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
    """Run the CLI; a system-probe running on this machine must not change what tests see."""
    if "--scan" in args or args[:1] == ("scan",):
        args = (*args, "--no-agent-process")
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tcprio", *args],
        capture_output=True,
        text=True,
        env={**CLEAN_ENV, **(env or {})},
        timeout=120,
    )


def schema() -> dict:
    text = resources.files("tcprio").joinpath("data/scan-schema-v1.json").read_text()
    return json.loads(text)


@pytest.fixture
def node(classifier_programs) -> Iterator[TestNetns]:
    with netns("cli") as ns:
        for ifname in ("veth0", "veth1"):
            veth_in_one(ns, ifname, f"{ifname}p")
            add_clsact(ns, ifname)
        yield ns


def scan_json(ns: TestNetns, env: dict[str, str] | None = None) -> tuple[int, dict]:
    """These scenes have no Datadog classifier: assume its detection runs, as on a node with
    Datadog (test_datadog_presence.py covers the node without it)."""
    proc = tcprio("--scan", "--format", "json", "--netns", ns.name, "--assume-datadog", env=env)
    assert proc.returncode in (0, 1, 2), proc.stderr
    document = json.loads(proc.stdout)
    jsonschema.validate(document, schema())
    return proc.returncode, document


def test_no_conflict_exits_0(node: TestNetns):
    attach_filter(node, "veth0", E, 20, "term_ok")
    attach_filter(node, "veth1", E, 5, "pass_unspec")
    status, doc = scan_json(node)
    assert status == 0 and doc["exit_status"] == 0
    assert doc["conflicts"] == []
    assert doc["summary"]["classifiers"] == 2


def test_fixable_conflicts_exit_1_with_the_recommended_priority(node: TestNetns):
    attach_filter(node, "veth0", E, 5, "term_shot")
    attach_filter(node, "veth1", E, 7, "term_ok")
    status, doc = scan_json(node)
    assert status == 1
    assert doc["recommended_classifier_priority"] == 4
    rows = sorted((c["interface"], c["severity"], c["blocker_priority"]) for c in doc["conflicts"])
    assert rows == [("veth0", "error", 5), ("veth1", "error", 7)]
    for conflict in doc["conflicts"]:
        assert conflict["namespace"] == node.name and conflict["direction"] == "egress"
        assert conflict["recommended_classifier_priority"] == 4
        assert conflict["blocker"]["prog_id"] > 0


def test_a_critical_conflict_exits_2(node: TestNetns):
    attach_filter(node, "veth0", E, 5, "term_shot")
    attach_filter(node, "veth1", E, 1, "term_redirect")
    status, doc = scan_json(node)
    assert status == 2
    assert {c["severity"] for c in doc["conflicts"]} == {"critical", "error"}
    assert doc["conflicts"][0]["severity"] == "critical"  # most severe first


def test_the_configured_priority_comes_from_the_environment(node: TestNetns):
    attach_filter(node, "veth0", E, 5, "term_shot")
    env = {"DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY": "3"}
    status, doc = scan_json(node, env)
    assert status == 0, doc["conflicts"]
    assert doc["datadog"]["classifier_priority"]["value"] == 3
    assert (
        "DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY"
        in (doc["datadog"]["classifier_priority"]["source"])
    )


def test_text_report_puts_conflicts_first_and_explains(node: TestNetns):
    attach_filter(node, "veth0", E, 1, "by_packet")
    proc = tcprio(
        "--scan", "--netns", node.name, "--explain", "--color", "never", "--assume-datadog"
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    first_conflict = next(i for i, line in enumerate(lines) if line.startswith("CONFLICTS"))
    inventory = next(i for i, line in enumerate(lines) if line.startswith("CLASSIFIERS"))
    assert first_conflict < inventory
    assert "CRITICAL" in proc.stdout and "by_packet" in proc.stdout
    assert "TC_ACT_SHOT" in proc.stdout[inventory:]  # the explained exit path


def test_without_capabilities_one_line_and_exit_3():
    proc = tcprio("--scan", prefix=("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"))
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "CAP_SYS_ADMIN" in lines[0] and "root" in lines[0]


def test_not_root_one_line_and_exit_3():
    prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
    proc = tcprio("--scan", prefix=prefix)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "uid 65534" in lines[0] and "run tcprio as root" in lines[0]



@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("runtime_security_config: [unclosed\n", "YAML"),
        ("runtime_security_config:\n  network:\n    classifier_priority: abc\n", "'abc'"),
        ("event_monitoring_config:\n  network:\n    classifier_priority: 70000\n", "70000"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_datadog_config_is_one_line_and_the_scan_goes_on(node, tmp_path, content, expected):
    attach_filter(node, "veth0", E, 5, "term_shot")
    config = tmp_path / "system-probe.yaml"
    config.write_text(content)
    proc = tcprio("--scan", "--format", "json", "--netns", node.name, "--assume-datadog",
                  "--datadog-config", str(config))  # fmt: skip
    assert proc.returncode == 1  # the default priority 10 still applies: fixable conflict
    errors = [line for line in proc.stderr.splitlines() if line]
    assert len(errors) == 1, proc.stderr
    assert str(config) in errors[0] and expected in errors[0]
    doc = json.loads(proc.stdout)
    assert doc["datadog"]["classifier_priority"] == {"value": 10, "source": "default"}
    assert len(doc["datadog"]["errors"]) == 1


def test_unreadable_datadog_config_is_one_line(node, tmp_path):
    folder = tmp_path / "system-probe.yaml"
    folder.mkdir()  # a directory where a file should be: unreadable even for root
    proc = tcprio("--scan", "--netns", node.name, "--datadog-config", str(folder))
    assert proc.returncode == 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line]
    assert len(errors) == 1 and str(folder) in errors[0]


def test_config_file_priority_is_used_and_labelled(node, tmp_path):
    attach_filter(node, "veth0", E, 5, "term_shot")
    config = tmp_path / "system-probe.yaml"
    config.write_text("runtime_security_config:\n  network:\n    classifier_priority: 4\n")
    proc = tcprio("--scan", "--format", "json", "--netns", node.name,
                  "--datadog-config", str(config))  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    setting = json.loads(proc.stdout)["datadog"]["classifier_priority"]
    assert setting["value"] == 4
    assert str(config) in setting["source"]
    assert "runtime_security_config.network.classifier_priority" in setting["source"]
