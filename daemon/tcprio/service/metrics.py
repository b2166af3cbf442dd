"""Prometheus metrics from one Snapshot: every scrape sees a single consistent state.

Bounded by default: a node with 200 pods exports about as many series as one with 50. The
inventory is counted (classifiers by hook, direction, vendor and verdict; conflicts by
severity and blocking program), per-hook series exist only for problems (conflicts, Datadog's
classifier starved or missing) and at most `max_hook_series` of each, with
`tcprio_metrics_omitted_series` saying how many were left out. `full_inventory` adds a series
per classifier, per-hook counters and program ids, uncapped.

A custom collector (no global mutable metric objects): series exist only for what the snapshot
holds, so the series of vanished namespaces and interfaces disappear by themselves. Counters
summed over programs or hooks that come and go stay monotonic through `MonotonicSums`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector, CollectorRegistry

from tcprio import __version__
from tcprio.model import (
    Classifier,
    Conflict,
    HookKey,
    PresenceState,
    ProgramInfo,
    Setting,
    Severity,
)
from tcprio.service.config import MetricsConfig
from tcprio.service.snapshot import Snapshot

PREFIX = "tcprio"
HOOK_LABELS = ["netns", "interface", "direction"]
SEVERITY_ORDER = {s: i for i, s in enumerate(
    (Severity.CRITICAL, Severity.ERROR, Severity.WARNING, Severity.INFO)
)}  # fmt: skip


def _bool(value: object) -> str:
    return "true" if value else "false"


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _program_name(programs: Mapping[int, ProgramInfo], c: Classifier) -> str:
    program = programs.get(c.prog_id) if c.prog_id is not None else None
    return (program.full_name or program.name) if program else c.name


def _program_tag(programs: Mapping[int, ProgramInfo], prog_id: int | None) -> str:
    program = programs.get(prog_id) if prog_id is not None else None
    return program.tag if program else ""


@dataclass(frozen=True)
class View:
    """One snapshot and how much of it to say."""

    snap: Snapshot
    settings: MetricsConfig

    @property
    def full(self) -> bool:
        return self.settings.full_inventory

    def capped(self, series: list) -> list:
        """At most max_hook_series of `series` (already in the order to keep), the rest
        counted in tcprio_metrics_omitted_series."""
        if self.full:
            return series
        return series[: self.settings.max_hook_series]

    def omitted(self, series: list) -> int:
        return 0 if self.full else max(0, len(series) - self.settings.max_hook_series)


def _counted(name: str, doc: str, labels: list[str], counts: Counter[tuple[str, ...]]) -> Metric:
    """A gauge with one series per key of `counts` (label values in `labels`' order)."""
    gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for key, n in sorted(counts.items()):
        gauge.add_metric(list(key), n)
    return gauge


# --- the inventory ---------------------------------------------------------------------------

CLASSIFIER_INFO_LABELS = [
    "netns", "interface", "direction", "hook", "priority", "handle", "kind", "prog_id",
    "prog_name", "prog_tag", "vendor", "verdict_class", "datadog",
]  # fmt: skip
CLASSIFIER_COUNT_LABELS = ["hook", "direction", "vendor", "verdict_class", "datadog"]


def classifier_metrics(view: View) -> Iterator[Metric]:
    snap = view.snap
    counts: Counter[tuple[str, ...]] = Counter()
    info = GaugeMetricFamily(
        f"{PREFIX}_classifier_info",
        "One series per TC classifier, in the order it sees packets on its hook "
        "(metrics.full_inventory only)",
        labels=CLASSIFIER_INFO_LABELS,
    )
    for hook in snap.result.hooks:
        for c in hook.classifiers:
            direction, vendor = str(hook.direction), c.vendor or ""
            verdict, datadog = str(c.verdict.verdict_class), _bool(c.is_datadog)
            counts[(str(c.hook), direction, vendor, verdict, datadog)] += 1
            if view.full:
                info.add_metric(
                    [hook.namespace, hook.interface, direction, str(c.hook), _text(c.priority),
                     "" if c.handle is None else f"{c.handle:#x}", c.kind, _text(c.prog_id),
                     _program_name(snap.programs, c), _program_tag(snap.programs, c.prog_id),
                     vendor, verdict, datadog],
                    1,
                )  # fmt: skip
    yield _counted(
        "classifiers",
        "TC classifiers on the node, by hook kind, direction, vendor and verdict class",
        CLASSIFIER_COUNT_LABELS, counts,
    )  # fmt: skip
    if view.full:
        yield info


# --- conflicts -------------------------------------------------------------------------------

CONFLICT_LABELS = [
    "netns", "interface", "direction", "severity", "hook", "blocker", "blocker_tag",
    "blocker_vendor", "blocker_priority", "datadog_priority",
]  # fmt: skip
BLOCKER_LABELS = ["severity", "hook", "direction", "blocker", "blocker_vendor", "blocker_priority"]
# prog_name as the classifier is named in tcprio_conflict's `blocker` (join on both)
PROGRAM_INFO_LABELS = ["prog_name", "prog_tag", "vendor", "verdict_class"]


def _conflict_order(c: Conflict) -> tuple:
    """Most severe first, then by hook: the capped detail keeps the same series scrape after
    scrape while the node does not change."""
    return (SEVERITY_ORDER.get(c.severity, 9), c.namespace, c.interface, str(c.direction),
            _text(c.blocker.priority), c.blocker.name)  # fmt: skip


def _conflict_values(view: View, c: Conflict) -> list[str]:
    programs, blocker = view.snap.programs, c.blocker
    return [c.namespace, c.interface, str(c.direction), str(c.severity), str(blocker.hook),
            blocker.name, _program_tag(programs, blocker.prog_id),
            blocker.vendor or "", _text(blocker.priority), str(c.datadog_priority)]  # fmt: skip


def conflict_metrics(view: View) -> Iterator[Metric]:
    snap = view.snap
    conflicts = sorted(snap.result.conflicts, key=_conflict_order)
    totals = GaugeMetricFamily(
        f"{PREFIX}_conflicts", "Conflicts on this node by severity", labels=["severity"]
    )
    for severity in Severity:
        totals.add_metric([str(severity)], sum(1 for c in conflicts if c.severity is severity))
    yield totals

    blockers: Counter[tuple[str, ...]] = Counter()
    for c in conflicts:
        labels = dict(zip(CONFLICT_LABELS, _conflict_values(view, c), strict=True))
        blockers[tuple(labels[k] for k in BLOCKER_LABELS)] += 1
    yield _counted(
        "conflict_blockers",
        "Hooks where a classifier may hide Datadog's, by severity and blocking program",
        BLOCKER_LABELS, blockers,
    )  # fmt: skip

    detail = GaugeMetricFamily(
        f"{PREFIX}_conflict",
        "One series per classifier that may hide Datadog's classifier on a hook (the most "
        "severe metrics.max_hook_series; the full list: tcprio scan)",
        labels=CONFLICT_LABELS,
    )
    shown = view.capped(conflicts)
    for c in shown:
        detail.add_metric(_conflict_values(view, c), 1)
    yield detail
    yield from _program_info(view, [c.blocker for c in shown])

    if snap.result.recommended_priority is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_recommended_classifier_priority",
            "The classifier_priority that fixes every fixable conflict of the node at once",
            value=snap.result.recommended_priority,
        )


