"""The text report's first screen, on real kernel scenes: the verdict, every cause and the
change to make within 25 lines; under 60 lines whatever the number of pods; each remedy once,
the everyday fix first and disabling last; lines of at most 100 columns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import jsonschema
import pytest

from bench.topology import Topology
from tcprio.analysis.conflicts import DatadogTarget, HookClassifiers, analyse
from tcprio.analysis.remedies import attach_remedies
from tcprio.kernel.programs import ProgramCatalogue
from tcprio.model import DatadogSettings, Direction, Setting
from tcprio.report import render_text
from tcprio.scan import Scan
from tests.bpf_programs import attach_filter
from tests.kernel import TestNetns, add_clsact, netns, veth_in_one
from tests.test_cli import schema, tcprio
from tests.test_conflicts import clsact, datadog
from tests.test_scan_kernel import datadog_settings

E, IN = Direction.EGRESS, Direction.INGRESS
FIRST_SCREEN, MAX_LINES, WIDTH = 25, 60, 100
SCAN = ("scan", "--no-datadog-config", "--color", "never")


def _check_shape(lines: list[str]) -> None:
    assert len(lines) < MAX_LINES, "\n".join(lines)
    too_long = [line for line in lines if len(line) > WIDTH]
    assert not too_long, too_long


@pytest.fixture(scope="module")
def big_node(classifier_programs) -> Iterator[Topology]:
    """bench/topology.py at N=200: 201 namespaces, 400 Cilium-like classifiers at priority 1
    before Datadog-like ones at 10, 400 u32 filters (about 5 s to build here)."""
    with Topology(200, seed=1) as topo:
        yield topo


def test_two_hundred_pods_fit_on_one_screen(big_node: Topology):
    proc = tcprio(*SCAN, "--netns", big_node.include_glob)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    _check_shape(lines)
    doc = json.loads(
        tcprio("scan", "--no-datadog-config", "--format", "json",
               "--netns", big_node.include_glob).stdout
    )  # fmt: skip
    jsonschema.validate(doc, schema())
    assert len(doc["conflicts"]) == 400  # every one is still in the JSON
    [group] = doc["groups"]["conflicts"]
    assert (group["severity"], group["blocker"], group["hook"], group["priority"]) == (
        "critical", "Cilium", "clsact", 1,
    )  # fmt: skip
    assert (group["hooks"], group["interfaces"]) == (400, 200)
    assert sorted(group["programs"]) == ["term_ok", "term_redirect"]
    assert len(group["examples"]) == 3
    first = "\n".join(lines[:FIRST_SCREEN])
    assert lines[1].startswith("Datadog network detection: active: 400 Datadog classifiers")
    verdict = next(line for line in lines if line.startswith("CRITICAL:"))
    assert lines.index(verdict) < 4 and "400 hooks" in verdict and "(exit 2)" in verdict
    assert "WHAT HIDES DATADOG'S CLASSIFIER (1 cause, 400 hooks)" in first
    assert "CRITICAL Cilium (clsact prio 1): 'term_ok', 'term_redirect'" in first
    assert "400 hooks on 200 interfaces" in first
    assert "WHAT TO CHANGE" in first and "1. vendor side: reconfigure Cilium (clsact)" in first
    assert "last resort: disable Workload Protection network detection" in first
    hidden = doc["groups"]["shadowed"]
    assert [(g["kind"], g["hooks"]) for g in hidden] == [("hidden", 200)]
    assert "OTHER CLASSIFIERS HIDDEN (200 hooks, 1 cause)" in proc.stdout
    assert proc.stdout.count("systemctl restart datadog-agent") == 1


def test_detail_lists_every_interface(big_node: Topology):
    proc = tcprio(*SCAN, "--netns", big_node.include_glob, "--detail")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("  CRITICAL ") for line in lines) > 400  # summary + each hook
    for pod in big_node.pods_plan[:3]:
        assert f"  {pod.node_if} ingress" in lines and f"  {pod.node_if} egress" in lines
    assert all(len(line) <= WIDTH for line in lines)


@pytest.fixture
def eight(classifier_programs) -> Iterator[TestNetns]:
    """Eight classifiers: one critical (priority 1), two fixable (5 and 7), Datadog's three
    behind them and two more that hide nothing."""
    with netns("screen") as ns:
        for ifname in ("s0", "s1", "s2", "s3"):
            veth_in_one(ns, ifname, f"{ifname}p")
            add_clsact(ns, ifname)
        attach_filter(ns, "s0", E, 1, "term_redirect")
        attach_filter(ns, "s1", E, 5, "term_shot")
        attach_filter(ns, "s2", E, 7, "term_ok")
        attach_filter(ns, "s3", E, 20, "term_ok")
        attach_filter(ns, "s3", IN, 3, "pass_unspec")
        for ifname in ("s0", "s1", "s2"):
            attach_filter(ns, ifname, E, 10, "classifier_egress",
                          filter_name="classifier_egress_0_4242")  # fmt: skip
        yield ns


def test_the_everyday_fix_comes_first_and_disabling_last(eight: TestNetns):
    proc = tcprio(*SCAN, "--netns", eight.name)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    _check_shape(lines)
    first = lines[:FIRST_SCREEN]
    change = first.index("WHAT TO CHANGE (in this order)")
    steps = [line for line in lines[change:] if line[:5].strip().rstrip(".").isdigit()]
    assert steps[0] == "  1. set Workload Protection's classifier priority to 4"
    assert "runtime_security_config:" in first[change + 3]  # the spelling that wins here
    assert "classifier_priority: 4" in "\n".join(first[change:])
    assert "last resort: disable Workload Protection network detection" in steps[-2]
    assert "last resort: disable Workload Protection entirely" in steps[-1]
    for text in ("disable Workload Protection network detection", "entirely",
                 "sudo systemctl restart datadog-agent"):  # fmt: skip
        assert proc.stdout.count(text) == 1, text
    causes = proc.stdout[: proc.stdout.index("WHAT TO CHANGE")]
    assert "CRITICAL 'term_redirect' (clsact prio 1) may return TC_ACT_REDIRECT" in causes
    assert "ERROR 'term_shot' (clsact prio 5)" in causes
    assert "ERROR 'term_ok' (clsact prio 7)" in causes


def test_detail_gives_each_remedy_once_in_every_spelling(eight: TestNetns):
    proc = tcprio(*SCAN, "--netns", eight.name, "--detail")
    text = proc.stdout
    how = text[text.index("HOW TO FIX") :]
    assert how.index("[1] set Workload Protection's classifier priority") < how.index(
        "disable Workload Protection network detection"
    )
    assert how.count("Kubernetes: apply the values with helm upgrade") == 1
    assert how.count("Helm values:") == 3  # the priority, network detection, all of it
    assert all(len(line) <= WIDTH for line in text.splitlines())


def test_booleans_as_yaml_writes_them_and_notes_reach_the_text(eight: TestNetns):
    text = tcprio(*SCAN, "--netns", eight.name).stdout
    assert "enabled true (default)" in text and "True" not in text
    assert "NOTES (" not in text or "  - " in text
    detail = tcprio(*SCAN, "--netns", eight.name, "--detail").stdout
    assert "network.enabled: true  (default)" in detail


def test_a_node_without_conflicts_says_ok(classifier_programs):
    with netns("screen-ok") as ns:
        veth_in_one(ns, "k0", "k0p")
        add_clsact(ns, "k0")
        attach_filter(ns, "k0", E, 20, "term_ok")
        proc = tcprio(*SCAN, "--netns", ns.name, "--assume-datadog")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tcprio ") and "1 namespace, 3 interfaces" in lines[0]
    assert lines[2].startswith("OK: nothing runs before Datadog's classifier")
    assert "WHAT TO CHANGE" not in proc.stdout


# --- the spelling that wins, without a kernel ---------------------------------------------------


def _fixable_scan(settings: DatadogSettings) -> Scan:

    hook = HookClassifiers("ns1", "eth0", E, (clsact(5, position=0), datadog(10, position=1)))
    result = attach_remedies(analyse([hook], DatadogTarget(priority=10)), settings)
    return Scan(inventories=[], catalogue=ProgramCatalogue(), verdicts={}, datadog=settings,
                result=result)  # fmt: skip


def _change_section(text: str) -> str:
    return text[text.index("WHAT TO CHANGE") :].split("\n\n")[0]


def test_the_change_is_spelled_the_way_that_wins_on_this_node():
    host = datadog_settings()
    section = _change_section(render_text(_fixable_scan(host)))
    assert "  1. set Workload Protection's classifier priority to 4" in section
    assert "in /etc/datadog-agent/system-probe.yaml:" in section
    assert "runtime_security_config:" in section and "sudo systemctl restart" in section

    in_file = replace(host, classifier_priority=Setting(
        10, "file:/etc/dd/system-probe.yaml:event_monitoring_config.network.classifier_priority"))
    section = _change_section(render_text(_fixable_scan(in_file)))
    assert "in /etc/dd/system-probe.yaml:" in section and "event_monitoring_config:" in section

    variable = "DD_RUNTIME_SECURITY_CONFIG_NETWORK_CLASSIFIER_PRIORITY"
    in_env = replace(host, classifier_priority=Setting(10, f"env:{variable}"))
    section = _change_section(render_text(_fixable_scan(in_env)))
    assert f"in system-probe's environment: {variable}=4" in section

    kubernetes = replace(host, agent_version="7.60.0",
                         agent_version_source="container image gcr.io/datadoghq/agent:7.60.0")
    section = _change_section(render_text(_fixable_scan(kubernetes)))
    assert "Helm values (the system-probe container):" in section
    assert f"- name: {variable}" in section and "spec.override.nodeAgent" in section
    assert "systemctl" not in section and "rollout restart" in section


def test_many_causes_and_notes_still_fit_under_sixty_lines():
    """Thirty programs of no known vendor, each its own cause, a classifier hidden behind each
    and twenty notes: the first screen keeps the most severe causes and says how many more."""
    hooks = [
        HookClassifiers(
            "ns1", f"eth{i}", E,
            (clsact(1 + i % 9, position=0, name=f"prog{i}"), datadog(10, position=1),
             clsact(20, position=2, name=f"late{i}")),
        )
        for i in range(30)
    ]  # fmt: skip
    settings = datadog_settings()
    result = attach_remedies(analyse(hooks, DatadogTarget(priority=10)), settings)
    result.notes = [f"note number {i}: " + "words " * 20 for i in range(20)]
    scan = Scan(inventories=[], catalogue=ProgramCatalogue(), verdicts={}, datadog=settings,
                result=result)  # fmt: skip
    lines = render_text(scan).splitlines()
    assert len(lines) < MAX_LINES, "\n".join(lines)
    assert all(len(line) <= WIDTH for line in lines)
    assert any(line.startswith("  ... ") and "more cause" in line for line in lines)
    assert "WHAT TO CHANGE" in "\n".join(lines[:FIRST_SCREEN])
    detail = render_text(scan, detail=True)
    assert detail.count("note number") == 20 and "prog29" in detail
