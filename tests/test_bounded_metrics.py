"""/metrics is bounded by default: the same series at 50 and at 200 pods.

The node of bench/topology.py (two conflicts per pod: a CNI-like terminal classifier at
priority 1 before a Datadog-like one at 10, both directions; tcx programs on a quarter of the
pods), watched by the real daemon. Series are counted on one scrape once the daemon has
analysed every namespace: a deterministic count, not a timing.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.topology import Topology
from tcprio.analysis.churn import Change
from tcprio.model import Direction
from tcprio.service.metrics import MonotonicSums
from tcprio.service.snapshot import CHURN_WINDOW_S, Counters
from tests.bpf_programs import attach_filter
from tests.kernel import add_clsact, netns, veth_in_one
from tests.test_daemon import RunningDaemon, daemon, find
from tests.timing import wait_until

E = Direction.EGRESS

# Building 200 pods and analysing them takes about 10 s here; the hang guard is 10x that.
ANALYSIS_GUARD_S = 120.0
_topologies = 0


def _tag() -> str:
    """A topology tag the test daemon's namespace filter (`tcpriot-d*<pid>-*`) lets in."""
    global _topologies
    _topologies += 1
    return f"tcpriot-dbm{os.getpid()}-{_topologies}"


Scrape = tuple[Counter[str], dict]  # samples by family; the samples


def scrape_once_analysed(running: RunningDaemon, namespaces: int, pods: int) -> Scrape:
    """One scrape, once every namespace is watched and every pod's two conflicts are
    counted: its number of samples by family, and the samples."""

    def analysed() -> Scrape | None:
        status, text = running.get("/metrics")
        assert status == 200
        families = list(text_string_to_metric_families(text))
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for f in families for s in f.samples}  # fmt: skip
        conflicts = sum(find(samples, "tcprio_conflicts"))
        if find(samples, "tcprio_namespaces_watched") != [namespaces] or conflicts < 2 * pods:
            return None
        return Counter({f.name: len(f.samples) for f in families}), samples

    return wait_until(analysed, f"{pods} pods never analysed", ANALYSIS_GUARD_S, poll_s=0.5)


@pytest.fixture(scope="module")
def counted(tmp_path_factory, classifier_programs) -> dict[int, Scrape]:
    counts = {}
    for pods in (50, 200):
        with Topology(pods, seed=1, tag=_tag()) as topo, daemon(
            tmp_path_factory.mktemp(f"bounded{pods}"), full_inventory=False,
            ready_guard_s=ANALYSIS_GUARD_S,
        ) as running:  # fmt: skip
            counts[pods] = scrape_once_analysed(running, len(topo.namespaces), pods)
    return counts


def test_the_series_count_at_200_pods_is_within_10_percent_of_50(counted):
    (families_50, _), (families_200, _) = counted[50], counted[200]
    at_50, at_200 = sum(families_50.values()), sum(families_200.values())
    assert abs(at_200 - at_50) / at_50 < 0.10, (at_50, at_200, families_200 - families_50)


def test_per_hook_detail_is_capped_and_the_rest_counted(counted):
    families, samples = counted[200]
    assert families["tcprio_conflict"] == 20  # metrics.max_hook_series, the default
    assert "tcprio_classifier_info" not in families  # full_inventory only
    conflicts = sum(find(samples, "tcprio_conflicts"))
    assert conflicts == 400  # two per pod, all counted
    assert find(samples, "tcprio_metrics_omitted_series", family="tcprio_conflict") == [380]
    # the blocking programs, aggregated: every conflict is on one of their hooks
    assert sum(find(samples, "tcprio_conflict_blockers")) == conflicts


def test_full_inventory_lists_every_classifier(tmp_path, classifier_programs):
    with Topology(10, seed=1, tag=_tag()) as topo, daemon(tmp_path) as running:
        families, samples = scrape_once_analysed(running, len(topo.namespaces), 10)
    assert families["tcprio_conflict"] == 20  # every conflict: two per pod, no cap
    assert find(samples, "tcprio_metrics_omitted_series", family="tcprio_conflict") == [0]
    # one series per classifier, and the counts by hook kind agree with them
    assert families["tcprio_classifier_info"] == sum(find(samples, "tcprio_classifiers"))
    assert families["tcprio_classifier_info"] >= 4 * 10  # two on each side of every veth