def _program_info(view: View, named: Iterable[Classifier]) -> Iterator[Metric]:
    """Who the programs are, by name and tag (stable across reloads of the same code): those
    the conflict series name, or every attached one with full_inventory."""
    snap = view.snap
    if view.full:
        named = [c for hook in snap.result.hooks for c in hook.classifiers]
    seen: set[tuple[str, ...]] = set()
    info = GaugeMetricFamily(
        f"{PREFIX}_program_info",
        "The BPF programs tcprio names in other series, by name and tag (always 1)",
        labels=PROGRAM_INFO_LABELS,
    )
    for c in named:
        tag = _program_tag(snap.programs, c.prog_id)
        if not tag:
            continue
        key = (c.name, tag, c.vendor or "", str(c.verdict.verdict_class))
        if key not in seen:
            seen.add(key)
            info.add_metric(list(key), 1)
    yield info


# --- other classifiers hidden ----------------------------------------------------------------

SHADOWED_LABELS = ["direction", "kind", "severity", "hidden_vendor", "blocker_vendor"]


def shadowing_metrics(view: View) -> Iterator[Metric]:
    """Hidden classifiers other than Datadog's, counted by kind and the two vendors (no
    program ids or names: a pod's programs change on every restart, its vendors do not)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for s in view.snap.result.shadowings:
        key = (str(s.direction), str(s.kind), str(s.severity), s.hidden_label,
               s.blocker.vendor or "")  # fmt: skip
        counts[(s.namespace, s.interface, *key) if view.full else key] += 1
    yield _counted(
        "shadowed_classifiers",
        "Classifiers other than Datadog's that one before them on their hook may hide "
        "(kind: observer_hidden, policy_bypass, hidden)",
        (["netns", "interface"] if view.full else []) + SHADOWED_LABELS, counts,
    )  # fmt: skip


# --- Datadog ---------------------------------------------------------------------------------


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


def datadog_metrics(view: View) -> Iterator[Metric]:
    dd = view.snap.datadog
    if dd is None:
        return
    yield from _presence_gauge(view.snap)
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


def missing_datadog_hooks(snap: Snapshot) -> list[HookKey]:
    """Hooks Datadog's classifier disappeared from and is not back on (the hook remains: the
    counters of vanished interfaces are dropped)."""
    present = {
        (h.namespace, h.interface, str(h.direction))
        for h in snap.result.hooks
        if any(c.is_datadog for c in h.classifiers)
    }
    return sorted(k for k, n in snap.counters.disappearances.items() if n and k not in present)


def _hook_gauge(view: View, name: str, doc: str, hooks: list[HookKey]) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=HOOK_LABELS)
    for hook in view.capped(hooks):
        gauge.add_metric(list(hook), 1)
    yield gauge


def omitted_metrics(
    view: View, missing: list[HookKey], starved: list[HookKey]
) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        f"{PREFIX}_metrics_omitted_series",
        "Per-hook series left out of this scrape by metrics.max_hook_series, by family "
        "(tcprio scan lists them all)",
        labels=["family"],
    )
    gauge.add_metric(["tcprio_conflict"], view.omitted(view.snap.result.conflicts))
    gauge.add_metric(["tcprio_datadog_classifier_missing"], view.omitted(missing))
    gauge.add_metric(["tcprio_datadog_starved"], view.omitted(starved))
    yield gauge


def version_metrics(view: View) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        f"{PREFIX}_vendor_version_info",
        "The version of each network product found on the node, from the image of the container "
        "its process runs in (always 1)",
        labels=["vendor", "version", "source"],
    )
    for found in view.snap.versions.values():
        gauge.add_metric([found.vendor, found.version, found.source], 1)
    yield gauge


# --- filter churn ----------------------------------------------------------------------------


def churn_metrics(view: View) -> Iterator[Metric]:
    counters = view.snap.counters
    changes = CounterMetricFamily(
        f"{PREFIX}_filter_changes",
        "Filters added and deleted",
        labels=(HOOK_LABELS + ["priority"] if view.full else ["direction"]) + ["change"],
    )
    replaced = CounterMetricFamily(
        f"{PREFIX}_filter_replacements",
        "Filters replaced at the same priority and handle by a different program",
        labels=HOOK_LABELS + ["priority"] if view.full else ["direction"],
    )
    gone = CounterMetricFamily(
        f"{PREFIX}_datadog_classifier_disappearances",
        "Datadog classifiers that were on a hook and then disappeared from it",
        labels=HOOK_LABELS if view.full else ["direction"],
    )
    if view.full:
        for (ns, iface, direction, prio, change), n in sorted(counters.filter_changes.items()):
            changes.add_metric([ns, iface, direction, str(prio), change], n)
        for (ns, iface, direction, prio), n in sorted(counters.replacements.items()):
            replaced.add_metric([ns, iface, direction, str(prio)], n)
        for hook, n in sorted(counters.disappearances.items()):
            gone.add_metric(list(hook), n)
    else:
        for (direction, change), n in sorted(counters.changes_by_direction.items()):
            changes.add_metric([direction, change], n)
        for direction, n in sorted(counters.replacements_by_direction.items()):
            replaced.add_metric([direction], n)
        for direction, n in sorted(counters.disappearances_by_direction.items()):
            gone.add_metric([direction], n)
    yield changes
    yield replaced
    yield gone


def problem_metrics(view: View) -> Iterator[Metric]:
    """Per-hook series, only where something is wrong, capped; and churn, which depends on the
    clock (a hook stops churning when its changes leave the window), so it is per scrape."""
    snap = view.snap
    missing, starved = missing_datadog_hooks(snap), sorted(snap.starved)
    yield from _hook_gauge(
        view, "datadog_classifier_missing",
        "1 where Datadog's classifier disappeared from a hook that remains and is not back",
        missing,
    )  # fmt: skip
    yield from _hook_gauge(
        view, "datadog_starved",
        "1 where run counters show Datadog's classifier not running while earlier ones do",
        starved,
    )  # fmt: skip
    yield from omitted_metrics(view, missing, starved)
    churning = GaugeMetricFamily(
        f"{PREFIX}_hooks_churning",
        "Hooks with more than 4 filter adds and deletes (cause add_delete) or any replacement "
        "(cause replacement) in the last 15 minutes",
        labels=["direction", "cause"],
    )
    counts = snap.counters.churning_hooks(time.monotonic())
    for direction in ("ingress", "egress"):
        for cause in ("add_delete", "replacement"):
            churning.add_metric([direction, cause], counts.get((direction, cause), 0))
    yield churning


# --- run counters and live verdicts ----------------------------------------------------------


class MonotonicSums:
    """Sums of counters over members that come and go (programs, hooks), kept monotonic: each
    update adds what every member gained since the last one, and a member that vanishes keeps
    what it had contributed. A member seen for the first time contributes all it has (its runs
    happened on this node); one whose value went down was replaced and counts from zero."""

    def __init__(self) -> None:
        self._last: dict[Hashable, float] = {}
        self.totals: Counter[tuple[str, ...]] = Counter()

    def update(self, values: Mapping[Hashable, float],
               group: Callable[[Hashable], tuple[str, ...]]) -> None:  # fmt: skip
        for member, value in values.items():
            before = self._last.get(member, 0)
            gained = value - before if value >= before else value
            if gained:
                self.totals[group(member)] += gained
        self._last = dict(values)


@dataclass
class LiveTotals:
    """The bounded, monotonic sums the renderer keeps across scrapes."""

    runs: MonotonicSums
    run_seconds: MonotonicSums
    verdicts: MonotonicSums

    @staticmethod
    def new() -> LiveTotals:
        return LiveTotals(MonotonicSums(), MonotonicSums(), MonotonicSums())

    def update(self, snap: Snapshot) -> None:
        vendors = _vendors_by_program(snap)

        def program(prog_id: Hashable) -> tuple[str, ...]:
            info = snap.programs.get(prog_id)  # type: ignore[call-overload]
            name = (info.full_name or info.name) if info else ""
            return (name, vendors.get(prog_id, ""))  # type: ignore[call-overload]

        self.runs.update({p: s.run_cnt for p, s in snap.run_stats.items()}, program)
        self.run_seconds.update({p: s.run_time_ns for p, s in snap.run_stats.items()}, program)
        # (netns, interface, direction, priority, verdict) -> (direction, priority, verdict)
        self.verdicts.update(snap.live_verdicts, lambda k: k[2:])  # type: ignore[index]


def _vendors_by_program(snap: Snapshot) -> dict[int, str]:
    return {
        c.prog_id: c.vendor or ""
        for hook in snap.result.hooks
        for c in hook.classifiers
        if c.prog_id is not None
    }


def run_metrics(view: View, totals: LiveTotals) -> Iterator[Metric]:
    snap = view.snap
    labels = (["prog_id", "prog_tag"] if view.full else []) + ["prog_name", "vendor"]
    runs = CounterMetricFamily(
        f"{PREFIX}_classifier_runs", "Times classifier programs ran (BPF run stats)", labels=labels
    )
    seconds = CounterMetricFamily(
        f"{PREFIX}_classifier_run_seconds", "Time spent in classifier programs", labels=labels
    )
    if view.full:
        vendors = _vendors_by_program(snap)
        for prog_id, stats in sorted(snap.run_stats.items()):
            program = snap.programs.get(prog_id)
            name = (program.full_name or program.name) if program else ""
            values = [str(prog_id), program.tag if program else "", name,
                      vendors.get(prog_id, "")]  # fmt: skip
            runs.add_metric(values, stats.run_cnt)
            seconds.add_metric(values, stats.run_time_ns / 1e9)
    else:
        for key, n in sorted(totals.runs.totals.items()):
            runs.add_metric(list(key), n)
        for key, ns in sorted(totals.run_seconds.totals.items()):
            seconds.add_metric(list(key), ns / 1e9)
    yield runs
    yield seconds
    live = CounterMetricFamily(
        f"{PREFIX}_live_verdicts",
        "Verdicts of cls_bpf classifiers on real traffic, counted by the live probe",
        labels=(HOOK_LABELS if view.full else ["direction"]) + ["priority", "verdict"],
    )
    source = snap.live_verdicts if view.full else totals.verdicts.totals
    for key, n in sorted(source.items()):
        live.add_metric(list(key), n)
    yield live


# --- the daemon itself -----------------------------------------------------------------------


def daemon_metrics(view: View) -> Iterator[Metric]:
    snap = view.snap
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


# Families that change only when the daemon publishes a new analysis (rendered once per
# analysis), and those that move with every poll of the run counters or with the clock.
ANALYSIS_FAMILIES: tuple[Callable[[View], Iterator[Metric]], ...] = (
    daemon_metrics, classifier_metrics, conflict_metrics, shadowing_metrics, datadog_metrics,
    version_metrics, churn_metrics,
)  # fmt: skip


class _Families(Collector):
    def __init__(self, produce: Callable[[], Iterator[Metric]]) -> None:
        self._produce = produce

    def collect(self) -> Iterator[Metric]:
        return self._produce()


def _registry(produce: Callable[[], Iterator[Metric]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(produce))
    return registry


def _analysis(view: View) -> Iterator[Metric]:
    for family in ANALYSIS_FAMILIES:
        yield from family(view)


def _render(produce: Callable[[], Iterator[Metric]], openmetrics: bool) -> bytes:
    registry = _registry(produce)
    return generate_openmetrics(registry) if openmetrics else generate_latest(registry)


EOF_LINE = b"# EOF\n"


class MetricsRenderer:
    """The /metrics body, in the Prometheus text format or OpenMetrics. The analysis part is
    rendered once per published analysis and settings; the run counters, the clock-dependent
    families and process_* per scrape. Every part comes from one snapshot."""

    def __init__(
        self,
        latest: Callable[[], Snapshot],
        settings: Callable[[], MetricsConfig] = MetricsConfig,
    ) -> None:
        self._latest = latest
        self._settings = settings
        self._lock = threading.Lock()
        self._cached: dict[bool, tuple[tuple[int, MetricsConfig], bytes]] = {}
        self._totals = LiveTotals.new()
        self._process = ProcessCollector(registry=None)

    def __call__(self, openmetrics: bool = False) -> bytes:
        view = View(self._latest(), self._settings())
        key = (view.snap.generation, view.settings)
        with self._lock:
            cached = self._cached.get(openmetrics)
            if cached is None or cached[0] != key:
                cached = (key, _render(lambda: _analysis(view), openmetrics))
                self._cached[openmetrics] = cached
            if not view.full:
                self._totals.update(view.snap)
            live = _render(lambda: self._live(view), openmetrics)
        analysis = cached[1]
        if openmetrics:  # one `# EOF`, at the very end
            analysis = analysis.removesuffix(EOF_LINE)
        return analysis + live

    def _live(self, view: View) -> Iterator[Metric]:
        yield from run_metrics(view, self._totals)
        yield from problem_metrics(view)
        yield from self._process.collect()
