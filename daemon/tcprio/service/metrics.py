"""Prometheus metrics from one Snapshot: every scrape sees a single consistent state.

A custom collector (no global mutable metric objects): series exist only for what the snapshot
holds, so the series of vanished namespaces and interfaces disappear by themselves.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tcprio import __version__
from tcprio.model import Classifier, HookReport, PresenceState, Setting, Severity
from tcprio.service.snapshot import Snapshot

PREFIX = "tcprio"


def _bool(value: object) -> str:
    return "true" if value else "false"


def _classifier_labels(hook: HookReport, c: Classifier, programs) -> dict[str, str]:
    program = programs.get(c.prog_id) if c.prog_id is not None else None
    return {
        "namespace": hook.namespace,
        "interface": hook.interface,
        "direction": str(hook.direction),
        "hook": str(c.hook),
        "priority": "" if c.priority is None else str(c.priority),
        "handle": "" if c.handle is None else f"{c.handle:#x}",
        "kind": c.kind,
        "prog_id": "" if c.prog_id is None else str(c.prog_id),
        "prog_name": (program.full_name or program.name) if program else c.name,
        "vendor": c.vendor or "",
        "verdict_class": str(c.verdict.verdict_class),
        "datadog": _bool(c.is_datadog),
    }


CLASSIFIER_LABELS = list(
    ["namespace", "interface", "direction", "hook", "priority", "handle", "kind", "prog_id"]
    + ["prog_name", "vendor", "verdict_class", "datadog"]
)
CONFLICT_LABELS = [
    "namespace", "interface", "direction", "severity", "hook", "blocker", "blocker_prog_id",
    "blocker_priority", "blocker_vendor", "datadog_priority",
]  # fmt: skip


def classifier_metrics(snap: Snapshot) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        f"{PREFIX}_classifier_info",
        "One series per TC classifier, in the order it sees packets on its hook",
        labels=CLASSIFIER_LABELS,
    )
    for hook in snap.result.hooks:
        for c in hook.classifiers:
            labels = _classifier_labels(hook, c, snap.programs)
            info.add_metric([labels[k] for k in CLASSIFIER_LABELS], 1)
    yield info


def conflict_metrics(snap: Snapshot) -> Iterator[Metric]:
    series = GaugeMetricFamily(
        f"{PREFIX}_conflict",
        "One series per classifier that may hide Datadog's classifier on a hook",
        labels=CONFLICT_LABELS,
    )
    for c in snap.result.conflicts:
        b = c.blocker
        series.add_metric(
            [c.namespace, c.interface, str(c.direction), str(c.severity), str(b.hook), b.name,
             "" if b.prog_id is None else str(b.prog_id),
             "" if b.priority is None else str(b.priority), b.vendor or "",
             str(c.datadog_priority)],
            1,
        )  # fmt: skip
    yield series
    totals = GaugeMetricFamily(
        f"{PREFIX}_conflicts", "Conflicts on this node by severity", labels=["severity"]
    )
    for severity in Severity:
        count = sum(1 for c in snap.result.conflicts if c.severity is severity)
        totals.add_metric([str(severity)], count)
    yield totals
    if snap.result.recommended_priority is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_recommended_classifier_priority",
            "The classifier_priority that fixes every fixable conflict of the node at once",
            value=snap.result.recommended_priority,
        )


SHADOWED_LABELS = [
    "namespace", "interface", "direction", "kind", "severity", "hidden_vendor", "blocker_vendor",
]  # fmt: skip


def shadowing_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Hidden classifiers other than Datadog's, counted by hook, kind and the two vendors (no
    program ids or names: a pod's programs change on every restart, its vendors do not)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for s in snap.result.shadowings:
        key = (s.namespace, s.interface, str(s.direction), str(s.kind), str(s.severity),
               s.hidden_label, s.blocker.vendor or "")  # fmt: skip
        counts[key] += 1
    gauge = GaugeMetricFamily(
        f"{PREFIX}_shadowed_classifiers",
        "Classifiers other than Datadog's that one before them on their hook may hide "
        "(kind: observer_hidden, policy_bypass, hidden)",
        labels=SHADOWED_LABELS,
    )
    for key, n in sorted(counts.items()):
        gauge.add_metric(list(key), n)
    yield gauge


def _setting_gauge(name: str, doc: str, setting: Setting | None) -> Iterator[Metric]:
    if setting is None:
        return
    gauge = GaugeMetricFamily(f"{PREFIX}_datadog_{name}", doc, labels=["source"])
    value = setting.value
    gauge.add_metric([setting.source], float(value) if not isinstance(value, bool) else int(value))
    yield gauge


def _presence_gauge(snap: Snapshot) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        f"{PREFIX}_datadog_network_detection",
        "Whether Datadog's network detection runs on the node: 1 for its state (active, "
        "assumed, disabled, configured, absent), 0 for the others; conflicts keep their "
        "severity only when active or assumed",
        labels=["state"],
    )
    current = snap.result.datadog_presence.state
    for state in PresenceState:
        gauge.add_metric([str(state)], int(state is current))
    yield gauge


def datadog_metrics(snap: Snapshot) -> Iterator[Metric]:
    dd = snap.datadog
    if dd is None:
        return
    yield from _presence_gauge(snap)
    yield from _setting_gauge(
        "network_enabled", "Workload Protection network detection (1 enabled)", dd.enabled
    )
    yield from _setting_gauge(
        "classifier_priority", "Effective classifier_priority", dd.classifier_priority
    )
    yield from _setting_gauge(
        "classifier_handle", "Effective classifier_handle", dd.classifier_handle
    )
    yield from _setting_gauge(
        "ingress_enabled", "Ingress classifier enabled (1)", dd.ingress_enabled
    )


def version_metrics(snap: Snapshot) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        f"{PREFIX}_vendor_version_info",
        "The version of each network product found on the node, from the image of the container "
        "its process runs in (always 1)",
        labels=["vendor", "version", "source"],
    )
    for found in snap.versions.values():
        gauge.add_metric([found.vendor, found.version, found.source], 1)
    yield gauge


def churn_metrics(snap: Snapshot) -> Iterator[Metric]:
    counters = snap.counters
    changes = CounterMetricFamily(
        f"{PREFIX}_filter_changes",
        "Filters added and deleted, by hook and priority",
        labels=["namespace", "interface", "direction", "priority", "change"],
    )
    for (ns, iface, direction, prio, change), n in sorted(counters.filter_changes.items()):
        changes.add_metric([ns, iface, direction, str(prio), change], n)
    yield changes
    replaced = CounterMetricFamily(
        f"{PREFIX}_filter_replacements",
        "Filters replaced at the same priority and handle by a different program",
        labels=["namespace", "interface", "direction", "priority"],
    )
    for (ns, iface, direction, prio), n in sorted(counters.replacements.items()):
        replaced.add_metric([ns, iface, direction, str(prio)], n)
    yield replaced
    gone = CounterMetricFamily(
        f"{PREFIX}_datadog_classifier_disappearances",
        "Datadog classifiers that were on a hook and then disappeared from it",
        labels=["namespace", "interface", "direction"],
    )
    for (ns, iface, direction), n in sorted(counters.disappearances.items()):
        gone.add_metric([ns, iface, direction], n)
    yield gone


def run_metrics(snap: Snapshot) -> Iterator[Metric]:
    labels = ["prog_id", "prog_name", "vendor"]
    runs = CounterMetricFamily(
        f"{PREFIX}_classifier_runs",
        "Times each classifier program ran (BPF run stats)",
        labels=labels,
    )
    seconds = CounterMetricFamily(
        f"{PREFIX}_classifier_run_seconds",
        "Time spent in each classifier program",
        labels=labels,
    )
    vendors: dict[int, str] = {}
    for hook in snap.result.hooks:
        for c in hook.classifiers:
            if c.prog_id is not None:
                vendors[c.prog_id] = c.vendor or ""
    for prog_id, stats in sorted(snap.run_stats.items()):
        program = snap.programs.get(prog_id)
        name = (program.full_name or program.name) if program else ""
        values = [str(prog_id), name, vendors.get(prog_id, "")]
        runs.add_metric(values, stats.run_cnt)
        seconds.add_metric(values, stats.run_time_ns / 1e9)
    yield runs
    yield seconds
    starved = GaugeMetricFamily(
        f"{PREFIX}_datadog_starved",
        "1 where run counters show Datadog's classifier not running while earlier ones do",
        labels=["namespace", "interface", "direction"],
    )
    for ns, iface, direction in sorted(snap.starved):
        starved.add_metric([ns, iface, direction], 1)
    yield starved
    live = CounterMetricFamily(
        f"{PREFIX}_live_verdicts",
        "Verdicts of cls_bpf classifiers on real traffic, counted by the live probe",
        labels=["namespace", "interface", "direction", "priority", "verdict"],
    )
    for labels, n in sorted(snap.live_verdicts.items()):
        live.add_metric(list(labels), n)
    yield live


def daemon_metrics(snap: Snapshot) -> Iterator[Metric]:
    build = InfoMetricFamily(f"{PREFIX}_build", "tcprio build information")
    build.add_metric([], {"version": __version__, "kernel": snap.kernel})
    yield build
    scans = CounterMetricFamily(f"{PREFIX}_scans", "Analyses of the node by kind", labels=["kind"])
    for kind in ("full", "incremental"):
        scans.add_metric([kind], snap.counters.scans.get(kind, 0))
    yield scans
    errors = CounterMetricFamily(
        f"{PREFIX}_scan_errors", "Errors while scanning, by stage", labels=["stage"]
    )
    for stage in ("discover", "enumerate", "programs", "analyse", "datadog_config"):
        errors.add_metric([stage], snap.counters.scan_errors.get(stage, 0))
    yield errors
    yield GaugeMetricFamily(
        f"{PREFIX}_analysis_duration_seconds",
        "How long the last analysis of the node took",
        value=snap.analysis_seconds,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_last_analysis_timestamp_seconds",
        "When the state behind these metrics was taken",
        value=snap.taken_at,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_namespaces_watched", "Network namespaces watched", value=snap.namespaces
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_interfaces_watched", "Interfaces watched", value=snap.interfaces
    )
    probe = GaugeMetricFamily(
        f"{PREFIX}_live_probe_available",
        "1 when the live verdict probe counts return codes on real traffic",
        labels=["mode"],
    )
    probe.add_metric([snap.probe.mode], int(snap.probe.available))
    yield probe
    yield GaugeMetricFamily(
        f"{PREFIX}_config_last_reload_successful",
        "1 when the last configuration (re)load succeeded",
        value=int(snap.config_ok),
    )
    reloads = CounterMetricFamily(
        f"{PREFIX}_config_reloads", "Configuration reloads by result", labels=["result"]
    )
    for result in ("success", "failure"):
        reloads.add_metric([result], snap.counters.reloads.get(result, 0))
    yield reloads


# Families that change only when the daemon publishes a new analysis, and those that move
# with every poll of the run counters: the first are rendered once per analysis.
ANALYSIS_FAMILIES = (
    daemon_metrics, classifier_metrics, conflict_metrics, shadowing_metrics, datadog_metrics,
    version_metrics,
    churn_metrics,
)  # fmt: skip
LIVE_FAMILIES = (run_metrics,)


class SnapshotCollector(Collector):
    def __init__(self, latest: Callable[[], Snapshot], families=ANALYSIS_FAMILIES + LIVE_FAMILIES):
        self._latest = latest
        self._families = families

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()  # read once: every family below comes from the same state
        for family in self._families:
            yield from family(snap)


def registry_for(latest: Callable[[], Snapshot], families=ANALYSIS_FAMILIES + LIVE_FAMILIES):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest, families))
    return registry


class MetricsRenderer:
    """The /metrics body. The analysis part is rendered once per published analysis (a node
    with hundreds of pods has thousands of series); only the run counters are rendered per
    scrape. Both parts come from one snapshot."""

    def __init__(self, latest: Callable[[], Snapshot]) -> None:
        self._latest = latest
        self._lock = threading.Lock()
        self._cached: tuple[int, bytes] | None = None

    def __call__(self) -> bytes:
        snap = self._latest()
        with self._lock:
            if self._cached is None or self._cached[0] != snap.generation:
                text = generate_latest(registry_for(lambda: snap, ANALYSIS_FAMILIES))
                self._cached = (snap.generation, text)
            analysis = self._cached[1]
        return analysis + generate_latest(registry_for(lambda: snap, LIVE_FAMILIES))
