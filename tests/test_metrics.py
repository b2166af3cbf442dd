"""The /metrics body from a snapshot: content, the per-analysis cache, one family each."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from tcprio.analysis.conflicts import DatadogTarget, analyse
from tcprio.model import RunStats
from tcprio.service.metrics import MetricsRenderer
from tcprio.service.snapshot import Snapshot
from tests.test_conflicts import clsact, datadog, hook


def snapshot() -> Snapshot:
    blocker = clsact(1, position=0, vendor="Cilium")
    result = analyse([hook(blocker, datadog(10, position=1))], DatadogTarget(10))
    return replace(
        Snapshot.empty("k"),
        ready=True,
        result=result,
        run_stats={blocker.prog_id: RunStats(5, 1000)},
        generation=1,
    )


def families(body: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def test_every_family_once_with_the_conflict_and_the_run_counts():
    current = snapshot()
    body = MetricsRenderer(lambda: current)()
    found = families(body)
    names = [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "a family was rendered twice"
    assert [s.labels["severity"] for s in found["tcprio_conflict"]] == ["critical"]
    assert found["tcprio_conflict"][0].labels["blocker_vendor"] == "Cilium"
    assert [s.value for s in found["tcprio_classifier_runs"]] == [5]
    assert {s.labels["severity"]: s.value for s in found["tcprio_conflicts"]}["critical"] == 1


def test_the_analysis_part_is_rendered_once_per_generation():
    current = snapshot()
    render = MetricsRenderer(lambda: current)
    first = render()
    current = replace(current, run_stats={k: RunStats(9, 0) for k in current.run_stats})
    second = render()
    assert first != second  # the run counter moved...
    assert [s.value for s in families(second)["tcprio_classifier_runs"]] == [9]
    # ...but the analysis part was not rendered again: a changed result with the same
    # generation still shows the old conflicts
    current = replace(current, result=replace(current.result, conflicts=[]))
    assert families(render())["tcprio_conflict"]
    current = replace(current, generation=2)
    assert "tcprio_conflict" not in families(render()) or not families(render())["tcprio_conflict"]


def test_the_datadog_detection_state_is_one_hot():
    from tcprio.model import DatadogPresence, DatadogSettings, PresenceState, Setting

    settings = DatadogSettings(Setting(True, "default"), Setting(10, "default"), Setting(0, "x"))
    absent = DatadogPresence(PresenceState.ABSENT, ("nothing of Datadog's found",))
    current = replace(snapshot(), datadog=settings)
    current = replace(current, result=replace(current.result, datadog_presence=absent))
    found = families(MetricsRenderer(lambda: current)())
    states = {s.labels["state"]: s.value for s in found["tcprio_datadog_network_detection"]}
    assert states == {"active": 0, "assumed": 0, "disabled": 0, "configured": 0, "absent": 1}
