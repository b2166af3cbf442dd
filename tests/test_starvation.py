"""Starvation from run counters (pure): only where the counters speak for one hook."""

from __future__ import annotations

from tcprio.analysis.conflicts import DatadogTarget, analyse
from tcprio.analysis.starvation import MIN_WINDOW_S, starvations, starved_hooks
from tcprio.model import RunStats, Severity
from tests.test_conflicts import TRANSPARENT, UNKNOWN, clsact, datadog, hook

TARGET = DatadogTarget(priority=10)


def samples(*points: tuple[float, dict[int, int]]):
    return [(t, {p: RunStats(n, 0) for p, n in runs.items()}) for t, runs in points]


def scene(shared_blocker: bool = False):
    blocker, observer = clsact(1, position=0), datadog(10, position=1)
    hooks = [hook(blocker, observer)]
    if shared_blocker:
        hooks.append(hook(blocker, iface="eth1"))
    return analyse(hooks, TARGET), blocker.prog_id, observer.prog_id


def test_idle_datadog_behind_a_busy_blocker_is_starved():
    result, blocker, dd = scene()
    history = samples((0, {blocker: 0, dd: 7}), (MIN_WINDOW_S, {blocker: 50, dd: 7}))
    assert starved_hooks(result, history) == {("ns1", "eth0", "egress")}


def test_datadog_running_or_no_traffic_is_not_starved():
    result, blocker, dd = scene()
    running = samples((0, {blocker: 0, dd: 0}), (MIN_WINDOW_S, {blocker: 50, dd: 50}))
    quiet = samples((0, {blocker: 3, dd: 0}), (MIN_WINDOW_S, {blocker: 3, dd: 0}))
    assert starved_hooks(result, running) == frozenset()
    assert starved_hooks(result, quiet) == frozenset()


def test_too_short_a_window_or_a_program_sampled_too_recently_says_nothing():
    result, blocker, dd = scene()
    short = samples((0, {blocker: 0, dd: 0}), (MIN_WINDOW_S / 2, {blocker: 50, dd: 0}))
    late = samples((0, {}), (1, {blocker: 0, dd: 0}), (MIN_WINDOW_S, {blocker: 50, dd: 0}))
    assert starved_hooks(result, short) == frozenset()
    assert starved_hooks(result, late) == frozenset()  # only 4 s since it was first seen


def test_a_blocker_attached_to_several_hooks_proves_nothing_about_this_one():
    result, blocker, dd = scene(shared_blocker=True)
    history = samples((0, {blocker: 0, dd: 0}), (MIN_WINDOW_S, {blocker: 50, dd: 0}))
    assert starved_hooks(result, history) == frozenset()


def unknown_scene(verdict=UNKNOWN, datadog_first: bool = False):
    """A blocker tcprio cannot prove (a warning at most) before Datadog's, or after it."""
    blocker = clsact(20 if datadog_first else 1, verdict, position=1 if datadog_first else 0)
    observer = datadog(10, position=0 if datadog_first else 1)
    return analyse([hook(blocker, observer)], TARGET), blocker.prog_id, observer.prog_id


def test_an_unknown_blocker_is_starvation_evidence_like_a_proven_one():
    result, blocker, dd = unknown_scene()
    assert [c.severity for c in result.conflicts] == [Severity.WARNING]
    history = samples((0, {blocker: 0, dd: 0}), (MIN_WINDOW_S, {blocker: 50, dd: 0}))
    assert starved_hooks(result, history) == {("ns1", "eth0", "egress")}
    (found,) = starvations(result, history)
    assert [(c.prog_id, runs) for c, runs in found.busy] == [(blocker, 50)]
    assert found.as_log()["blockers"][0]["verdict"] == "unknown"


def test_any_classifier_before_datadog_counts_whatever_its_verdict_or_severity():
    result, blocker, dd = unknown_scene(TRANSPARENT)  # proven to pass: no conflict at all
    assert result.conflicts == []
    history = samples((0, {blocker: 0, dd: 0}), (MIN_WINDOW_S, {blocker: 50, dd: 0}))
    assert starved_hooks(result, history) == {("ns1", "eth0", "egress")}


def test_a_classifier_after_datadogs_running_alone_is_no_evidence():
    result, blocker, dd = unknown_scene(datadog_first=True)
    history = samples((0, {blocker: 0, dd: 0}), (MIN_WINDOW_S, {blocker: 50, dd: 0}))
    assert starved_hooks(result, history) == frozenset()