def test_bounded_problem_series_on_a_replacement_and_churn(tmp_path, classifier_programs):
    """Cilium <= 1.9's race (Datadog's `prio 1 handle 1` replaced), then a filter re-added
    over and over: per hook only what is wrong, the counters by direction."""
    with daemon(tmp_path, full_inventory=False) as running, netns("d-bchurn") as ns:
        veth_in_one(ns, "c0", "c1")
        add_clsact(ns, "c0")
        attach_filter(ns, "c0", E, 1, "classifier_egress", handle=1,
                      filter_name="classifier/egress_1_2")  # fmt: skip
        attach_filter(ns, "c0", E, 3, "pass_unspec", handle=1)
        running.wait_for(
            "both classifiers",
            lambda s: sum(find(s, "tcprio_classifiers", direction="egress")) == 2,
        )
        attach_filter(ns, "c0", E, 1, "term_ok", handle=1, replace=True)
        where = {"netns": ns.name, "interface": "c0", "direction": "egress"}
        samples = running.wait_for(
            "Datadog's classifier missing, the replacement counted",
            lambda s: (
                find(s, "tcprio_datadog_classifier_missing", **where) == [1.0]
                and find(s, "tcprio_hooks_churning", direction="egress",
                         cause="replacement") == [1.0]
            ),
        )  # fmt: skip
        assert find(samples, "tcprio_filter_replacements_total", direction="egress") == [1.0]
        assert find(samples, "tcprio_datadog_classifier_disappearances_total") == [1.0]
        assert find(samples, "tcprio_hooks_churning", cause="add_delete") == [0.0, 0.0]
        def egress_classifiers(n: int):  # each change seen before the next (no coalescing)
            return lambda s: sum(find(s, "tcprio_classifiers", direction="egress")) == n

        for _ in range(3):  # six adds and deletes: more than 4 in the window
            attach_filter(ns, "c0", E, 7, "pass_unspec", handle=7)
            running.wait_for("the filter added", egress_classifiers(3))
            ns.tc("filter", "del", "dev", "c0", "egress", "prio", "7")
            running.wait_for("the filter deleted", egress_classifiers(2))
        samples = running.wait_for(
            "the hook churning",
            lambda s: find(s, "tcprio_hooks_churning", direction="egress",
                           cause="add_delete") == [1.0],
        )  # fmt: skip
        assert not any("interface" in dict(labels) for (name, labels) in samples
                       if name.startswith("tcprio_filter_"))  # fmt: skip
        # Datadog's classifier comes back: nothing missing any more
        attach_filter(ns, "c0", E, 10, "classifier_egress", filter_name="classifier/egress_1_2")
        running.wait_for(
            "Datadog's classifier back",
            lambda s: find(s, "tcprio_datadog_classifier_missing", **where) == [],
        )


def test_monotonic_sums_survive_members_that_come_and_go():
    sums = MonotonicSums()
    sums.update({1: 10, 2: 5}, lambda p: ("a",))
    assert sums.totals == {("a",): 15}
    sums.update({1: 12}, lambda p: ("a",))  # program 2 unloaded: its 5 runs stay counted
    assert sums.totals == {("a",): 17}
    sums.update({1: 3, 3: 4}, lambda p: ("a",))  # id 1 reset (reloaded), 3 is new
    assert sums.totals == {("a",): 24}


def test_the_churn_window_forgets_old_changes():
    counters = Counters()
    change = Change("add", "ns", "c0", Direction.EGRESS, 7, 7)
    for second in range(4):
        counters.count_change(change, now=float(second))
    assert counters.churning_hooks(now=10.0) == {}  # 4 changes: not more than 4
    counters.count_change(change, now=10.0)
    assert counters.churning_hooks(now=10.0) == {("egress", "add_delete"): 1}
    assert counters.churning_hooks(now=10.0 + CHURN_WINDOW_S - 1) == {}  # the first 4 left
    assert counters.changes_by_direction == {("egress", "add"): 5}
    assert counters.filter_changes == {("ns", "c0", "egress", 7, "add"): 5}
